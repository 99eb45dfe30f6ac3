"""The 8-bit attention path through the story stack (issue #25, item 4): ``ConsistencyConfig.attn_precision``
and ``storydiff generate --attn-precision``.

* Layer level: a one-step story (identity frames writing a bank jointly, a frame reading it) on tiny-sd15
  (UNet) and tiny-flux with "int8" moves the latents (the path ran) but stays within a stated relative error
  of "native", and every consistent call of the op got the run's precision.
* CLI: an int8 window-mode run, stopped after its first checkpoint and resumed, records int8 under the
  consistency block and runs its remaining steps with int8; a bad value is refused with exit 2 before
  anything is written; the tiled window form runs int8 tile by tile.
* A CUDA GPU older than compute capability 8.0 (the Triton kernel's int8 needs integer MMA) is refused in
  one line before the output folder exists (the GPU is monkeypatched: these tests run on CPUs).
* A record written before the setting existed resumes as "native".
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from story_helpers import recorded_latents, relative_change, stacked

import storydiff.consistency.config as config_module
import storydiff.consistency.modes as modes
import storydiff.consistency.window as window
import storydiff.models.loading
import storydiff.runs.lockstep as lockstep
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import build_parser, main
from storydiff.cli.generate import _from_resume
from storydiff.consistency.config import InvalidSetting
from storydiff.families.registry import family_of
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.pages.record import StoryRecord
from storydiff.pages.story import parse_story, story_source
from storydiff.runs.settings import RunSettings

STORY = "[Bob] a man with red hair\n---\n[Bob] walks\n[Bob] reads\n[Bob] sleeps\n"
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
# max |int8 - native| / max |native| of the latents after one step (relative_change), measured on a CPU
# (torch path, float32, this story, seed 1, one thread): tiny-sd15 4.2e-6, tiny-flux 6.7e-5 — about 1.5 % of
# what consistency itself does to them (rate 0.5 vs 0: 2.9e-4, 4.4e-3; the random-weight stand-ins' attention
# moves their latents little). Bounds about 3.5x those: a path that drops the borrowed keys (the rate-0
# numbers) or quantizes coarser (4-bit codes, INT8_MAX = 7: 8.5e-5, 1.0e-3) fails them. Smoothing does not
# show here (unsmoothed 3.9e-6, 6.2e-5): these keys have no outlier channels; tests/ops/test_int8.py
# checks it on inputs that have them.
BOUNDS = {"tiny-sd15": 1.5e-5, "tiny-flux": 2.5e-4}


def spy_precisions(monkeypatch) -> list[tuple[str, str | None]]:
    """Record (call kind, the precision passed) for every call of the op from the consistency modes:
    "joint" (identity frames borrowing from each other), "read" (a bank read), "window" (neighbours)."""
    calls = []
    for module, kind in ((modes, "joint"), (window, "window")):
        real = module.consistent_attention

        def spy(*args, _real=real, _kind=kind, **kwargs):
            named = "read" if kwargs.get("bank_k") is not None else _kind
            calls.append((named, kwargs.get("precision")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "consistent_attention", spy)
    return calls


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-flux"])
def test_int8_reaches_every_call_and_stays_close_to_native(monkeypatch, name):
    """Two identity frames write a bank jointly and a third reads it, in one step: int8 changes the latents
    (the path ran: the quantized scores are not the native ones) by less than ``BOUNDS`` (measured
    relative change: tiny-sd15 4.2e-6, tiny-flux 6.7e-5; bounds 1.5e-5, 2.5e-4); every call of the op,
    joint and read, was given the run's precision."""
    pipe = build_tiny_pipeline(name, progress_bar=False)
    calls = spy_precisions(monkeypatch)
    latents, kinds = {}, {}
    for precision in ("native", "int8"):
        sp = StoryDiffusionPipeline(
            pipe, ConsistencyConfig(rate=0.5, seed=1, attn_precision=precision, **NO_SKIP)
        )
        try:
            with recorded_latents() as recorded:
                result = sp(
                    STORY,
                    num_inference_steps=1,
                    height=SIDE,
                    width=SIDE,
                    id_frames=2,
                    style="none",
                    progress=False,
                )
        finally:
            sp.close()
        latents[precision] = stacked(recorded)
        kinds[precision] = {kind for kind, _ in calls}
        assert {given for _, given in calls} == {precision}, calls
        recorded_precision = result.metadata["consistency"].get("attn_precision", "native")
        assert recorded_precision == precision
        calls.clear()
    assert kinds["int8"] == kinds["native"] == {"joint", "read"}
    change = relative_change(latents["int8"], latents["native"])
    assert 0 < change < BOUNDS[name], change


@pytest.mark.parametrize("mode", ["bank", "window"])
def test_a_run_that_borrows_nothing_stays_native(monkeypatch, mode):
    """Rate 0: bank reads still call the op (with a bank of 0 tokens), window frames too (with a pool of
    0 rows); int8 would quantize their own attention, so they get "native" and the latents are the native
    run's bit for bit (mutation: passing the run's precision there changes them)."""
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    calls = spy_precisions(monkeypatch)
    latents = {}
    for precision in ("native", "int8"):
        sp = StoryDiffusionPipeline(
            pipe, ConsistencyConfig(rate=0.0, seed=1, attn_precision=precision, **NO_SKIP)
        )
        try:
            with recorded_latents() as recorded:
                sp(
                    STORY,
                    mode=mode,
                    num_inference_steps=1,
                    height=SIDE,
                    width=SIDE,
                    style="none",
                    progress=False,
                )
        finally:
            sp.close()
        latents[precision] = stacked(recorded)
    assert calls and {given for _, given in calls} == {"native"}, calls
    assert torch.equal(latents["int8"], latents["native"])


def run_cli(tmp_path, out: str, *extra: str) -> int:
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "2", "--style", "none"]
    args += ["--height", str(SIDE), "--width", str(SIDE), "--rate", "0.5", "--warmup-steps", "0", "--no-skip"]
    return main([*args, *extra, "--out", str(tmp_path / out)])


def test_cli_int8_window_run_records_it_and_resumes_with_it(tmp_path, monkeypatch):
    """``--attn-precision int8`` in window mode, stopped after its first checkpoint (as Ctrl-C stops it,
    exit 130) then ``--resume``d: the record says int8 under ``consistency`` before and after, the
    checkpoint matches (the resumed run rebuilt the same config), and the resumed step's neighbour reads
    ran int8."""
    save = lockstep.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(lockstep, "save_checkpoint", save_then_stop)
    window_run = ("--mode", "window", "--checkpoint-every", "1", "--attn-precision", "int8")
    assert run_cli(tmp_path, "run", *window_run) == 130
    metadata = tmp_path / "run" / "metadata.json"
    assert json.loads(metadata.read_text())["consistency"]["attn_precision"] == "int8"
    monkeypatch.setattr(lockstep, "save_checkpoint", save)
    calls = spy_precisions(monkeypatch)
    assert main(["generate", "--resume", str(tmp_path / "run")]) == 0
    assert calls and set(calls) == {("window", "int8")}  # the second step only: the first was checkpointed
    record = json.loads(metadata.read_text())
    assert record["status"] == "complete" and record["consistency"]["attn_precision"] == "int8"
    assert len(list((tmp_path / "run" / "frames").glob("frame_*.png"))) == 3


@pytest.fixture
def no_model(monkeypatch):
    refuse = lambda *a, **k: pytest.fail("a model was loaded")  # noqa: E731
    monkeypatch.setattr(storydiff.models.loading, "load_pipeline", refuse)


def test_bad_values_are_refused_before_anything_loads(tmp_path, capsys, no_model):
    """A value that is not a precision (argparse: its one error line under the usage) exits 2 without a
    model or a folder; the library names the field."""
    assert run_cli(tmp_path, "bad", "--attn-precision", "int4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--attn-precision" in err[-1] and "'int4'" in err[-1] and "invalid choice" in err[-1]
    assert not (tmp_path / "bad").exists()
    for bad in ("fp8", None, "INT8"):
        with pytest.raises(InvalidSetting) as info:
            ConsistencyConfig(attn_precision=bad)
        assert info.value.field == "attn_precision" and repr(bad) in info.value.problem


def test_the_tiled_window_form_takes_int8(monkeypatch):
    """The paper's tiled form (``tile``) passes the precision to every tile's call."""
    import csa_kernels.tiled as tiled

    seen = []
    call = tiled.consistent_attention
    monkeypatch.setattr(
        tiled, "consistent_attention", lambda *a, **k: seen.append(k["precision"]) or call(*a, **k)
    )
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    config = ConsistencyConfig(tile=2, attn_precision="int8", seed=1, warmup_steps=0, skip_prob_early=0.0)
    sp = StoryDiffusionPipeline(pipe, config)
    try:
        sp(STORY, mode="window", num_inference_steps=1, height=64, width=64, progress=False)
    finally:
        sp.close()
    assert seen and set(seen) == {"int8"}


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """Make the check see a CUDA GPU of ``capability`` with Triton installed (the kernel would run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(config_module, "TRITON_INSTALLED", True)


def test_a_pre_ampere_gpu_is_refused_before_the_output_folder_exists(tmp_path, capsys, monkeypatch):
    """int8 on a GPU of compute capability 7.5 (the family's device made CUDA, the weights stay on the CPU):
    one line naming the flag from the CLI, InvalidSetting naming the field from Python, no folder. 8.0+,
    the CPU and native pass the check."""
    fake_gpu(monkeypatch, (7, 5))
    int8 = ConsistencyConfig(attn_precision="int8")
    with pytest.raises(InvalidSetting, match=r"compute capability 8\.0\+ .*cuda is 7\.5") as info:
        int8.check_device("cuda")
    assert info.value.field == "attn_precision"
    int8.check_device("cpu")  # the torch path runs it anywhere
    ConsistencyConfig().check_device("cuda")  # native runs on any GPU
    family = type(family_of(build_tiny_pipeline("tiny-sd15", progress_bar=False)))
    monkeypatch.setattr(family, "device", property(lambda self: torch.device("cuda")))
    capsys.readouterr()
    assert run_cli(tmp_path, "old-gpu", "--device", "cpu", "--attn-precision", "int8") == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: --attn-precision int8 needs a GPU of compute capability 8.0+")
        and "\n" not in err
    )
    assert not (tmp_path / "old-gpu").exists()
    fake_gpu(monkeypatch, (8, 0))
    int8.check_device("cuda")


def test_a_record_without_the_setting_resumes_as_native(tmp_path):
    """metadata.json written before ``attn_precision`` existed (its consistency block lacks the key): a
    resume rebuilds the config as native, what such runs computed. A native run records that same block
    (so checkpoints written before still match: tests/integration/test_written_before.py resumes one);
    int8 is recorded and read back."""
    consistency = ConsistencyConfig(window=2).to_dict()
    assert "attn_precision" not in consistency
    assert set(consistency) == {f for f in ConsistencyConfig.__dataclass_fields__ if f != "attn_precision"}
    story = parse_story(STORY)
    record = StoryRecord(
        model="tiny-sd15",
        story_text=story_source(story),
        settings=RunSettings(mode="window", num_inference_steps=2, checkpoint_every=1).to_dict(),
        consistency=consistency,
        status="interrupted",
    )
    (tmp_path / "old").mkdir()
    record.write(tmp_path / "old")
    args = build_parser().parse_args(["generate", "--resume", str(tmp_path / "old")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no checkpoint in the folder: the resume would start over
        job = _from_resume(args)
    assert job.config.attn_precision == "native" and job.config.window == 2
    int8 = ConsistencyConfig(attn_precision="int8")
    assert int8.to_dict()["attn_precision"] == "int8"
    assert ConsistencyConfig.from_dict(json.loads(json.dumps(int8.to_dict()))) == int8
    assert ConsistencyConfig.from_dict(consistency) == ConsistencyConfig(window=2)
