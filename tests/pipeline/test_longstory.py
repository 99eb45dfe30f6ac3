"""Long stories: window mode, chunked denoising, the tiled variant, checkpoints and resume."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from helpers import Case, make_inputs
from story_helpers import (
    KILL_AFTER_FIRST_CHECKPOINT,
    MIN_RELATIVE_CHANGE,
    AllocationTracker,
    read_frames,
    recorded_latents,
    relative_change,
    resumed_from_another_step,
    stacked,
)

from csa_kernels import consistent_attention, consistent_attention_reference
from csa_kernels.tiled import tile_starts, tiled_consistent_attention
from storydiff.cli import main
from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.state import ConsistencyState, LayerInfo
from storydiff.consistency.window import WindowMode
from storydiff.families.attach import (
    ConsistentAttnProcessor,
    apply_consistent_attention,
    remove_consistent_attention,
)
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.runs.checkpoint import CHECKPOINT
from storydiff.runs.plan import Checkpointing, RunPlan
from storydiff.runs.settings import RunSettings
from storydiff.runs.window_run import run_window

NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def window_plan(frames: int, chunk: int, steps: int = 3, active=None, seed: int = 0) -> RunPlan:
    settings = RunSettings(
        mode="window", num_inference_steps=steps, guidance_scale=5.0, chunk_size=chunk, seed=seed
    )
    prompts = [f"a man with a red scarf, scene {i}" for i in range(frames)]
    return RunPlan.from_prompts(prompts, settings, active=active)


def run(pipe, state, frames, chunk, steps=3, active=None):
    return run_window(pipe, state, window_plan(frames, chunk, steps, active), progress=False)


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd15"])
def windowed(request):
    pipe = build_tiny_pipeline(request.param, progress_bar=False)
    state = apply_consistent_attention(pipe, ConsistencyConfig(window=2, seed=1, **NO_SKIP))
    yield pipe, state
    remove_consistent_attention(pipe)


def test_one_chunk_equals_the_unchunked_pipeline_exactly(windowed):
    """chunk_size >= frames: bit-identical to all frames in one diffusers pipeline call."""
    pipe, state = windowed
    frames, active = 6, [True, True, False, True, True, True]
    ours = run(pipe, state, frames, chunk=frames, active=active)
    assert torch.equal(ours, run(pipe, state, frames, chunk=50, active=active))

    state.begin(WindowMode(active, window=2))  # one chunk: the whole story
    unchunked = pipe(
        [f"a man with a red scarf, scene {i}" for i in range(frames)],
        negative_prompt=[""] * frames,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(i) for i in range(frames)],
        output_type="latent",
        callback_on_step_end=state.step_callback,
    ).images
    state.end()
    assert torch.equal(ours, unchunked)


def test_small_chunks_run_and_stay_close(windowed):
    pipe, state = windowed
    whole, chunked = run(pipe, state, 6, chunk=6), run(pipe, state, 6, chunk=2)
    relative = ((whole - chunked).norm() / whole.norm()).item()
    assert 0 < relative < 0.05, relative


def make_attention(window=1, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    layer = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", 0, 16)
    state = ConsistencyState(
        ConsistencyConfig(rate=0.5, window=window, **NO_SKIP), [layer], offload_bank=False
    )
    attn.set_processor(ConsistentAttnProcessor(state, layer))
    return attn, state, layer


def project(attn, hidden):
    return [
        x.view(hidden.shape[0], -1, 2, 16).transpose(1, 2)
        for x in (attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden))
    ]


def finish(attn, out):
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


def test_window_one_three_frames_matches_the_op():
    attn, state, layer = make_attention(window=1)
    hidden = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(2))
    state.begin(WindowMode([True, True, True], window=1))
    with torch.no_grad():
        ours = attn(hidden)
        ref_idx = state.frame_reference_indices(layer, range(3), (0, 20), hidden.device)
        q, k, v = project(attn, hidden)
        expected = finish(attn, consistent_attention(q, k, v, ref_idx, window=1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_chunks_see_only_neighbours_computed_at_this_step():
    """Forward sweep, chunks [0, 2) then [2, 3): frame 1 cannot see frame 2 yet; frame 2 sees frame 1."""
    attn, state, layer = make_attention(window=1)
    hidden = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(3))
    mode = WindowMode([True, True, True], window=1)
    state.begin(mode)
    with torch.no_grad():
        mode.begin_chunk(0, 2)
        first = attn(hidden[:2])
        mode.end_chunk()
        mode.begin_chunk(2, 3)
        second = attn(hidden[2:])
        ref_idx = state.frame_reference_indices(layer, range(3), (0, 20), hidden.device)
        q, k, v = project(attn, hidden)
        frame1 = consistent_attention_reference(q[:2], k[:2], v[:2], ref_idx[:2], window=1)
        frame2 = consistent_attention_reference(q[1:], k[1:], v[1:], ref_idx[1:], window=1)
    torch.testing.assert_close(first, finish(attn, frame1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, finish(attn, frame2[1:]), rtol=1e-5, atol=1e-6)


def test_peak_memory_does_not_grow_with_story_length():
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    state = apply_consistent_attention(pipe, ConsistencyConfig(window=1, **NO_SKIP))
    run(pipe, state, 2, chunk=1, steps=1)  # warm-up: lazy initialisations are not the story's memory

    def peak(frames, chunk):
        with AllocationTracker() as tracker:
            run(pipe, state, frames, chunk=chunk, steps=1)
        return tracker.peak

    short, long, unchunked = peak(3, 1), peak(9, 1), peak(9, 9)
    # what does grow: each frame's latents (4 x 16 x 16 floats) and each chunk's scheduler copy
    assert long - short <= 6 * (4 * 16 * 16 * 4 + 32 * 1024), (short, long)
    assert unchunked > 2 * long  # the measurement does see batch size


def test_tiled_variant_averages_tiles():
    inputs = make_inputs(Case(5, 2, 12, 8, 4), torch.float64)
    q, k, v, ref_idx = (inputs[key] for key in ("q", "k", "v", "ref_idx"))
    ours = tiled_consistent_attention(q, k, v, ref_idx, tile=3, stride=1)
    expected = torch.zeros_like(q)
    counts = torch.zeros(5)
    for start in tile_starts(5, 3, 1):
        frames = slice(start, start + 3)
        expected[frames] += consistent_attention_reference(
            q[frames], k[frames], v[frames], ref_idx[frames], upcast=False
        )
        counts[frames] += 1
    torch.testing.assert_close(ours, expected / counts[:, None, None, None], rtol=1e-10, atol=1e-10)
    assert (
        tile_starts(7, 3, 2) == [0, 2, 4]
        and tile_starts(8, 3, 2) == [0, 2, 4, 5]
        and tile_starts(2, 3, 1) == [0]
    )


STORY = "[Bob] a man with red hair, wearing a black suit\n---\n" + "".join(
    f"[Bob] scene {i} of the journey #part {i}\n" if i != 3 else "[NC] a quiet street\n" for i in range(7)
)


def generate(tmp_path, out, *extra):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--out", str(tmp_path / out)]
    return main([*args, "--mode", "window", "--window", "1", "--chunk-size", "3", *extra])


def test_window_mode_cli_and_tiled_option(tmp_path):
    assert generate(tmp_path, "a", "--steps", "3", "--checkpoint-every", "1") == 0
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert (
        meta["status"] == "complete"
        and meta["settings"]["mode"] == "window"
        and meta["consistency"]["window"] == 1
    )
    assert len(read_frames(tmp_path / "a")) == 7 and not (tmp_path / "a" / CHECKPOINT).exists()
    assert generate(tmp_path, "b", "--steps", "3", "--tile", "3") == 0
    assert len(read_frames(tmp_path / "b")) == 7


def test_kill_then_resume_gives_the_uninterrupted_frames(tmp_path):
    """A window run killed after its step-2 checkpoint resumes to the uninterrupted run's latents (and
    frames); mutation twin: the same checkpoint resumed as if written at step 3 moves them by at least
    MIN_RELATIVE_CHANGE (measured: 0.29)."""
    consistent = ["--warmup-steps", "0", "--no-skip"]  # every step reads the neighbours
    with recorded_latents() as whole_latents:
        assert generate(tmp_path, "whole", "--steps", "6", *consistent) == 0
    args = ["generate", "--model", "tiny-sd15", "--story", str(tmp_path / "story.txt")]
    args += ["--out", str(tmp_path / "killed"), "--mode", "window", "--window", "1", "--chunk-size", "3"]
    args += ["--steps", "6", "--checkpoint-every", "2", *consistent]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["step"] == 2
    meta = json.loads((tmp_path / "killed" / "metadata.json").read_text())
    assert meta["status"] == "running" and not list((tmp_path / "killed" / "frames").glob("*.png"))
    shutil.copytree(tmp_path / "killed", tmp_path / "misread")
    with recorded_latents() as resumed_latents:
        assert main(["generate", "--resume", str(tmp_path / "killed")]) == 0
    assert torch.equal(stacked(resumed_latents), stacked(whole_latents))
    resumed, whole = read_frames(tmp_path / "killed"), read_frames(tmp_path / "whole")
    assert len(resumed) == 7 and all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True))
    with recorded_latents() as misread_latents, resumed_from_another_step(+1):
        assert main(["generate", "--resume", str(tmp_path / "misread")]) == 0
    change = relative_change(stacked(misread_latents), stacked(whole_latents))
    assert change >= MIN_RELATIVE_CHANGE, change


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(windowed, tmp_path):
    pipe, state = windowed
    path = tmp_path / CHECKPOINT
    plan = window_plan(3, chunk=2, steps=2)
    run_window(pipe, state, plan, checkpointing=Checkpointing(path, every=1), progress=False)
    assert path.exists()
    resume = Checkpointing(path, resume=True)
    with pytest.raises(ValueError, match=r"different run .*seeds"):
        run_window(
            pipe, state, window_plan(3, chunk=2, steps=2, seed=5), checkpointing=resume, progress=False
        )
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        run_window(pipe, state, plan, checkpointing=resume, progress=False)


def test_resume_needs_an_unfinished_window_run(tmp_path, capsys):
    assert generate(tmp_path, "a", "--steps", "2") == 0
    assert main(["generate", "--resume", str(tmp_path / "a")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["generate", "--resume", str(tmp_path / "missing")]) == 2
