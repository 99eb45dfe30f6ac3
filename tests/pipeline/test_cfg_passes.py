"""True CFG as two denoiser calls per step (issue #22, item 9a; how Qwen-Image and Wan guide).

A two-pass family (``Family.cfg_passes = 2``) calls the denoiser once for the cond frames, then once for
the uncond frames, and tells the consistency state which CFG group each call computes
(``ConsistencyState.cfg_pass``). Every mode must then do for each pass exactly what it does for that half of
a batched [uncond; cond] call. Checked here on tiny-sd15, whose ``UNetFamily`` runs its CFG as two calls
when ``cfg_passes`` is 2 (set only by these tests):

* attention level: each mode (write, read, window over three chunks) gives the batched halves and banks;
* stories: bank mode (lockstep and stored schedules) and window mode (three chunks, so the boundary cache
  is used; and over two ranks, so halos are exchanged per pass) give the batched run's latents, and rate 0
  moves them far more; banks written either way are the same bank, and each kind of run reads the other's;
  at rate 0 two passes are the stock two-pass computation bit for bit.

Tolerance (``FLOAT_NOISE`` = 1e-4): a story's latents under two passes differ from batched ones only
because the UNet runs batches of N rows instead of 2N (its convolutions and matmuls sum in another order).
Measured here (torch 2.13, 1 thread, 32x32, 2 steps, guidance 5, latents up to |37|, where a float32 ulp
is 3.8e-6): max |Δ| 2.1e-5 to 2.5e-5 (bank mode, both schedules), 2.5e-5 (window mode), 2.6e-5 to
2.9e-5 (runs reading loaded banks), 2.3e-6 between the banks' tensors — and 2.6e-5 between two-pass and
batched runs at rate 0, where no consistency is involved: the same batch-shape noise, ~7 ulps after two
guided steps; 4.8e-6 for two ranks exchanging halos pass by pass against one batched process. Consistency
itself moves every borrowing frame by 0.51 to 2.1 in the stories, 0.14 to 0.27 in the two-rank window run
(``VISIBLE`` = 100 x ``FLOAT_NOISE``). At the attention level (no UNet around it) two passes give the
batched halves exactly.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_helpers import join, spawn

from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.consistency.bank import IdBank
from storydiff.consistency.install import installed_state
from storydiff.consistency.state import COND, UNCOND, ConsistencyState, LayerInfo
from storydiff.consistency.window import WindowMode
from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
from storydiff.families.registry import family_of
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.families.unet import UNetFamily
from storydiff.runs.distributed import current_partition
from storydiff.runs.plan import RunPlan
from storydiff.runs.settings import RunSettings
from storydiff.runs.window_run import run_window

STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] reads a newspaper on a bench
[Bob] and [Alice] have dinner together
[NC] a quiet street at night
[Alice] rides a bicycle
"""
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
FLOAT_NOISE = 1e-4  # see the module docstring: measured <= 2.9e-5
VISIBLE = 100 * FLOAT_NOISE  # consistency moves every borrowing frame by more (measured >= 0.14)
SIDE = 32
STEPS = 2


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


@contextlib.contextmanager
def cfg_passes(passes: int):
    """UNetFamily runs CFG as ``passes`` denoiser calls per step (1: batched, the default)."""
    saved = UNetFamily.cfg_passes
    UNetFamily.cfg_passes = passes
    try:
        yield
    finally:
        UNetFamily.cfg_passes = saved


def story(
    pipe, passes: int, *, rate=0.5, mode="bank", banks=(), skips=NO_SKIP, **settings
) -> tuple[torch.Tensor, object]:
    """(latents handed to the VAE, one per frame in decoding order; the result)."""
    window = {"window": 2} if mode == "window" else {}
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=rate, seed=3, **window, **skips))
    decoded = []
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        decoded.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    try:
        for path in banks:
            sp.load_bank(path)
        with cfg_passes(passes):
            result = sp(
                STORY,
                mode=mode,
                style="none",
                num_inference_steps=STEPS,
                seed=11,
                height=SIDE,
                width=SIDE,
                guidance_scale=5.0,
                progress=False,
                **settings,
            )
    finally:
        pipe.vae.decode = decode
        sp.close()
    return torch.cat(decoded), result


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_consistency_visible(latents: torch.Tensor, stock: torch.Tensor, borrowing: int) -> None:
    moved = (latents - stock).flatten(1).abs().amax(1)
    assert int((moved > VISIBLE).sum()) >= borrowing, moved.tolist()


# -- the state and the modes, at the attention level -----------------------------------------------------
LAYER = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", 0, 16)


def new_state(**config) -> ConsistencyState:
    return ConsistencyState(
        ConsistencyConfig(seed=1, **{"rate": 0.5, **NO_SKIP, **config}), [LAYER], offload_bank=False
    )


def qkv(frames: int, seed: int) -> list[torch.Tensor]:
    """(2·frames, H, N, D) q, k, v: [uncond frames; cond frames], the groups clearly different."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * frames, 2, 12, 8, generator=gen) for _ in range(3)]


def two_passes(state: ConsistencyState, q, k, v) -> torch.Tensor:
    """``state.attend`` on each CFG group in its own call (cond first, as Qwen-Image does), assembled in
    the batched layout."""
    frames = q.shape[0] // 2
    out = torch.empty_like(q)
    for group in (COND, UNCOND):
        rows = slice(group * frames, (group + 1) * frames)
        with state.cfg_pass(group):
            out[rows] = state.attend(LAYER, q[rows], k[rows], v[rows])
    assert state.current_pass is None
    return out


def test_bank_modes_give_the_batched_halves_and_bank():
    frames = 3
    q, k, v = qkv(frames, 0)
    batched, passes = new_state(), new_state()
    for state in (batched, passes):
        state.bank.start("Bob")
        state.begin_write("Bob", frames)
    written_b = batched.attend(LAYER, q, k, v)
    written_p = two_passes(passes, q, k, v)
    assert torch.equal(written_p, written_b)
    (k_b, v_b), (k_p, v_p) = (s.bank.get(("Bob",), 0, LAYER.name, q.device) for s in (batched, passes))
    assert k_p.shape == k_b.shape == (2, 2, frames * 6, 8)  # (groups, H, frames x sampled, D)
    assert torch.equal(k_p, k_b) and torch.equal(v_p, v_b)  # the same tokens, in the same layout
    assert batched.bank.written_bytes("Bob") == passes.bank.written_bytes("Bob")

    # a read pass takes its own group of the bank; [NC] frames read nothing
    q, k, v = qkv(frames, 1)
    for state in (batched, passes):
        state.begin_read([("Bob",), (), ("Bob",)])
    read_b, read_p = batched.attend(LAYER, q, k, v), two_passes(passes, q, k, v)
    assert torch.equal(read_p, read_b)
    # what reading the other group would give is far away: the check above can see a wrong group
    swapped = passes.bank.get(("Bob",), 0, LAYER.name, q.device)
    passes.bank.store("Bob", 0, LAYER.name, *(t.flip(0) for t in swapped))
    assert (two_passes(passes, q, k, v) - read_b).abs().max() > 0.1


def test_window_mode_keys_its_boundary_cache_by_pass():
    """Five story frames in chunks [0, 2), [2, 4), [4, 5) swept forward: every chunk after the first reads
    cached tokens of the chunk before, and a pass must read its own group's."""
    frames, active = 5, [True, True, False, True, True]
    q, k, v = qkv(frames, 2)
    outputs = []
    for passes in (1, 2):
        state = new_state(window=2)
        mode = WindowMode(active, window=2)
        state.begin(mode)
        out = torch.empty_like(q)
        for a, b in ((0, 2), (2, 4), (4, 5)):
            mode.begin_chunk(a, b)
            rows = [g * frames + i for g in range(2) for i in range(a, b)]
            if passes == 1:
                out[rows] = state.attend(LAYER, q[rows], k[rows], v[rows])
            else:
                for group in (COND, UNCOND):
                    half = rows[(b - a) * group : (b - a) * (group + 1)]
                    with state.cfg_pass(group):
                        out[half] = state.attend(LAYER, q[half], k[half], v[half])
            mode.end_chunk()
        outputs.append(out)
    assert torch.equal(outputs[1], outputs[0])


def test_pass_is_explicit_and_checked():
    state = new_state()
    state.begin_joint(3)
    q, k, v = qkv(3, 3)
    with pytest.raises(RuntimeError, match="holds just the 3 frames"), state.cfg_pass(COND):
        state.attend(LAYER, q, k, v)  # both groups in a call that says it computes one
    assert state.current_pass is None  # restored, also after an error
    with pytest.raises(ValueError, match="CFG group"):
        state.set_pass(2)
    state.set_pass(UNCOND)
    assert state.cfg_groups(1) == (UNCOND, 2)
    state.set_pass(None)
    assert state.cfg_groups(2) == (0, 2) and state.cfg_groups(1) == (0, 1)


def test_a_bank_entry_appears_when_every_group_is_in():
    bank = IdBank()
    bank.start("Bob")
    cond, uncond = (torch.full((1, 2, 4, 8), float(g)) for g in (COND, UNCOND))
    bank.store_group("Bob", 0, "layer", cond, cond, group=COND, groups=2)
    assert bank.get(("Bob",), 0, "layer", torch.device("cpu")) is None and bank.nbytes() == 0
    bank.store_group("Bob", 0, "layer", uncond, uncond, group=UNCOND, groups=2)
    k, _ = bank.get(("Bob",), 0, "layer", torch.device("cpu"))
    assert torch.equal(k, torch.cat([uncond, cond]))  # [uncond; cond], as a batched write stores it


# -- the family: two denoiser calls, and rate 0 is stock -------------------------------------------------
def test_two_pass_predict_at_rate_zero_is_the_stock_two_pass_computation(sd15):
    """Bit for bit: consistent attention at rate 0 in both passes, and stock processors, compute the same
    two UNet calls (cond, then uncond, the state told which) and ``uncond + scale · (cond − uncond)``."""
    family, scheduler = family_of(sd15), copy.deepcopy(sd15.scheduler)
    scheduler.set_timesteps(STEPS)
    frames, t, scale = 3, scheduler.timesteps[0], 5.0
    latents = torch.randn(frames, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(4))
    conditioning = family.encode(["a cat"] * frames, [""] * frames, True, SIDE, SIDE)
    with torch.no_grad(), cfg_passes(2):
        stock = family.predict(scheduler, latents, t, conditioning, scale, True)
        model_in = scheduler.scale_model_input(latents, t)
        uncond, cond = (
            sd15.unet(model_in, t, encoder_hidden_states=h).sample for h in conditioning[0].chunk(2)
        )
        assert torch.equal(stock, uncond + scale * (cond - uncond))
        state = apply_consistent_attention(sd15, ConsistencyConfig(rate=0.0, layers="all", **NO_SKIP))
        seen = []
        hook = sd15.unet.register_forward_pre_hook(lambda *_: seen.append(state.current_pass))
        try:
            assert installed_state(sd15.unet) is state
            state.begin_joint(frames)
            ours = family.predict(scheduler, latents, t, conditioning, scale, True)
        finally:
            hook.remove()
            remove_consistent_attention(sd15)
    assert torch.equal(ours, stock)
    assert [p.group for p in seen] == [COND, UNCOND] and state.current_pass is None
    assert installed_state(sd15.unet) is None


@pytest.mark.parametrize("mode", ["bank", "window"])
def test_rate_zero_two_pass_story_is_stock_bit_for_bit(sd15, mode, monkeypatch):
    """A two-pass story at rate 0 (writes, reads, window chunks) equals the same two-pass story with stock
    attention in every layer."""
    extra = {"chunk_size": 2} if mode == "window" else {"bank_schedule": "lockstep"}
    ours, _ = story(sd15, 2, rate=0.0, mode=mode, **extra)
    monkeypatch.setattr(
        ConsistencyState,
        "attend",
        lambda self, layer, q, k, v, *a, **kw: F.scaled_dot_product_attention(q, k, v),
    )
    stock, _ = story(sd15, 2, rate=0.0, mode=mode, **extra)
    assert torch.equal(ours, stock)


# -- stories ----------------------------------------------------------------------------------------------
def test_lockstep_bank_story_two_pass_equals_batched(sd15):
    """With layers falling back to plain attention at random: both passes must skip the same ones."""
    skips = {**NO_SKIP, "skip_prob_early": 0.4}
    batched, result = story(sd15, 1, bank_schedule="lockstep", skips=skips)
    passes, two_pass_result = story(sd15, 2, bank_schedule="lockstep", skips=skips)
    assert max_diff(passes, batched) <= FLOAT_NOISE
    assert two_pass_result.bank_bytes == result.bank_bytes and all(result.bank_bytes.values())
    stock, _ = story(sd15, 2, rate=0.0, bank_schedule="lockstep")
    assert_consistency_visible(passes, stock, borrowing=5)


def test_window_story_two_pass_equals_batched(sd15):
    """Six frames in chunks of two (three chunks, swept forward, then backward): boundary tokens are
    cached between chunks at every step."""
    batched, _ = story(sd15, 1, mode="window", chunk_size=2)
    passes, _ = story(sd15, 2, mode="window", chunk_size=2)
    assert max_diff(passes, batched) <= FLOAT_NOISE
    stock, _ = story(sd15, 2, rate=0.0, mode="window", chunk_size=2)
    assert_consistency_visible(passes, stock, borrowing=5)


def test_stored_bank_story_two_pass_equals_batched_and_banks_cross(sd15, tmp_path):
    """The stored schedule gives the batched latents; the banks it saves are the batched run's bank (same
    layout, same signature), and each kind of run reads the other's."""
    batched, _ = story(sd15, 1, bank_schedule="stored", save_banks=True, out_dir=tmp_path / "batched")
    passes, _ = story(sd15, 2, bank_schedule="stored", save_banks=True, out_dir=tmp_path / "passes")
    assert max_diff(passes, batched) <= FLOAT_NOISE
    banks = {
        name: sorted((tmp_path / name / "banks").glob("*.safetensors")) for name in ("batched", "passes")
    }
    for path_b, path_p in zip(banks["batched"], banks["passes"], strict=True):
        assert path_b.name == path_p.name
        bank_b, bank_p = IdBank(), IdBank()
        name = bank_b.load(path_b)
        bank_p.load(path_p)
        assert bank_p.metadata(name) == bank_b.metadata(name)  # the same signature, cfg_groups included
        assert bank_b.metadata(name)["cfg_groups"] == 2
        entries_b = {(at, layer): (k, v) for at, layer, k, v in bank_b.entries(name)}
        entries_p = {(at, layer): (k, v) for at, layer, k, v in bank_p.entries(name)}
        assert entries_p.keys() == entries_b.keys() and entries_b
        for key, pair in entries_b.items():
            for ours, theirs in zip(entries_p[key], pair, strict=True):
                assert ours.shape == theirs.shape and theirs.shape[0] == 2  # (groups, H, M, D)
                assert max_diff(ours, theirs) <= FLOAT_NOISE
    assert len(banks["batched"]) == 2
    # loaded banks replace the identity frames: every frame reads. A batched run reading the two-pass
    # banks, and a two-pass run reading the batched banks, give what a batched run reading its own does
    reference, _ = story(sd15, 1, banks=banks["batched"])
    for passes_, written in ((1, "passes"), (2, "batched")):
        crossed, _ = story(sd15, passes_, banks=banks[written])
        assert max_diff(crossed, reference) <= FLOAT_NOISE, (passes_, written)


def window_latents(pipe, active: list[bool], passes: int, partition=None) -> torch.Tensor:
    """Window mode on prompts, all frames one chunk (each rank's block over several ranks)."""
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5, window=1, seed=1, **NO_SKIP))
    settings = RunSettings(
        mode="window",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        chunk_size=len(active),
        height=SIDE,
        width=SIDE,
    )
    prompts = [f"a man with a red scarf, scene {i}" for i in range(len(active))]
    plan = RunPlan.from_prompts(prompts, settings, active=active, partition=partition)
    try:
        with cfg_passes(passes):
            return run_window(pipe, state, plan, progress=False)
    finally:
        remove_consistent_attention(pipe)


def two_pass_window_worker(rank, world, rendezvous, out, pipe, active) -> None:
    join(rank, world, rendezvous)
    try:
        partition = current_partition()
        latents = window_latents(pipe, active, 2, partition)
        start, stop = partition.block(len(active))
        torch.save({"start": start, "latents": latents[start:stop].clone()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_pass_halo_exchange_over_two_ranks(sd15, tmp_path):
    """Over two ranks (gloo), each pass exchanges its own group's boundary tokens: every rank's frames are
    the single-process batched run's."""
    active = [True] * 4  # blocks [0, 2) and [2, 4): frames 1 and 2 cross
    spawn(two_pass_window_worker, 2, tmp_path, str(tmp_path), sd15, active)
    single = window_latents(sd15, active, 1)
    for rank in range(2):
        part = torch.load(tmp_path / f"rank{rank}.pt")
        start, latents = part["start"], part["latents"]
        assert max_diff(latents, single[start : start + len(latents)]) <= FLOAT_NOISE, rank
    stock = window_latents(sd15, [False] * len(active), 1)
    assert_consistency_visible(single, stock, borrowing=4)
