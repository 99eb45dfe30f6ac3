"""Given subject masks: the Python API, eval's --mask-dir layout, the resize rule, files under masks/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from storydiff.consistency.mask_files import mask_path
from storydiff.consistency.subject_masks import SubjectMasks, level_grid, resize_mask, token_grid
from storydiff.evaluation.masks import MaskDir

FRAMES = [("Bob",), ("Alice",), ("Bob", "Alice"), ()]
SIZE = (128, 128)


def box(size, top, left, bottom, right) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def given() -> dict:
    return {
        0: {"Bob": box(SIZE, 0, 0, 64, 64)},
        1: {"Alice": box((32, 32), 16, 16, 32, 32).numpy()},  # any size of the image's aspect, numpy
        2: {"Bob": box(SIZE, 0, 0, 64, 64), "Alice": box(SIZE, 64, 64, 128, 128)},
    }


def test_token_grid():
    assert token_grid(256, (128, 128)) == (16, 16)
    assert token_grid(988, (832, 1216)) == (26, 38)  # SDXL 1/32 of a non-square size
    assert token_grid(512, (512, 1024)) == (16, 32)
    with pytest.raises(ValueError, match="no grid"):
        token_grid(64, (128, 256))  # 8x16 = 128 tokens would be; 64 is no level of this size
    with pytest.raises(ValueError, match="no grid"):
        token_grid(3 * 256, (128, 128))  # a video's 3 frames x 16x16 tokens
    assert level_grid((128, 128), 16) == (8, 8) and level_grid((832, 1216), 32) == (26, 38)


def test_resize_rule_area_average_then_half():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = True  # top-left 2x2 cell half covered: subject (>= 0.5)
    mask[2, 2] = True  # bottom-right cell a quarter covered: not
    assert resize_mask(mask, (2, 2)).tolist() == [[True, False], [False, False]]
    up = resize_mask(torch.tensor([[True, False]]), (2, 4))  # upsampling repeats
    assert up.tolist() == [[True, True, False, False]] * 2
    square = box(SIZE, 0, 0, 64, 64)
    for grid in ((16, 16), (8, 8), (4, 4)):
        assert resize_mask(square, grid).float().mean() == 0.25


def test_api_masks_on_every_level():
    masks = SubjectMasks.from_mapping(given(), FRAMES, SIZE)
    for tokens, side in ((256, 16), (64, 8), (16, 4)):
        bob = masks.subject_tokens(0, tokens).view(side, side)
        assert bob[: side // 2, : side // 2].all() and bob.sum() == side * side // 4
        alice = masks.subject_tokens(1, tokens).view(side, side)
        assert alice[side // 2 :, side // 2 :].all() and alice.sum() == side * side // 4
        both = masks.subject_tokens(2, tokens).view(side, side)
        assert both.sum() == side * side // 2  # the union of the frame's characters
    assert masks.subject_tokens(3, 256) is None  # [NC]
    levels = masks.level_masks([16, 32])
    assert levels[32][(2, "Alice")].shape == (4, 4) and len(levels[16]) == 4


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.pop(1), r"frame 1: no mask for Alice"),
        (lambda m: m[2].pop("Alice"), r"frame 2: no mask for Alice"),
        (lambda m: m[0].update(Carol=box(SIZE, 0, 0, 1, 1)), r"frame 0: mask for unknown character 'Carol'"),
        (lambda m: m.update({3: {"Bob": box(SIZE, 0, 0, 1, 1)}}), r"frame 3: .*'Bob' \(the frame shows no"),
        (lambda m: m.update({7: {}}), r"mask for frame 7: the story has frames 0 to 3"),
        (lambda m: m[0].update(Bob=box((64, 128), 0, 0, 1, 1)), r"frame 0 \(Bob\): a 64x128 mask cannot"),
        (lambda m: m[0].update(Bob=torch.zeros(8, 8)), r"frame 0 \(Bob\): a mask must be boolean"),
        (lambda m: m[0].update(Bob=torch.zeros(2, 8, 8, dtype=torch.bool)), r"frame 0 \(Bob\): a mask is"),
    ],
)
def test_clear_errors(change, match):
    masks = given()
    change(masks)
    with pytest.raises(ValueError, match=match):
        SubjectMasks.from_mapping(masks, FRAMES, SIZE)


def write_png(path, mask: torch.Tensor, mode: str = "L") -> None:
    pixels = mask.numpy().astype(np.uint8) * 255
    if mode == "RGBA":  # a background remover's cut-out: the mask is the alpha
        rgba = np.zeros((*pixels.shape, 4), np.uint8)
        rgba[..., 0] = 200
        rgba[..., 3] = pixels
        Image.fromarray(rgba, mode="RGBA").save(path)
    else:
        Image.fromarray(pixels, mode="L").save(path)


def test_folder_in_eval_layout(tmp_path):
    write_png(mask_path(tmp_path, 0), box(SIZE, 0, 0, 64, 64))
    write_png(mask_path(tmp_path, 1), box(SIZE, 64, 64, 128, 128), mode="RGBA")
    write_png(mask_path(tmp_path, 2), box((64, 64), 0, 0, 32, 64))
    assert MaskDir(tmp_path).path(2) == mask_path(tmp_path, 2) == tmp_path / "mask_002.png"
    masks = SubjectMasks.from_folder(tmp_path, FRAMES, SIZE)
    assert torch.equal(masks.mask(0, "Bob"), box(SIZE, 0, 0, 64, 64))
    assert torch.equal(masks.mask(1, "Alice"), box(SIZE, 64, 64, 128, 128))  # read by its alpha
    # one file per frame, shared by its characters (eval's layout)
    assert torch.equal(masks.mask(2, "Bob"), masks.mask(2, "Alice"))
    assert masks.subject_tokens(2, 64).view(8, 8)[:4].all()
    mask_path(tmp_path, 1).unlink()
    with pytest.raises(ValueError, match=r"frame 1 \(Alice\): no mask mask_001.png"):
        SubjectMasks.from_folder(tmp_path, FRAMES, SIZE)
    with pytest.raises(ValueError, match="not a folder"):
        SubjectMasks.from_folder(tmp_path / "nope", FRAMES, SIZE)


def test_save_and_load_under_masks(tmp_path):
    masks = SubjectMasks.from_mapping(given(), FRAMES, SIZE)
    folder = masks.save(tmp_path)
    assert folder == tmp_path / "masks"
    # frame 2 shows two characters: each one's own mask as well, so bounded attention reads them back
    names = ["mask_000.png", "mask_001.png", "mask_002.png", *(f"mask_002_{c}.png" for c in FRAMES[2])]
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert SubjectMasks.load(tmp_path, FRAMES, SIZE).digest() == masks.digest()
    with Image.open(folder / "mask_001.png") as image:
        assert image.size == (128, 128)  # at the image's size: eval --mask-dir reads it as is
    loaded = SubjectMasks.load(tmp_path, FRAMES, SIZE)
    for frame in range(3):
        for tokens in (256, 64):
            assert torch.equal(loaded.subject_tokens(frame, tokens), masks.subject_tokens(frame, tokens))
    # eval's reader sees the same files
    seen = MaskDir(folder)(Image.new("RGB", (128, 128)), 0, "Bob")
    assert np.array_equal(np.asarray(seen) >= 128, box(SIZE, 0, 0, 64, 64).numpy())
