"""`storydiff eval-suite`: the benchmark file parser, configurations, and a real tiny-sd15 suite — its
comparison against the per-set reports, and its resume after a kill.

The suite runs the example file's first two sets (4 and 3 frames) under two configurations, 2 steps at
64x64, with the tiny random encoders.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from storydiff.cli import main
from storydiff.evaluation import suite
from storydiff.evaluation.benchmark_file import load_benchmark, parse_benchmark
from storydiff.evaluation.suite import ALLOWED_KEYS, parse_config
from storydiff.pages.output import StoryOutput
from storydiff.pages.story import parse_story
from storydiff.runs.settings import RunSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "benchmarks" / "story_sets" / "example_consistory.yaml"
CONFIGS = ["--config", "base:rate=0.0", "--config", "csa:rate=0.5,window=2"]
LABELS = ["base/animals_0", "base/animals_1", "csa/animals_0", "csa/animals_1"]


def _suite(out, *extra) -> int:
    argv = ["eval-suite", "--benchmark", EXAMPLE, "--model", "tiny-sd15", "--out", out, "--limit", "2"]
    argv += ["--steps", "2", "--height", "64", "--width", "64", "--clip", "tiny", "--dino", "tiny"]
    return main([str(a) for a in (*argv, *(extra or CONFIGS))])


# ---------------------------------------------------------------------------------------------------------
# The benchmark file


def test_example_file_becomes_stories():
    sets = load_benchmark(EXAMPLE)
    assert [s.id for s in sets] == ["animals_0", "animals_1", "humans_baker", "humans_1"]
    assert [s.category for s in sets] == ["animals", "animals", "humans", "humans"]
    assert [s.name for s in sets] == ["fox", "tortoise", "baker", "astronaut"]  # first concept token
    assert [len(s.settings) for s in sets] == [4, 3, 5, 3]
    story = parse_story(sets[0].story_text())
    assert list(story.characters) == ["fox"] and all(f.characters == ("fox",) for f in story.frames)
    # 1Prompt1Story's prompt: style, subject, setting
    assert story.prompt(story.frames[1]) == (
        "A soft watercolor illustration of a small ginger fox with a white-tipped tail jumping over a "
        "frozen stream"
    )


def test_list_form_and_awkward_wording():
    data = [
        {
            "subject": "a robot [model X] #7",
            "settings": ["in a lab #2", 2024, "on the [moon]"],
            "concept_token": "robo t!",
            "mood": "ignored",
        },
        {"id": "b/2", "category": "misc", "subject": "a cat", "settings": ["asleep"], "concept_token": "NC"},
        {"subject": "a dog", "settings": ["running"], "concept_token": []},
    ]
    first, second, third = parse_benchmark(data, "list.yaml")
    assert (first.id, first.category, first.style, first.name) == ("set_0", None, "", "robo t")
    story = parse_story(first.story_text())
    # brackets would read as tags and the last '#' as a caption: both stay wording
    assert story.prompts() == [
        "a robot (model X) #7 in a lab #2",
        "a robot (model X) #7 2024",
        "a robot (model X) #7 on the (moon)",
    ]
    assert story.captions() == [None, None, None]
    assert (second.id, second.category, second.name) == ("b_2", "misc", "character")  # NC is reserved
    assert third.name == "character"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("animals: [\n", "is not valid YAML"),
        ("just text", "expected a list of sets or a mapping"),
        ("", "expected a list of sets or a mapping"),
        ("animals: {subject: a fox}", "category 'animals' must hold a list of sets"),
        ("animals:\n  - settings: [sleeping]", "set 1 of category 'animals': subject must be non-empty"),
        ("animals:\n  - {subject: a fox, settings: []}", "set 1 of category 'animals': settings must be"),
        ("- {subject: a fox, settings: sleeping}", "set 1: settings must be a non-empty list"),
        ("- {subject: a fox, settings: [sleeping, yes]}", "set 1: settings[1] must be non-empty text"),
        ("- {subject: a fox, settings: [a]}\n- not a set", "set 2: expected a mapping"),
        ("- {id: x, subject: a, settings: [b]}\n- {id: x, subject: c, settings: [d]}", "set 'x': id 'x'"),
        ("animals: []", "holds no sets"),
    ],
    ids=[
        "yaml",
        "scalar",
        "empty",
        "category",
        "subject",
        "no-settings",
        "str",
        "bool",
        "entry",
        "dup",
        "none",
    ],
)
def test_malformed_files_name_the_file_and_the_set(tmp_path, text, expected):
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="^" + str(path).replace("\\", "\\\\")) as info:
        load_benchmark(path)
    assert expected in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read benchmark file .*nothing\.yaml"):
        load_benchmark(tmp_path / "nothing.yaml")


# ---------------------------------------------------------------------------------------------------------
# Configurations


def test_config_keys_become_settings():
    config = parse_config("csa:rate=0.7,window=2,level-rate=32=0.5,--level_rate=16=0.3,mode=bank")
    settings = config.settings(RunSettings(seed=3))
    consistency = config.consistency_config(settings)
    assert (config.name, settings.mode, settings.height, settings.seed) == ("csa", "bank", None, 3)
    assert (consistency.rate, consistency.window, consistency.seed) == (0.7, 2, 3)
    assert consistency.level_rates == {32: 0.5, 16: 0.3}
    plain = parse_config("plain")
    assert plain.run == plain.consistency == {}
    window = parse_config("long:mode=window")  # window mode needs a window: 2, as `storydiff generate`
    assert window.consistency_config(window.settings(RunSettings())).window == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("csa:speed=2", "unknown key 'speed'; allowed keys: " + ", ".join(ALLOWED_KEYS)),
        ("csa:rate=high", "rate: expected a number, got 'high'"),
        ("csa:rate=2", "rate must be a number in [0, 1]"),
        ("csa:rate=0.5,rate=0.6", "rate is given twice"),
        ("csa:rate", "expected KEY=VALUE, got 'rate'"),
        ("csa:level-rate=32", "--level-rate expects LEVEL=RATE such as 32=0.5, got '32'"),
        # the old syntax (field names, LEVEL:RATE+..., 'none'): one line saying what to write instead
        ("csa:level_rates=32:0.5+16:0.3", "old syntax; write level-rate=32=0.5,level-rate=16=0.3"),
        ("csa:num_inference_steps=20", "num_inference_steps=20 is the old syntax; write steps=20"),
        ("csa:height=none", "leave height out for its default"),
        ("csa:skip_prob_early=0", "write no-skip"),
        ("a/b:rate=0.5", "the name must be"),
        ("tradeoff.png:rate=0.5", "the name of a file the suite writes"),
        ("csa:mode=fast", "mode must be one of bank, window"),
    ],
)
def test_bad_configs_say_what_is_wrong(text, expected):
    with pytest.raises(ValueError) as info:
        parse_config(text)
    assert str(info.value).startswith(f"--config {text!r}: ") and expected in str(info.value)


def test_cli_refuses_bad_input_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "out"
    assert _suite(out, "--config", "base:rate=0.0", "--config", "csa:speed=2") == 2
    err = capsys.readouterr().err
    assert "--config 'csa:speed=2': unknown key 'speed'; allowed keys: style, negative, steps" in err
    assert "rate, level-rate, layers" in err
    assert _suite(out, "--config", "a", "--config", "a") == 2
    assert "given twice: a" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {subject: a fox}")
    argv = ["eval-suite", "--benchmark", str(bad), "--model", "tiny-sd15", "--config", "a", "--out", str(out)]
    assert main(argv) == 2
    assert f"{bad}: set 1: settings must be" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# A real suite


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    assert _suite(out) == 0
    return out


def _set_scores(report: dict) -> dict:
    identity = {
        metric: [e[metric]["mean"] for e in report["characters"].values() if e[metric]["mean"] is not None]
        for metric in report["identity_metrics"]
    }
    scores = {metric: sum(values) / len(values) for metric, values in identity.items()}
    return {**scores, "clip_t": report["clip_t_mean"], "clip_t_styled": report["clip_t_styled_mean"]}


def test_comparison_is_the_mean_of_the_set_reports(suite_dir, capsys):
    comparison = json.loads((suite_dir / "comparison.json").read_text())
    assert comparison["identity_metrics"] == ["clip_i", "dino"] and "mean nothing" in comparison["note"]
    assert [row["config"] for row in comparison["configs"]] == ["base", "csa"]
    with open(suite_dir / "comparison.csv", newline="") as handle:
        table = {row["config"]: row for row in csv.DictReader(handle)}
    for row in comparison["configs"]:
        reports = {
            set_id: json.loads((suite_dir / row["config"] / set_id / "eval" / "report.json").read_text())
            for set_id in ("animals_0", "animals_1")
        }
        assert all(r["status"] == "complete" and r["frames_missing"] == [] for r in reports.values())
        per_set = {set_id: _set_scores(report) for set_id, report in reports.items()}
        assert row["sets"] == 2 and row["per_set"].keys() == per_set.keys()
        for key in ("clip_i", "dino", "clip_t", "clip_t_styled"):
            expected = (per_set["animals_0"][key] + per_set["animals_1"][key]) / 2
            assert math.isclose(row[key], expected, rel_tol=1e-12) and math.isfinite(expected)
            assert float(table[row["config"]][key]) == row[key]
        assert table[row["config"]]["sets"] == "2"
    base, csa = comparison["configs"]
    assert (base["consistency"]["rate"], csa["consistency"]["rate"], csa["consistency"]["window"]) == (
        0,
        0.5,
        2,
    )
    assert base["settings"]["num_inference_steps"] == 2 and base["options"] == "rate=0.0"
    assert Image.open(suite_dir / "tradeoff.png").format == "PNG"
    meta = json.loads((suite_dir / "csa" / "animals_1" / "metadata.json").read_text())
    assert meta["status"] == "complete" and len(meta["prompts"]) == 3
    assert meta["prompts"][0].startswith("A detailed pencil sketch of an old grey tortoise")


class _Spy:
    """Counts the suite's per-set calls (by job label), passing them on."""

    def __init__(self, monkeypatch):
        self.generated, self.evaluated = [], []
        generate, evaluate = suite.generate_set, suite.evaluate_set

        def spy_generate(pipe, job):
            self.generated.append(job.label)
            return generate(pipe, job)

        def spy_evaluate(job, *args, **kwargs):
            self.evaluated.append(job.label)
            return evaluate(job, *args, **kwargs)

        monkeypatch.setattr(suite, "generate_set", spy_generate)
        monkeypatch.setattr(suite, "evaluate_set", spy_evaluate)


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_resume_after_a_kill(suite_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    save_frame = StoryOutput.save_frame
    saved = []

    def killed_at_the_sixth_frame(self, index, image):  # story 2's second frame: a half-written folder
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(index)
        return save_frame(self, index, image)

    with monkeypatch.context() as patch:
        patch.setattr(StoryOutput, "save_frame", killed_at_the_sixth_frame)
        assert _suite(out) == 130
    assert "run the same command again" in capsys.readouterr().err
    half = json.loads((out / "base" / "animals_1" / "metadata.json").read_text())
    assert half["status"] == "interrupted" and not (out / "base" / "animals_1" / "eval").exists()
    before = _mtimes(out / "base" / "animals_0")
    assert "eval/report.json" in before and "frames/frame_003.png" in before

    spy = _Spy(monkeypatch)
    assert _suite(out) == 0
    captured = capsys.readouterr()
    assert spy.generated == spy.evaluated == LABELS[1:]  # the finished set is not recomputed
    assert _mtimes(out / "base" / "animals_0") == before
    assert "base/animals_0: done earlier, skipped" in captured.err
    assert "4 stories: 3 generated and scored, 0 scored (generated earlier), 1 done earlier" in captured.out
    # the same frames and numbers as the run that was never interrupted
    resumed, whole = (json.loads((d / "comparison.json").read_text())["configs"] for d in (out, suite_dir))
    for row, expected in zip(resumed, whole, strict=True):
        for key in ("clip_i", "dino", "clip_t", "clip_t_styled"):
            assert math.isclose(row[key], expected[key], rel_tol=1e-6, abs_tol=1e-6)

    # killed during an evaluation (no PNG yet), and a run left "running" by a SIGKILL
    (out / "csa" / "animals_1" / "eval" / "report.png").unlink()
    meta_path = out / "base" / "animals_1" / "metadata.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "status": "running"}))
    spy.generated.clear(), spy.evaluated.clear()
    assert _suite(out) == 0
    assert spy.generated == ["base/animals_1"] and spy.evaluated == ["base/animals_1", "csa/animals_1"]
    assert "1 generated and scored, 1 scored (generated earlier), 2 done earlier" in capsys.readouterr().out

    # a finished run of other settings under a reused name is refused before any work
    spy.generated.clear(), spy.evaluated.clear()
    assert _suite(out, "--config", "base:rate=0.0", "--config", "csa:rate=0.7,window=2") == 2
    err = capsys.readouterr().err
    assert (
        f"{out / 'csa' / 'animals_0'} holds a finished run of other settings (rate 0.5 there, 0.7 now)" in err
    )
    assert spy.generated == spy.evaluated == []


def test_other_encoders_rescore_without_regenerating(suite_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(suite_dir, out)
    spy = _Spy(monkeypatch)
    assert _suite(out, *CONFIGS, "--no-dino") == 0
    assert spy.generated == [] and spy.evaluated == LABELS
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["identity_metrics"] == ["clip_i"] and "dino" not in comparison["configs"][0]
    assert "clip_i,clip_t,clip_t_styled" in (out / "comparison.csv").read_text().splitlines()[0]
    capsys.readouterr()


def test_configurations_take_subject_masks_and_bounds():
    from storydiff.evaluation.suite import parse_config

    config = parse_config("masks:subject-masks=auto,bounded,background-share=0.2")
    assert config.story_options == {"subject_masks": "auto", "bounded": True, "background_share": 0.2}
    assert parse_config("off:subject-masks=off").story_options == {}
    assert parse_config("plain:rate=0.5").story_options == {}
    with pytest.raises(ValueError, match="subject-masks takes auto or off in a suite"):
        parse_config("folder:subject-masks=masks/")
