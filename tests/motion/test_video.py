"""Transition videos on tiny offline Stable Video Diffusion: per-frame cross-attention, files, CLI."""

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from storydiff.cli import main
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.models.loading import ModelLoadError, load_svd_pipeline
from storydiff.motion.conditioning import (
    PerFrameCrossAttnProcessor,
    PerFrameEmbeddingState,
    per_frame_conditioning,
    spatial_cross_attention_layers,
)
from storydiff.motion.story_video import read_story_frames, story_transitions
from storydiff.motion.transition import TransitionVideoPipeline
from storydiff.pages import video_io
from storydiff.pages.video_io import mp4_available, write_video
from storydiff.support.compat import progress_bar_config

SIZE, FRAMES, STEPS = 32, 6, 2
RUN = {"height": SIZE, "width": SIZE, "num_frames": FRAMES, "num_inference_steps": STEPS}


def noise_image(seed: int, size: int = SIZE) -> Image.Image:
    # Random pixels: any two such images have clearly different CLIP embeddings, even with random weights.
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def as_array(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.float32) for f in frames])


class RepeatStart(torch.nn.Module):
    """Stand-in predictor: every intermediate frame gets the start embedding."""

    def __init__(self, num_frames: int = FRAMES - 2, embed_dim: int | None = None, replace=None):
        super().__init__()
        self.config = SimpleNamespace(num_frames=num_frames, embed_dim=embed_dim)
        self.replace = replace or {}  # intermediate index → (1, T, C) embedding to put there instead

    def forward(self, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        out = start.unsqueeze(1).repeat(1, self.config.num_frames, 1, 1)
        for i, emb in self.replace.items():
            out[:, i] = emb
        return out


@pytest.fixture(scope="module")
def svd():
    return build_tiny_pipeline("tiny-svd", seed=0, progress_bar=False)


@pytest.fixture(scope="module")
def images():
    return noise_image(1), noise_image(2)


def stock_svd(svd, image, output_type="pil", **kw):
    settings = {**RUN, **kw}
    generator = torch.Generator("cpu").manual_seed(0)
    return svd(image, generator=generator, output_type=output_type, **settings).frames


# ---------------------------------------------------------------------------------------------- model


def test_tiny_svd_builds_offline_and_is_seeded():
    a, b, c = (build_tiny_pipeline("tiny-svd", seed=s, progress_bar=False) for s in (0, 0, 1))
    wa, wb, wc = (next(p.unet.parameters()) for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.image_encoder.config.projection_dim == a.unet.config.cross_attention_dim
    assert a.vae_scale_factor == 8
    assert load_svd_pipeline("tiny-svd", "cpu").unet.config == a.unet.config


def test_load_svd_pipeline_errors_name_the_model(tmp_path):
    missing = str(tmp_path / "no-such-svd")
    with pytest.raises(ModelLoadError, match="no-such-svd"):
        load_svd_pipeline(missing, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty"):
        load_svd_pipeline(str(tmp_path / "empty"), "cpu")


# ---------------------------------------------------------------------------------------------- processor


def test_only_spatial_cross_attention_is_swapped(svd):
    unet = svd.unet
    before = unet.attn_processors
    names = spatial_cross_attention_layers(unet)
    assert names and all(n.endswith("attn2.processor") and "temporal" not in n for n in names)
    # The tiny UNet has one spatio-temporal transformer per cross-attention level block and in the middle.
    assert len(names) == sum(n.endswith("attn2.processor") for n in before) // 2
    with per_frame_conditioning(unet, PerFrameEmbeddingState()) as swapped:
        during = unet.attn_processors
        assert swapped == names
        for name, proc in during.items():
            if name in names:
                assert isinstance(proc, PerFrameCrossAttnProcessor) and proc.processor is before[name]
            else:
                assert proc is before[name], name  # temporal blocks and self-attention keep SVD's own
    assert all(unet.attn_processors[n] is p for n, p in before.items())


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_processor_is_exact_with_svds_own_embedding(svd, cfg):
    """One UNet call: per-frame embeddings all equal to SVD's embedding give bit-identical output."""
    unet, frames = svd.unet, 4
    gen = torch.Generator().manual_seed(0)
    batch = 2 if cfg else 1
    sample = torch.randn(batch, frames, 8, 8, 8, generator=gen)
    emb = torch.randn(1, 1, unet.config.cross_attention_dim, generator=gen)
    ehs = torch.cat([torch.zeros_like(emb), emb]) if cfg else emb  # SVD's [uncond = zeros; cond]
    kwargs = {"encoder_hidden_states": ehs, "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * batch)}
    with torch.no_grad():
        stock = unet(sample, 500.0, **kwargs).sample
        state = PerFrameEmbeddingState()
        state.set(emb.expand(frames, 1, -1))  # (F, T=1, C)
        with per_frame_conditioning(unet, state):
            ours = unet(sample, 500.0, **kwargs).sample
            assert state.calls == len(spatial_cross_attention_layers(unet))
            # T = 2 equal tokens per frame: the uncond half is widened to 2 tokens; mathematically the same.
            state.set(emb.expand(frames, 2, -1))
            two_tokens = unet(sample, 500.0, **kwargs).sample
    assert torch.equal(ours, stock)
    torch.testing.assert_close(two_tokens, stock, rtol=1e-5, atol=1e-6)


def test_processor_rejects_mismatched_frames(svd):
    state = PerFrameEmbeddingState()
    state.set(torch.zeros(5, 1, svd.unet.config.cross_attention_dim))
    with pytest.raises(ValueError, match="num_frames and the embeddings must agree"):
        state.conditioning(torch.zeros(8, 1, svd.unet.config.cross_attention_dim))
    with pytest.raises(ValueError, match="channels"):
        state.conditioning(torch.zeros(10, 1, 7))


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_equal_embeddings_reproduce_stock_svd(svd, images, guidance):
    """All frames conditioned on SVD's own image embedding → exactly stock SVD's video for the same seed."""
    start = images[0]
    pipeline = TransitionVideoPipeline(svd, RepeatStart())
    ours = pipeline(start, start, seed=0, max_guidance_scale=guidance, **RUN)
    stock = stock_svd(svd, start, max_guidance_scale=guidance)[0]
    assert len(ours.frames) == FRAMES
    assert np.array_equal(as_array(ours.frames), as_array(stock))
    own = TransitionVideoPipeline(svd).encode_image(start)
    assert torch.equal(ours.embeddings, own[0].expand(FRAMES, -1, -1))


def test_one_frames_embedding_reaches_that_frame(svd, images):
    """Changing frame k's embedding changes frame k most (in latents); the video's pixels change there too."""
    start, other = images
    pipeline = TransitionVideoPipeline(svd)
    start_emb, other_emb = pipeline.encode_image(start), pipeline.encode_image(other)
    base = start_emb.unsqueeze(1).expand(1, FRAMES, 1, -1)
    state = PerFrameEmbeddingState()

    def latents(embeddings):
        state.set(embeddings)
        with per_frame_conditioning(svd.unet, state):
            return stock_svd(svd, start, output_type="latent")

    reference = latents(base)
    assert torch.equal(reference, stock_svd(svd, start, output_type="latent"))
    for k in range(1, FRAMES - 1):
        changed = base.clone()
        changed[:, k] = other_emb
        diff = (latents(changed) - reference).abs().mean(dim=(0, 2, 3, 4))
        # Temporal attention and convolutions spread the change to neighbours, but it peaks at frame k.
        assert int(diff.argmax()) == k, diff
        assert diff[k] > 2 * diff[0], diff

    k = 2
    video = TransitionVideoPipeline(svd, RepeatStart(replace={k - 1: other_emb}))(start, start, seed=0, **RUN)
    pixels = np.abs(as_array(video.frames) - as_array(stock_svd(svd, start)[0])).mean(axis=(1, 2, 3))
    # The temporal VAE decoder mixes neighbouring frames too, so in pixels only "frame k changed" is asserted.
    assert pixels[k] > 0.1, pixels


def test_transition_files_frames_and_determinism(svd, images, tmp_path):
    pipeline = TransitionVideoPipeline(svd)
    with pytest.warns(RuntimeWarning, match="imageio-ffmpeg") if not mp4_available() else nullcontext():
        result = pipeline(*images, seed=3, out_dir=tmp_path, name="clip", fps=5, **RUN)
    assert len(result.frames) == FRAMES and result.frames[0].size == (SIZE, SIZE)
    assert result.gif_path == tmp_path / "clip.gif"
    with Image.open(result.gif_path) as gif:
        assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE)
    if mp4_available():
        assert result.mp4_path is not None and result.mp4_path.stat().st_size > 0
    else:
        assert result.mp4_path is None and not (tmp_path / "clip.mp4").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # Linear interpolation without a predictor: the endpoints are the images' own embeddings.
    assert result.embeddings.shape == (FRAMES, 1, svd.image_encoder.config.projection_dim)
    mid = result.embeddings[1:-1]
    t = torch.arange(1, FRAMES - 1).view(-1, 1, 1) / (FRAMES - 1)
    torch.testing.assert_close(mid, result.embeddings[0] + t * (result.embeddings[-1] - result.embeddings[0]))
    again = pipeline(*images, seed=3, fps=5, **RUN)  # fps is one of SVD's conditions, so it must match too
    other_seed = pipeline(*images, seed=4, fps=5, **RUN)
    assert np.array_equal(as_array(result.frames), as_array(again.frames))
    assert not np.array_equal(as_array(result.frames), as_array(other_seed.frames))


def test_semantic_motion_predictor_drives_the_middle_frames(svd, images):
    from storydiff.motion.model import SemanticMotionPredictor

    dim = svd.image_encoder.config.projection_dim
    torch.manual_seed(0)
    predictor = SemanticMotionPredictor(embed_dim=dim, num_frames=FRAMES - 2, hidden_dim=32, num_layers=1)
    torch.nn.init.normal_(predictor.out_proj.weight, std=0.5)  # untrained it would equal interpolation
    result = TransitionVideoPipeline(svd, predictor)(*images, seed=0, **RUN)
    pipeline = TransitionVideoPipeline(svd)
    start, end = pipeline.encode_image(images[0]), pipeline.encode_image(images[1])
    with torch.no_grad():
        expected = predictor(start, end)[0]
    assert torch.equal(result.embeddings[0], start[0]) and torch.equal(result.embeddings[-1], end[0])
    torch.testing.assert_close(result.embeddings[1:-1], expected)
    # num_frames defaults to the predictor's frame count + 2
    assert len(TransitionVideoPipeline(svd, predictor)(*images, num_inference_steps=1, height=64).frames) == 6


def test_predictor_mismatch_is_a_clear_error(svd, images):
    dim = svd.image_encoder.config.projection_dim
    with pytest.raises(ValueError, match=r"predicts 5 intermediate frames.*needs 4 \(num_frames - 2\)"):
        TransitionVideoPipeline(svd, RepeatStart(num_frames=5, embed_dim=dim))(*images, **RUN)
    with pytest.raises(ValueError, match=r"works on 16-dim embeddings.*makes 32-dim"):
        TransitionVideoPipeline(svd, RepeatStart(embed_dim=16))(*images, **RUN)

    class WrongShape(torch.nn.Module):
        def forward(self, start, end):
            return start.unsqueeze(1)

    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 1, 32\), expected"):
        TransitionVideoPipeline(svd, WrongShape())(*images, **RUN)
    with pytest.raises(ValueError, match="num_frames must be >= 3"):
        TransitionVideoPipeline(svd)(*images, **{**RUN, "num_frames": 2})
    with pytest.raises(ValueError, match="multiples of 8"):
        TransitionVideoPipeline(svd)(*images, **{**RUN, "height": 60})


def test_processors_restored_after_call_and_after_error(svd, images, monkeypatch):
    before = svd.unet.attn_processors
    pipeline = TransitionVideoPipeline(svd)
    pipeline(*images, seed=0, **{**RUN, "num_inference_steps": 1})
    assert all(svd.unet.attn_processors[n] is p for n, p in before.items())
    assert pipeline.state.embeddings is None

    def boom(*args, **kwargs):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(svd, "decode_latents", boom)
    with pytest.raises(RuntimeError, match="decoder failed"):
        pipeline(*images, seed=0, **{**RUN, "num_inference_steps": 1})
    assert all(svd.unet.attn_processors[n] is p for n, p in before.items())
    assert pipeline.state.embeddings is None


# ---------------------------------------------------------------------------------------------- files


def test_gif_loops_forever_at_the_clips_fps(tmp_path):
    frames = [Image.new("L", (16, 8), 40 * i) for i in range(4)]  # not RGB: written as RGB all the same
    with pytest.warns(RuntimeWarning, match="imageio-ffmpeg") if not mp4_available() else nullcontext():
        gif, mp4 = write_video(frames, tmp_path, "clip", fps=5)
    assert gif == tmp_path / "clip.gif"
    with Image.open(gif) as im:
        assert (im.n_frames, im.size) == (4, (16, 8))
        assert im.info["loop"] == 0 and im.info["duration"] == 200  # forever, 1000 ms / 5 fps
        im.seek(3)
        assert im.convert("RGB").getpixel((0, 0)) == (120, 120, 120)
    if mp4_available():
        import imageio.v2 as imageio

        with imageio.get_reader(mp4) as reader:
            assert reader.get_meta_data()["fps"] == 5 and reader.count_frames() == 4
            assert reader.get_data(0).shape == (8, 16, 3)  # no macro-block rescaling
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"] + (["clip.mp4"] if mp4 else [])


def test_mp4_needs_its_packages_and_says_which(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "mp4_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="imageio and imageio-ffmpeg") as caught:
        gif, mp4 = write_video([noise_image(0, 8)] * 2, tmp_path, "clip", fps=7)
    assert len(caught) == 1 and gif.is_file() and mp4 is None
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize("kind", ["gif", "mp4"])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, kind):
    """The exporters write to a temporary path with the final suffix (PIL and ffmpeg pick the format from
    it); a write that fails half way leaves neither a file under the final name nor the temporary one, and
    an earlier file of that name keeps its content."""
    seen = []

    def half_written(frames, path, **kwargs):
        seen.append(path)
        Path(path).write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "mp4_available", lambda: True)
    monkeypatch.setattr(video_io, f"export_to_{'gif' if kind == 'gif' else 'video'}", half_written)
    if kind == "mp4":  # the GIF is written first, and fine
        monkeypatch.setattr(video_io, "export_to_gif", lambda frames, path, **_: Path(path).write_bytes(b"G"))
    earlier = tmp_path / f"clip.{kind}"
    earlier.write_bytes(b"earlier clip")
    with pytest.raises(OSError, match="disk full"):
        write_video([noise_image(0, 8)] * 2, tmp_path, "clip", fps=7)
    assert len(seen) == 1 and seen[0].endswith(f".{kind}") and Path(seen[0]).parent == tmp_path
    assert Path(seen[0]) != earlier and not Path(seen[0]).exists()
    assert earlier.read_bytes() == b"earlier clip"
    assert not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------------------------- stories


def fake_story(root, n=3, status="complete"):
    frames = root / "frames"
    frames.mkdir(parents=True)
    for i in range(n):
        noise_image(10 + i, size=80).save(frames / f"frame_{i:03d}.png")
    (root / "metadata.json").write_text(json.dumps({"status": status, "prompts": ["a"] * n}))
    return root


def test_story_transitions_writes_clips_and_story_video(svd, tmp_path, capsys):
    story, out = fake_story(tmp_path / "story"), tmp_path / "video"
    settings = {**RUN, "num_inference_steps": 2}
    result = story_transitions(story, out, svd, seed=5, fps=4, progress="lines", **settings)
    err = capsys.readouterr().err
    # For logs: one plain line per finished clip, naming it "clip i/N", and no bar's carriage returns.
    assert "transitions: clip 1/2 done (frame_000.png → frame_001.png" in err
    assert "transitions: clip 2/2 done (frame_001.png → frame_002.png" in err
    assert "\r" not in err
    assert [p.name for p in result.frame_paths] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert len(result.transitions) == 2
    for i, clip in enumerate(result.transitions):
        assert clip.gif_path == out / f"transition_{i:03d}.gif" and clip.gif_path.is_file()
        assert len(clip.frames) == FRAMES
    # Each clip but the last drops its final frame, so every story frame appears once.
    assert len(result.frames) == 2 * FRAMES - 1
    with Image.open(out / "story.gif") as gif:
        assert gif.n_frames == 2 * FRAMES - 1
    assert (out / "story.mp4").exists() == mp4_available()
    meta = json.loads((out / "video.json").read_text())
    assert [t["seed"] for t in meta["transitions"]] == [5, 6]
    # Clip i is the transition pipeline's clip from frame i to i+1 with seed + i.
    second = TransitionVideoPipeline(svd)(*result.frame_paths[1:], seed=6, fps=4, **settings)
    assert np.array_equal(as_array(second.frames), as_array(result.transitions[1].frames))


def test_story_progress_bar_is_labelled_per_clip(svd, tmp_path, capsys):
    story = fake_story(tmp_path / "story", n=3)
    settings = {**RUN, "num_inference_steps": 1, "num_frames": 3}
    before = progress_bar_config(svd)
    story_transitions(story, tmp_path / "bars", svd, progress="bar", **settings)
    err = capsys.readouterr().err
    assert "clip 1/2: 100%" in err and "clip 2/2: 100%" in err  # SVD's own bar, one per clip
    assert "transitions:" not in err
    assert progress_bar_config(svd) == before  # the pipeline's bar settings are its own again

    story_transitions(story, tmp_path / "quiet", svd, progress=False, **settings)
    assert capsys.readouterr().err == ""


def test_story_frames_from_plain_folder_and_bad_input(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("10.png", "2.png", "1.png"):
        noise_image(0, 16).save(plain / name)
    assert [p.name for p in read_story_frames(plain)] == ["1.png", "2.png", "10.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_story_frames(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"1 PNG frame.*at least 2"):
        read_story_frames(fake_story(tmp_path / "one", n=1))
    with pytest.warns(RuntimeWarning, match="status 'running'"):
        assert len(read_story_frames(fake_story(tmp_path / "running", n=2, status="running"))) == 2


# ---------------------------------------------------------------------------------------------- CLI


def test_video_cli(tmp_path, capsys):
    story = fake_story(tmp_path / "story", n=2)
    out = tmp_path / "out"
    args = ["--story-dir", str(story), "--out", str(out), "--svd", "tiny-svd", "--frames", "4"]
    args += ["--steps", "1"]

    assert main(["video", *args]) == 0  # through the `storydiff video` subcommand
    assert (out / "transition_000.gif").is_file() and (out / "story.gif").is_file()
    assert (out / "story.mp4").is_file() == mp4_available()
    captured = capsys.readouterr()
    out_text = captured.out
    assert "1 transition from 2 frames" in out_text
    # stderr is not a terminal here: a plain line per clip instead of a bar
    assert "transitions: clip 1/1 done" in captured.err and "\r" not in captured.err
    assert ("note: no MP4 encoder" in out_text) == (not mp4_available())

    args += ["--overwrite"]  # the calls below reuse the folder (a story video is not replaced without it)
    assert main(["video", *args[:1], str(tmp_path / "nope"), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "error: story folder" in err and "does not exist" in err
    assert main(["video", *args, "--predictor", str(tmp_path / "no-predictor")]) == 2
    assert "cannot load motion predictor" in capsys.readouterr().err
    assert main(["video", *args, "--size", "63x64"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["video", *args[:4], "--overwrite", "--svd", str(tmp_path / "no-svd")]) == 2
    assert "error: cannot load SVD model" in capsys.readouterr().err


def test_video_cli_with_saved_predictor(svd, tmp_path, capsys):
    from storydiff.motion.model import SemanticMotionPredictor

    story = fake_story(tmp_path / "story", n=2)
    dim = svd.image_encoder.config.projection_dim
    SemanticMotionPredictor(embed_dim=dim, num_frames=3, hidden_dim=32, num_layers=1).save_pretrained(
        tmp_path / "smp"
    )
    base = ["--story-dir", str(story), "--svd", "tiny-svd", "--steps", "1"]
    base += ["--predictor", str(tmp_path / "smp")]
    assert main(["video", *base, "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "transition_000.gif") as gif:
        assert gif.n_frames == 5  # predictor's 3 intermediate frames + start + end
    assert main(["video", *base, "--out", str(tmp_path / "bad"), "--frames", "6"]) == 2
    assert "predicts 3 intermediate frames" in capsys.readouterr().err


def test_compiled_predictor_is_used_when_asked(svd, images, monkeypatch):
    """The compiled path is chosen (GPU default; forced here) without a second real compile on CI."""
    import storydiff.motion.compiled as compiled
    from storydiff.motion.model import SemanticMotionPredictor

    dim = svd.image_encoder.config.projection_dim
    predictor = SemanticMotionPredictor(embed_dim=dim, num_frames=3, hidden_dim=32, num_layers=1)
    calls = []

    def fake_compile(model, *, batch_size, num_tokens):
        calls.append((batch_size, num_tokens))
        return model

    monkeypatch.setattr(compiled, "compile_predictor", fake_compile)
    assert TransitionVideoPipeline(svd, predictor).compile_predictor is False  # CPU: eager by default
    pipeline = TransitionVideoPipeline(svd, predictor, compile_predictor=True)
    start, end = pipeline.encode_image(images[0]), pipeline.encode_image(images[1])
    eager = TransitionVideoPipeline(svd, predictor).frame_embeddings(start, end, 5)
    assert torch.equal(pipeline.frame_embeddings(start, end, 5), eager)
    pipeline.frame_embeddings(start, end, 5)
    assert calls == [(1, 1)]  # compiled once per input shape, then reused
