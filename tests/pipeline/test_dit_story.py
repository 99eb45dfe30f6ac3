"""Stories on diffusion transformers (tiny FLUX, SD3.5, PixArt-Σ built offline): the step adapters follow
the stock pipelines exactly; bank mode, window mode, banks on disk, the CLI and resume work as on UNets."""

import json
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from story_helpers import (
    KILL_AFTER_FIRST_CHECKPOINT,
    MIN_RELATIVE_CHANGE,
    bank_of_the_previous_step,
    banks_swapped,
    read_frames,
    recorded_latents,
    relative_change,
    resumed_from_another_step,
    stacked,
)

from storydiff.cli import main
from storydiff.consistency.config import ConsistencyConfig
from storydiff.families.registry import family_of
from storydiff.families.reserved import TINY_DIT
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.pipeline import StoryDiffusionPipeline
from storydiff.runs.checkpoint import CHECKPOINT
from storydiff.runs.lockstep import LockstepDenoiser
from storydiff.runs.plan import RunPlan
from storydiff.runs.settings import RunSettings

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers #Alice at home
[Bob] and [Alice] have dinner #Dinner
[NC] a quiet street at night #Night falls
[Bob] reads a newspaper
"""
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}  # every step reads
PROMPTS = ["a man walks in the park", "a woman sings"]
# what the stock pipelines need to do exactly what a story does (tiny tokenizers hold 77 tokens)
STOCK = {
    "tiny-flux": {"max_sequence_length": 77},
    "tiny-sd3": {"max_sequence_length": 77, "negative_prompt": ["", ""]},
    "tiny-pixart": {
        "max_sequence_length": 77,
        "negative_prompt": ["", ""],
        "use_resolution_binning": False,
        "clean_caption": False,
    },
}


@pytest.fixture(scope="module", params=TINY_DIT)
def dit(request):
    return request.param, build_tiny_pipeline(request.param, progress_bar=False)


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


def story_run(pipe, rate=0.5, **settings):
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=rate, seed=2, **NO_SKIP))
    try:
        return sp(STORY, **{"num_inference_steps": 3, "progress": False, "seed": 5, **settings})
    finally:
        sp.close()


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["guidance1", "guidance4"])
def test_steps_equal_the_stock_pipeline(dit, guidance):
    """Latents bit-exact and decoded images equal to the diffusers pipeline's own call (FLUX: guidance is
    the embedding; SD3 and PixArt: CFG on at 4, off at 1)."""
    name, pipe = dit
    side = family_of(pipe).default_size
    seeds = [3, 4]
    stock = pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=side,
        width=side,
        output_type="latent",
        **STOCK[name],
    ).images
    settings = RunSettings(
        num_inference_steps=3, guidance_scale=guidance, height=side, width=side, seed=seeds[0]
    )
    assert RunPlan.from_prompts(PROMPTS, settings).seeds == seeds
    ours = LockstepDenoiser(pipe, RunPlan.from_prompts(PROMPTS, settings))
    for step in range(3):
        ours.step([0, 1], step)
    assert torch.equal(ours.latents, stock)
    if guidance > 1:  # decoding as the stock pipeline decodes (one level of batch rounding allowed)
        stock_image = pipe(
            PROMPTS[:1],
            num_inference_steps=3,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seeds[0]),
            height=side,
            width=side,
            **{**STOCK[name], **({"negative_prompt": [""]} if "negative_prompt" in STOCK[name] else {})},
        ).images[0]
        decoded = np.asarray(ours.family.decode(ours.latents[0], side, side)).astype(int)
        assert np.abs(decoded - np.asarray(stock_image).astype(int)).max() <= 1


def story_latents(pipe, **settings):
    """(the run's result, the latents of its frames in story order)."""
    with recorded_latents() as latents:
        result = story_run(pipe, **settings)
    return result, stacked(latents)


# max |Δ| / max |latent| of the mutation twins below (1 torch thread)
MARGINS = {
    "tiny-flux": {"other character's bank": 1.6e-3, "previous step's bank": 1.2e-3, "rate 0": 4.1e-3},
    "tiny-sd3": {"other character's bank": 7.3e-3, "previous step's bank": 5.2e-3, "rate 0": 1.2e-2},
    "tiny-pixart": {"other character's bank": 8.4e-3, "previous step's bank": 2.5e-3, "rate 0": 7.3e-3},
}


def sharp_pixart_scheduler(scheduler):
    """Tiny PixArt-Σ's DPM-Solver++ with "leading" timesteps and SD's scaled-linear betas: with its own
    (linspace over linear betas: 999, 666, 333) every read sees a noisy latent whose tokens barely change
    from step to step, and a bank of the previous step moves the latents by 1.3e-4 only; "leading" ends
    at t = 0, where a step's tokens differ from the previous step's."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        scheduler.config,
        timestep_spacing="leading",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    )


# the sampler and settings of each family's bank test (others: its own, three steps); PixArt-Σ: two steps,
# both reading the banks (each run cheaper than at three, paying for the previous-step twin's run)
SHARP_SCHEDULER = {"tiny-pixart": sharp_pixart_scheduler}
SHARP = {"tiny-pixart": {"num_inference_steps": 2}}


@contextmanager
def scheduler_for_the_bank_test(name, pipe):
    """``pipe`` with ``SHARP_SCHEDULER[name]`` (if any) inside the block, with its own after."""
    own = pipe.scheduler
    if name in SHARP_SCHEDULER:
        pipe.scheduler = SHARP_SCHEDULER[name](own)
    try:
        yield
    finally:
        pipe.scheduler = own


def test_bank_schedules_agree_and_consistency_acts(dit):
    """Lockstep == stored bit-exact in latents and frames (banks of image tokens only; every step reads
    them), and sharing changes the frames. Mutation twins: the other character's bank, the previous step's
    bank and rate 0 move the latents by at least MIN_RELATIVE_CHANGE (measured: MARGINS)."""
    name, pipe = dit
    sharp = SHARP.get(name, {})
    with scheduler_for_the_bank_test(name, pipe):
        lockstep, reference = story_latents(pipe, id_frames=1, bank_schedule="lockstep", **sharp)
        stored, stored_latents = story_latents(pipe, id_frames=1, bank_schedule="stored", **sharp)
        assert torch.equal(stored_latents, reference)
        assert np.array_equal(pixels(lockstep), pixels(stored))
        assert lockstep.bank_bytes == stored.bank_bytes and all(stored.bank_bytes.values())
        assert lockstep.metadata["bank_peak_bytes"] < stored.metadata["bank_peak_bytes"]
        plain, plain_latents = story_latents(pipe, rate=0.0, id_frames=1, **sharp)
        changed = np.abs(pixels(lockstep).astype(int) - pixels(plain).astype(int)).max(axis=(1, 2, 3))
        # frames 0 and 1 write the banks alone (one identity frame each: nothing to borrow, so stock), 2 and
        # 4 read them; the [NC] frame 3 reads nothing (batch rounding only)
        assert changed[[0, 1]].max() == 0 and changed[[2, 4]].min() > 0 and changed[3] <= 1, changed
        with banks_swapped():
            _, swapped = story_latents(pipe, id_frames=1, bank_schedule="lockstep", **sharp)
        with bank_of_the_previous_step():
            _, previous = story_latents(pipe, id_frames=1, bank_schedule="lockstep", **sharp)
    mutants = {"other character's bank": swapped, "previous step's bank": previous, "rate 0": plain_latents}
    for what, mutant in mutants.items():
        change = relative_change(mutant, reference)
        assert change >= MIN_RELATIVE_CHANGE, (what, change)


def test_rate_zero_story_equals_stock_frames(dit):
    """With nothing shared, every story frame is the stock pipeline's image for its prompt and seed (up to
    one level of rounding: the story batches frames differently)."""
    name, pipe = dit
    result = story_run(pipe, rate=0.0, id_frames=1)
    prompts, negatives = result.metadata["prompts"], result.metadata["negative_prompts"]
    stock_kwargs = {k: v for k, v in STOCK[name].items() if k != "negative_prompt"}
    if "negative_prompt" in STOCK[name]:
        stock_kwargs["negative_prompt"] = negatives
    stock = pipe(
        prompts,
        num_inference_steps=3,
        guidance_scale=result.metadata["settings"]["guidance_scale"],
        generator=[torch.Generator().manual_seed(s) for s in result.metadata["frame_seeds"]],
        output_type="np",
        **stock_kwargs,
    ).images
    difference = np.abs(pixels(result).astype(int) - np.round(stock * 255).astype(int))
    assert difference.max() <= 1


def test_window_mode_chunks(dit):
    """Window mode on a transformer: chunks of 2 (neighbours across a boundary seen on alternate steps)
    stay close to one chunk but differ from it."""
    _, pipe = dit
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.5, window=1, seed=2, **NO_SKIP))
    try:
        run = {"num_inference_steps": 3, "progress": False, "seed": 5, "mode": "window"}
        whole, chunked = sp(STORY, chunk_size=5, **run), sp(STORY, chunk_size=2, **run)
    finally:
        sp.close()
    difference = np.abs(pixels(whole).astype(int) - pixels(chunked).astype(int))
    assert 0 < difference.mean() < 8


def test_banks_travel_within_a_family_only(tmp_path):
    """A FLUX bank written by one story is read by the next; a model of another family refuses it."""
    flux = build_tiny_pipeline("tiny-flux", progress_bar=False)
    first = story_run(flux, id_frames=1, bank_schedule="stored", save_banks=True, out_dir=tmp_path / "a")
    bob = first.out_dir / "banks" / "Bob.safetensors"
    assert bob.is_file()
    sp = StoryDiffusionPipeline(flux, ConsistencyConfig(rate=0.5, seed=2, **NO_SKIP))
    try:
        assert sp.load_bank(bob) == "Bob"
        again = sp("---\n[Bob] rides a horse\n[Bob] sleeps", num_inference_steps=3, progress=False)
        assert again.metadata["loaded_banks"]["Bob"]["path"] == str(bob.resolve())
    finally:
        sp.close()
    sd3 = StoryDiffusionPipeline(build_tiny_pipeline("tiny-sd3", progress_bar=False), ConsistencyConfig())
    try:
        with pytest.raises(ValueError, match="architecture"):
            sd3.load_bank(bob)
    finally:
        sd3.close()


@pytest.mark.parametrize("model", TINY_DIT)
def test_cli_end_to_end(model, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", model, "--story", str(story), "--steps", "2", "--id-frames", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    a = read_frames(tmp_path / "a")
    assert len(a) == 5
    if model == "tiny-flux":  # same seed, same PNGs (each family's seeding is the same code path)
        assert main([*args, "--out", str(tmp_path / "b")]) == 0
        assert all(np.array_equal(x, y) for x, y in zip(a, read_frames(tmp_path / "b"), strict=True))
    metadata = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert metadata["status"] == "complete" and metadata["model"] == model
    assert metadata["captions"][3] == "Night falls" and (tmp_path / "a" / "pages" / "page_000.png").is_file()


def test_cli_flux_rope_policy(tmp_path):
    """--rope shift reaches the FLUX processors (frames that read banks change) and the metadata."""
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-flux", "--story", str(story), "--steps", "3", "--id-frames", "1"]
    args += ["--no-skip"]
    assert main([*args, "--out", str(tmp_path / "source")]) == 0
    assert main([*args, "--out", str(tmp_path / "shift"), "--rope", "shift"]) == 0
    metadata = json.loads((tmp_path / "shift" / "metadata.json").read_text())
    assert metadata["consistency"]["rope"] == "shift"
    source, shifted = read_frames(tmp_path / "source"), read_frames(tmp_path / "shift")
    assert np.array_equal(source[0], shifted[0])  # an identity frame alone borrows nothing
    assert not np.array_equal(source[2], shifted[2])  # Bob and Alice's dinner reads both banks


def test_cli_flux_window_kill_and_resume(tmp_path):
    """A FLUX window run killed after its step-2 checkpoint resumes to the uninterrupted run's latents (and
    frames); mutation twin: the same checkpoint resumed as if written at step 3 moves them by at least
    MIN_RELATIVE_CHANGE (measured: 0.17)."""
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-flux", "--story", str(story), "--steps", "4", "--mode", "window"]
    args += ["--chunk-size", "2", "--window", "1", "--warmup-steps", "0", "--no-skip"]
    with recorded_latents() as whole_latents:
        assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, *args, "--out", str(killed)]
    proc = subprocess.run([*command, "--checkpoint-every", "2"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(killed / CHECKPOINT, weights_only=False)["step"] == 2
    shutil.copytree(killed, tmp_path / "misread")
    with recorded_latents() as resumed_latents:
        assert main(["generate", "--resume", str(killed)]) == 0
    assert torch.equal(stacked(resumed_latents), stacked(whole_latents))
    resumed, whole = read_frames(killed), read_frames(tmp_path / "whole")
    assert len(resumed) == 5 and all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True))
    with recorded_latents() as misread_latents, resumed_from_another_step(+1):
        assert main(["generate", "--resume", str(tmp_path / "misread")]) == 0
    change = relative_change(stacked(misread_latents), stacked(whole_latents))
    assert change >= MIN_RELATIVE_CHANGE, change


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "tiny-svd"], "'tiny-svd' is a video model"),
        (["--model", "tiny-flux", "--layers", "up"], "--layers 'up' is not a preset of flux denoisers"),
        (["--model", "tiny-sd3", "--rope", "shift"], "--rope applies to RoPE hosts only (FLUX, Qwen-Image)"),
        (["--model", "tiny-flux", "--height", "72"], "height must be a multiple of 16 pixels for flux"),
    ],
    ids=["video-model", "preset-of-another-family", "rope-without-rope", "size"],
)
def test_cli_bad_input_is_one_line(extra, message, tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    out = tmp_path / "out"
    args = ["generate", "--story", str(story), "--out", str(out), "--steps", "2", "--id-frames", "1"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_pipeline_of_another_kind_is_refused():
    svd = build_tiny_pipeline("tiny-svd", progress_bar=False)
    with pytest.raises(ValueError, match=r"stories run on StableDiffusionPipeline.* got StableVideo"):
        StoryDiffusionPipeline(svd, ConsistencyConfig())


def test_cli_runs_a_local_pipeline_folder(tmp_path):
    """Real checkpoints load with from_pretrained from a folder; the family comes from the pipeline class."""
    build_tiny_pipeline("tiny-flux", progress_bar=False).save_pretrained(tmp_path / "flux")
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", str(tmp_path / "flux"), "--story", str(story)]
    args += ["--out", str(tmp_path / "o")]
    # a saved FluxPipeline's default size is FLUX's 1024²: ask for the tiny model's 64²
    assert main([*args, "--steps", "2", "--id-frames", "1", "--height", "64", "--width", "64"]) == 0
    frames = read_frames(tmp_path / "o")
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
