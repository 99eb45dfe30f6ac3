"""Semantic Motion Predictor: model contract, data pipeline, training/resume, and an honest learning test.

Everything is built offline on the CPU: a tiny random CLIP vision encoder and synthetic videos of shapes
moving on arcs. The one ``torch.compile`` in this file is ``test_compiled_matches_eager``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from storydiff.cli import main
from storydiff.models.loading import ModelLoadError
from storydiff.motion import train as motion_train
from storydiff.motion.baselines import linear_interpolation
from storydiff.motion.checkpoints import latest_checkpoint
from storydiff.motion.data import build_datasets, split_videos
from storydiff.motion.encoder import build_tiny_encoder
from storydiff.motion.model import SemanticMotionPredictor
from storydiff.motion.synthetic import make_synthetic_videos
from storydiff.motion.train import train_motion
from storydiff.motion.video_sources import find_videos

SMALL = {"embed_dim": 32, "num_frames": 4, "hidden_dim": 32, "num_layers": 2, "num_heads": 4, "max_tokens": 8}
TINY_TRAIN = {"hidden_dim": 32, "num_layers": 1, "num_heads": 4}


def _small_model(seed: int = 0, **overrides) -> SemanticMotionPredictor:
    """A small predictor whose residual branch is switched on (random output projection)."""
    torch.manual_seed(seed)
    model = SemanticMotionPredictor(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        model.out_proj.weight.normal_(0, 0.2)
        model.out_proj.bias.normal_(0, 0.2)
    return model


def _inputs(batch: int, tokens: int, dim: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=gen), torch.randn(batch, tokens, dim, generator=gen)


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory):
    """Six short PNG-folder videos (enough for a split) — cheap data for pipeline tests."""
    root = tmp_path_factory.mktemp("small_videos")
    make_synthetic_videos(root, num_videos=6, num_frames=10, seed=3)
    return root


# --- model ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 4], ids=lambda t: f"T{t}")
def test_output_shape(tokens):
    start, end = _inputs(3, tokens)
    with torch.no_grad():
        out = _small_model()(start, end)
    assert out.shape == (3, SMALL["num_frames"], tokens, SMALL["embed_dim"])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tokens", [1, 4], ids=lambda t: f"T{t}")
def test_untrained_model_is_linear_interpolation(tokens):
    torch.manual_seed(0)
    model = SemanticMotionPredictor(**SMALL).eval()
    start, end = _inputs(2, tokens)
    with torch.no_grad():
        out = model(start, end)
    expected = linear_interpolation(start, end, SMALL["num_frames"])
    assert torch.equal(out, expected)  # zero-initialized residual: exactly the baseline
    # t_i = (i + 1) / (L + 1): endpoints excluded, evenly spaced.
    t = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 4, 1, 1)
    torch.testing.assert_close(expected, start[:, None] + t * (end - start)[:, None])


def test_save_load_round_trip(tmp_path):
    model = _small_model()
    model.save_pretrained(tmp_path / "smp")
    assert (tmp_path / "smp" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SemanticMotionPredictor.from_pretrained(tmp_path / "smp", low_cpu_mem_usage=False).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    start, end = _inputs(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(start, end), model(start, end))


# Inductor's CPU backend imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_matches_eager():
    """The whole forward compiles as one graph with Inductor and matches eager; other shapes are refused.

    On a cold cache most of this test is Inductor's own C++ work, not ours, so two of its settings are
    patched for the duration: one compile thread (a pool would start worker processes that each import
    torch, for only 4 kernels) and scalar kernels (no g++ probe of the CPU's vector ISA; vector or scalar
    code is Inductor's choice, not what this test checks). Same model code, same checks, about 40 % less
    time on 2 cores. One transformer layer: a second adds no new op to trace, only a copy of the first.
    """
    import torch._inductor.config as inductor_config

    from storydiff.motion.compiled import compile_predictor

    model = _small_model(num_layers=1)
    start, end = _inputs(2, 4)
    with inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False}):
        predictor = compile_predictor(model, batch_size=2, num_tokens=4, fullgraph=True)
        with torch.no_grad():
            expected = model(start, end)
        torch.testing.assert_close(predictor(start, end), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start has shape"):
        predictor(*_inputs(3, 4))  # another shape is refused, not silently recompiled


@pytest.mark.parametrize(
    ("start_shape", "end_shape", "match"),
    [
        ((2, 1, 16), (2, 1, 16), "embedding dim is 16 but the model's embed_dim is 32"),
        ((2, 1, 32), (2, 1, 16), "start and end must have the same shape"),
        ((2, 9, 32), (2, 9, 32), "9 tokens per frame, more than max_tokens=8"),
        ((2, 32), (2, 32), "start must be 3-D"),
        ((2, 1, 32), (2, 1, 1, 32), "end must be 3-D"),
    ],
    ids=["embed-dim", "start-vs-end", "too-many-tokens", "start-2d", "end-4d"],
)
def test_bad_inputs_raise(start_shape, end_shape, match):
    model = _small_model()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(start_shape), torch.zeros(end_shape))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"num_frames": 0}, "num_frames"), ({"max_tokens": 0}, "max_tokens"), ({"num_heads": 5}, "num_heads")],
    ids=["L0", "max-tokens0", "heads-not-dividing"],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        SemanticMotionPredictor(**{**SMALL, **overrides})


# --- encoder -------------------------------------------------------------------------------------------


def test_encoder_outputs_and_loading_from_a_folder(tmp_path):
    from storydiff.motion.encoder import ImageEncoder
    from storydiff.motion.synthetic import render_orbit_frames

    frames = render_orbit_frames(3, rng=np.random.default_rng(0))
    tiny = build_tiny_encoder(embed_dim=32)
    pooled, tokens = tiny.encode(frames), tiny.encode_tokens(frames)
    assert pooled.shape == (3, 1, 32) and tokens.shape == (3, tiny.num_tokens, tiny.token_dim)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    # Embeddings must depend on where the shape is, or there is no motion to predict.
    assert torch.nn.functional.cosine_similarity(pooled[0, 0], pooled[2, 0], dim=0) < 0.99

    tiny.model.save_pretrained(tmp_path / "clip")  # no preprocessor_config.json: CLIP defaults at 32²
    loaded = ImageEncoder.from_pretrained(tmp_path / "clip")
    assert torch.equal(loaded.encode(frames), pooled)
    assert loaded.identity != tiny.identity
    with pytest.raises(ModelLoadError, match=r"cannot load CLIP vision model '.*missing': no such file"):
        ImageEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "not-clip").mkdir()
    with pytest.raises(ModelLoadError, match=r"^cannot load CLIP vision model '.*not-clip': [^\n]*$"):
        ImageEncoder.from_pretrained(tmp_path / "not-clip")  # one line, not a transformers traceback


# --- data ----------------------------------------------------------------------------------------------


def test_missing_empty_and_unreadable_data_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder not found: .*nowhere"):
        find_videos(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"data folder {empty} is empty")):
        find_videos(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "broken.gif").write_bytes(b"not a gif")
    (junk / "no_frames").mkdir()
    (junk / "clip.mp4").write_bytes(b"not a video")  # skipped: imageio missing, or it cannot read it
    with (
        pytest.warns(UserWarning) as caught,
        pytest.raises(ValueError, match=re.escape(f"no readable videos in data folder {junk}")),
    ):
        find_videos(junk)
    # Only our skip notices: a failed ffmpeg probe can also leak ResourceWarnings from inside imageio.
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    assert len(messages) == 3
    assert "broken.gif: not a readable GIF" in messages[0]
    assert "clip.mp4: " in messages[1] and "imageio" in messages[1]
    assert "no_frames: folder has no frame images" in messages[2]


def test_mp4_is_read_when_imageio_is_installed(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="mp4 support is optional (imageio + imageio-ffmpeg)")
    import imageio.v3 as iio

    from storydiff.motion.synthetic import render_orbit_frames
    from storydiff.motion.video_sources import read_frames

    frames = render_orbit_frames(12, rng=np.random.default_rng(0))
    iio.imwrite(tmp_path / "orbit.mp4", np.stack([np.asarray(f) for f in frames]), fps=8)
    (source,) = find_videos(tmp_path)
    assert (source.kind, source.num_frames) == ("video", 12)
    decoded = read_frames(source)
    assert len(decoded) == 12 and decoded[0].size == (32, 32)


def test_short_videos_are_skipped_then_refused(small_videos, tmp_path):
    encoder = build_tiny_encoder()
    with (
        pytest.warns(UserWarning, match="10 frames, a clip needs 12"),
        pytest.raises(ValueError, match="num_frames=10"),
    ):
        build_datasets(small_videos, encoder, num_frames=10, cache_dir=tmp_path / "cache")


def test_embedding_cache_is_reused(small_videos, tmp_path):
    make_synthetic_videos(tmp_path / "gifs", num_videos=3, num_frames=8, seed=5, fmt="gif")
    sources = find_videos(tmp_path / "gifs")
    assert [(s.kind, s.num_frames) for s in sources] == [("gif", 8)] * 3

    encoder = build_tiny_encoder()
    calls = []
    encode = encoder.encode
    encoder.encode = lambda images, **kw: calls.append(len(images)) or encode(images, **kw)
    first = build_datasets(small_videos, encoder, num_frames=4, cache_dir=tmp_path / "cache")
    assert calls == [10] * 6  # every frame of every video, once
    assert first.cache.encoded_videos == 6
    assert len(first.heldout_sources) >= 1 and len(first.train_sources) >= 1
    assert not {s.path for s in first.train_sources} & {s.path for s in first.heldout_sources}

    calls.clear()
    second = build_datasets(small_videos, encoder, num_frames=4, cache_dir=tmp_path / "cache")
    assert calls == []  # served from disk
    start, middle, end = second.train[0]
    assert start.shape == end.shape == (1, 32) and middle.shape == (4, 1, 32)
    assert torch.equal(second.train.embeddings[0], first.train.embeddings[0])

    # Touching a video's frames invalidates exactly that video's cache entry.
    frame = next((small_videos / first.train_sources[0].path.name).iterdir())
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    build_datasets(small_videos, encoder, num_frames=4, cache_dir=tmp_path / "cache")
    assert calls == [10]


def test_clip_dataset_indexing():
    from storydiff.motion.data import ClipDataset

    videos = [torch.arange(12.0).view(12, 1, 1), 100 + torch.arange(5.0).view(5, 1, 1)]
    clips = ClipDataset(videos, num_frames=2, stride=2)  # a clip spans (2 + 1)·2 + 1 = 7 frames
    assert len(clips) == 12 - 7 + 1  # the 5-frame video is too short for any clip
    start, middle, end = clips[3]
    assert (start.item(), middle.flatten().tolist(), end.item()) == (3.0, [5.0, 7.0], 9.0)


def test_split_is_by_video_and_seeded(small_videos):
    sources = find_videos(small_videos)
    train, held = split_videos(sources, holdout=0.2, seed=7)
    assert len(held) == 1 and len(train) == 5
    assert split_videos(sources, holdout=0.2, seed=7) == (train, held)
    with pytest.raises(ValueError, match="at least 2 usable videos"):
        split_videos(sources[:1])


# --- training ------------------------------------------------------------------------------------------


def _train(data, out, **kwargs):
    settings = {
        "num_frames": 3,
        "steps": 12,
        "batch_size": 8,
        "lr": 1e-3,
        "checkpoint_every": 6,
        "seed": 0,
        "device": "cpu",
        "progress": False,
        "model_config": {**TINY_TRAIN, "dropout": 0.1},  # dropout: resuming must restore the RNG too
    }
    return train_motion(data, out, **{**settings, **kwargs})


def test_resume_reproduces_uninterrupted_run(small_videos, tmp_path):
    cache = tmp_path / "cache"
    full = _train(small_videos, tmp_path / "full", cache_dir=cache)

    class Killed(Exception):
        pass

    def kill_after_checkpoint(step, loss):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        _train(small_videos, tmp_path / "resumed", cache_dir=cache, callback=kill_after_checkpoint)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-6"
    with pytest.raises(FileExistsError, match="continue that run with --resume"):
        _train(small_videos, tmp_path / "resumed", cache_dir=cache)
    with pytest.raises(ValueError, match=r"settings differ.*lr"):
        _train(small_videos, tmp_path / "resumed", cache_dir=cache, resume=True, lr=5e-4)

    resumed = _train(small_videos, tmp_path / "resumed", cache_dir=cache, resume=True)
    assert resumed.resumed_from == 6
    assert resumed.losses == full.losses  # the loss history continues exactly
    a = SemanticMotionPredictor.from_pretrained(full.model_dir, low_cpu_mem_usage=False).state_dict()
    b = SemanticMotionPredictor.from_pretrained(resumed.model_dir, low_cpu_mem_usage=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights


def test_plan_summarizes_data_and_leaves_the_run_unchanged(small_videos, tmp_path):
    """The plan (data summary, steps, timed seconds per step) comes before the first step, and timing it
    changes nothing: dropout's RNG and the weights are as in a run without a plan, also across a resume."""
    cache, plans = tmp_path / "cache", []
    settings = {"cache_dir": cache, "steps": 20, "checkpoint_every": 10}
    plain = _train(small_videos, tmp_path / "plain", **settings)

    def kill_at_10(step, loss):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(small_videos, tmp_path / "planned", **settings, on_plan=plans.append, callback=kill_at_10)
    resumed = _train(small_videos, tmp_path / "planned", **settings, on_plan=plans.append, resume=True)
    assert resumed.losses == plain.losses

    first, second = plans
    # 6 videos of 10 frames, one held out; a clip spans num_frames 3 + 2 = 5 frames: 6 clips per video.
    data = {"train_videos": 5, "train_frames": 50, "train_clips": 30, "heldout_videos": 1}
    data |= {"heldout_frames": 10, "heldout_clips": 6, "tokens": 1, "embed_dim": 32}
    assert first == motion_train.TrainPlan(
        **data, steps=20, start_step=0, batch_size=8, seconds_per_step=first.seconds_per_step, timed_steps=2
    )
    assert first.seconds_per_step > 0 and first.estimated_seconds == 20 * first.seconds_per_step
    assert first.epochs == pytest.approx(20 * 8 / 30)
    # Resumed with 10 steps left: too short a run to be worth timing.
    assert (second.start_step, second.timed_steps, second.seconds_per_step) == (10, 0, None)
    assert second.estimated_seconds is None


def test_checkpoints_appear_whole_replace_their_step_and_are_pruned(tmp_path, monkeypatch):
    from storydiff.motion.checkpoints import load_checkpoint, save_checkpoint

    model = _small_model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    save_checkpoint(tmp_path, 3, model, {"step": 33}, keep_last=2)  # a re-run reaching step 3 replaces it
    assert load_checkpoint(tmp_path / "checkpoint-3")[1]["step"] == 33

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)  # the weights are written, the training state is not
    for step in (3, 4):
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, step, model, {"step": -1}, keep_last=2)
    monkeypatch.undo()
    # No half checkpoint, no temporary folder, and step 3's earlier checkpoint is intact.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert load_checkpoint(tmp_path / "checkpoint-3")[1]["step"] == 33
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_cache_file_appears_only_when_complete(small_videos, tmp_path, monkeypatch):
    from storydiff.motion import cache as cache_module

    source = find_videos(small_videos)[0]
    cache = cache_module.EmbeddingCache(tmp_path / "cache", build_tiny_encoder())

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        cache.load(source)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing a later run would take for cached
    monkeypatch.undo()
    embeddings, encoded = cache.load(source), cache.encoded_videos
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path_for(source).name]
    assert torch.equal(cache.load(source), embeddings) and cache.encoded_videos == encoded  # read, not run


def test_loss_figure_draws_losses_ema_and_heldout():
    losses = [4.0, 2.0, 1.0, 3.0]
    fig = motion_train._loss_figure(losses, {"mse_interpolation": 0.5, "mse_predictor": 0.25})
    (ax,) = fig.axes
    per_step, ema, interpolation, predictor = ax.lines
    assert list(per_step.get_xdata()) == [1, 2, 3, 4] and list(per_step.get_ydata()) == losses
    assert list(ema.get_xdata()) == [1, 2, 3, 4]
    # EMA 0.95 started at the first loss: 4, 0.95·4 + 0.05·2 = 3.9, 0.95·3.9 + 0.05·1 = 3.755, ...
    assert list(ema.get_ydata()) == pytest.approx([4.0, 3.9, 3.755, 3.71725])
    assert list(interpolation.get_ydata()) == [0.5, 0.5] and list(predictor.get_ydata()) == [0.25, 0.25]
    assert ax.get_yscale() == "log"
    assert "training" in ax.get_title()
    legend = ax.get_legend()
    anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 >= 1.0  # outside the axes: it never covers the held-out lines


def test_cli_runs_and_reports_errors(small_videos, tmp_path, capsys, monkeypatch):
    figures, loss_figure = [], motion_train._loss_figure

    def recording(*args):
        figures.append(loss_figure(*args))
        return figures[-1]

    monkeypatch.setattr(motion_train, "_loss_figure", recording)
    out = tmp_path / "run"
    argv = ["--data", str(small_videos), "--out", str(out), "--frames", "3", "--steps", "4"]
    argv += ["--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "4", "--lr", "1e-3"]
    argv += ["--no-progress"]
    assert main(["train-motion", *argv]) == 0
    assert "held-out cosine similarity" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file() and (out / "loss.png").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert {"cosine_predictor", "cosine_interpolation", "cosine_gain"} <= report["heldout"].keys()
    per_step, _, interpolation, predictor = figures[0].axes[0].lines  # loss.png shows this run's numbers
    assert len(per_step.get_ydata()) == report["steps"] == 4
    assert per_step.get_ydata()[-1] == report["final_loss"]
    assert interpolation.get_ydata()[0] == report["heldout"]["mse_interpolation"]
    assert predictor.get_ydata()[0] == report["heldout"]["mse_predictor"]

    assert main(["train-motion", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    no_clip = ["--encoder", str(tmp_path / "no-clip")]
    assert main(["train-motion", *argv[:2], "--out", str(tmp_path / "y"), *no_clip]) == 2
    err = capsys.readouterr().err
    assert "error: cannot load CLIP vision model" in err and "no such file" in err and err.count("\n") == 1
    assert main(["train-motion", "--out", str(tmp_path / "x")]) == 2  # argparse: --data is required


def test_cli_prints_the_plan_and_shows_progress_to_suit_stderr(small_videos, tmp_path, capsys, monkeypatch):
    argv = ["train-motion", "--data", str(small_videos), "--frames", "3", "--steps", "20", "--batch-size"]
    argv += ["8", "--checkpoint-every", "10", "--hidden", "32", "--layers", "1", "--heads", "4"]

    assert main([*argv, "--out", str(tmp_path / "log")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == (
        "data: 5 training videos (50 frames, 30 clips), 1 held-out video (10 frames, 6 clips); "
        "embeddings 1 x 32 (tokens x dims) per frame"
    )
    assert re.fullmatch(
        r"run: 20 steps of 8 clips \(~5.33 epochs\); ~\S+ s per step \(median of 2 timed steps\) -> "
        r"(less than a second|about \d+ s), plus checkpoints and the final evaluation",
        lines[1],
    ), lines[1]
    # Not a terminal: one plain line per checkpoint, no bar.
    assert re.search(r"^train-motion: step 10/20 done \(loss \S+\), \S+ s$", err, re.M), err
    assert "train-motion: step 20/20 done" in err and "\r" not in err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--out", str(tmp_path / "tty")]) == 0
    err = capsys.readouterr().err
    assert "train-motion: 100%" in err and "step 10/20 done" not in err  # a bar, and only the bar

    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("data: ") and "train-motion" not in err


@pytest.mark.parametrize("command", ["video", "train-motion"])
def test_help_shows_every_default(command, capsys):
    import argparse

    from storydiff.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[command]._actions:
        if action.required or not action.option_strings or action.nargs == 0:  # required, or an on/off flag
            continue
        assert action.help and "(default: " in action.help, action.option_strings
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    expected = {"video": "denoising steps (default: 25)", "train-motion": "optimizer steps (default: 1000)"}
    assert expected[command] in text and "%(default)" not in text


def test_predictor_beats_interpolation_on_heldout_videos(tmp_path):
    """The honest test: on clips of videos never trained on, the trained predictor is closer (cosine) to
    the true intermediate embeddings than linear interpolation — by a margin, on a task where
    interpolation is clearly imperfect."""
    make_synthetic_videos(tmp_path / "data", num_videos=48, num_frames=20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing degraded
        result = train_motion(
            tmp_path / "data",
            tmp_path / "out",
            num_frames=4,
            steps=400,
            batch_size=32,
            lr=1e-3,
            warmup_steps=20,
            seed=0,
            device="cpu",
            progress=False,
            checkpoint_every=10**6,
            model_config={"hidden_dim": 64, "num_layers": 2, "num_heads": 4},
        )
    ev = result.eval
    print(
        f"held-out ({ev['clips']} clips, {ev['videos']} videos): cosine predictor"
        f" {ev['cosine_predictor']:.4f} vs interpolation {ev['cosine_interpolation']:.4f};"
        f" MSE {ev['mse_predictor']:.3f} vs {ev['mse_interpolation']:.3f}"
    )
    assert ev["videos"] >= 5 and ev["clips"] >= 50
    assert ev["cosine_interpolation"] < 0.95  # the baseline is far from perfect here: there is room to win
    assert ev["cosine_gain"] > 0.015
    assert ev["mse_predictor"] < 0.9 * ev["mse_interpolation"]
    per_frame = zip(ev["cosine_predictor_per_frame"], ev["cosine_interpolation_per_frame"], strict=True)
    assert all(p > i for p, i in per_frame)  # every intermediate frame improves, not just the average


def test_train_motion_subcommand(tmp_path, capsys):
    from storydiff.motion.synthetic import make_synthetic_videos

    make_synthetic_videos(tmp_path / "videos", num_videos=6, num_frames=8, seed=1)
    args = ["train-motion", "--data", str(tmp_path / "videos"), "--out", str(tmp_path / "run")]
    assert main([*args, "--frames", "4", "--steps", "3", "--batch-size", "4", "--no-progress"]) == 0
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "loss.png").is_file()
    assert main(["train-motion", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err
