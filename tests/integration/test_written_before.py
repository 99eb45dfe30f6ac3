"""Files written before the house was restructured (issue "The house, second pass", at 886e112) still
resume and load: a window-mode run killed after its first checkpoint, a finished bank-mode run's
metadata.json, and a character's bank (``tests/data/before_house``, made with the CLI on tiny-sd15 from
``story.txt``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from story_helpers import (
    MIN_RELATIVE_CHANGE,
    read_frames,
    recorded_latents,
    relative_change,
    resumed_from_another_step,
    stacked,
)

from storydiff.cli import main

BEFORE = Path(__file__).resolve().parents[1] / "data" / "before_house"
STORY = BEFORE / "story.txt"


def test_a_checkpoint_from_before_resumes_to_the_uninterrupted_frames(tmp_path: Path) -> None:
    """The resumed run's latents (and frames) are the uninterrupted run's; mutation twin: the same
    checkpoint resumed as if written at step 3 (not 2) moves them by at least MIN_RELATIVE_CHANGE
    (measured: 0.20)."""
    killed = tmp_path / "killed"
    shutil.copytree(BEFORE / "window-killed", killed)
    shutil.copytree(BEFORE / "window-killed", tmp_path / "misread")
    with recorded_latents() as resumed_latents:
        assert main(["generate", "--resume", str(killed)]) == 0
    args = ["generate", "--model", "tiny-sd15", "--story", str(STORY), "--out", str(tmp_path / "whole")]
    args += ["--mode", "window", "--window", "1", "--chunk-size", "2", "--steps", "4"]
    with recorded_latents() as whole_latents:
        assert main(args) == 0
    assert torch.equal(stacked(resumed_latents), stacked(whole_latents))
    resumed, whole = read_frames(killed), read_frames(tmp_path / "whole")
    assert len(resumed) == 5 and all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True))
    assert json.loads((killed / "metadata.json").read_text())["status"] == "complete"
    with recorded_latents() as misread_latents, resumed_from_another_step(+1):
        assert main(["generate", "--resume", str(tmp_path / "misread")]) == 0
    change = relative_change(stacked(misread_latents), stacked(whole_latents))
    assert change >= MIN_RELATIVE_CHANGE, change


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_a_bank_from_before_loads_and_equals_one_written_now(tmp_path: Path) -> None:
    args = ["generate", "--model", "tiny-sd15", "--story", str(STORY), "--out", str(tmp_path / "now")]
    args += ["--bank-schedule", "stored", "--save-banks", "--steps", "2"]
    assert main(args) == 0
    old, new = (
        _tensors(BEFORE / "bank-stored/banks/Alice.safetensors"),
        _tensors(tmp_path / "now/banks/Alice.safetensors"),
    )
    assert sorted(old) == sorted(new) and all(torch.equal(old[k], new[k]) for k in old)
    story = tmp_path / "reads.txt"
    story.write_text("[Alice] rides a bicycle\n[Alice] reads a book\n")
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--out", str(tmp_path / "reads")]
    args += ["--load-bank", str(BEFORE / "bank-stored/banks/Alice.safetensors"), "--steps", "2"]
    assert main(args) == 0
    assert len(read_frames(tmp_path / "reads")) == 2


@pytest.mark.parametrize("folder", ["bank-stored", "window-killed"])
def test_metadata_from_before_reads(folder: str) -> None:
    from storydiff.pages.record import StoryRecord

    record = StoryRecord.read(BEFORE / folder / "metadata.json")
    assert record.format_version == 1 and record.model == "tiny-sd15" and len(record.prompts) == 5
