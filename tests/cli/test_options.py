"""The option table (``runs/options.py``) is the one declaration of a run's settings: the ``generate``
parser, what ``--resume`` refuses, the wrong-mode errors and ``eval-suite``'s configurations all come from
it, and window mode's window has one default in the library and the CLI. No model loads here."""

import argparse

import pytest

import storydiff.models.loading
from storydiff.cli import build_parser, main
from storydiff.cli.generate import _from_flags
from storydiff.cli.generate_flags import FLAGS, RUN_FLAGS
from storydiff.consistency.config import WINDOW_MODE_WINDOW, ConsistencyConfig, InvalidSetting
from storydiff.evaluation.suite import ALLOWED_KEYS, parse_config
from storydiff.runs.options import GROUPS, MODES, OPTIONS, SUITE_OPTIONS, option, restricted
from storydiff.runs.settings import RunSettings, default_of

STORY = "[Bob] a man with red hair\n[Alice] a woman in a yellow dress\n---\n[Bob] walks\n[Alice] reads\n"
# a value each option takes (the last choice: rarely the default); the rest by type
VALUES = {
    "style": "photographic",
    "negative": "blurry",
    "level_rate": "32=0.5",
    "height": "64",
    "width": "72",
    "freeu": "0.6,0.4,1.1,1.2",
    "window": "3",
    "rate": "0.25",
    "ref": "Bob=bob.png",
    "load_bank": "bank.safetensors",
    "lora": "lora.safetensors",
}


def value(opt) -> list[str]:
    """``opt``'s flag and a value it takes, as typed on the command line."""
    if opt.action == "store_true":
        return [opt.flag]
    if opt.name in VALUES:
        return [opt.flag, VALUES[opt.name]]
    if opt.choices:
        return [opt.flag, opt.choices[-1]]
    return [opt.flag, {int: "3", float: "0.5"}.get(opt.parse, "x")]


def other_mode(opt) -> str:
    return next(mode for mode in MODES if not opt.applies(mode))


def generate_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["generate"]


@pytest.fixture
def no_model(monkeypatch):
    refuse = lambda *a, **k: pytest.fail("a model was loaded")  # noqa: E731
    monkeypatch.setattr(storydiff.models.loading, "load_pipeline", refuse)


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY)
    return path


def test_the_generate_parser_is_the_table():
    parser = generate_parser()
    shared = {"-h", "--help", "--verbose", "--debug"}  # argparse's and every command's (cli/common.py)
    actions = {a.option_strings[-1]: a for a in parser._actions if not set(a.option_strings) & shared}
    assert sorted(actions) == sorted(opt.flag for opt in OPTIONS)  # every entry a flag, every flag an entry
    titles = [group.title for group in parser._action_groups]
    assert titles[-len(GROUPS) :] == list(GROUPS)
    for opt in OPTIONS:
        action = actions[opt.flag]
        group = next(g for g in parser._action_groups if action in g._group_actions)
        assert (action.dest, group.title, action.choices) == (opt.name, opt.group, opt.choices), opt.name
        assert "{" not in action.help and (action.default is None or opt.owner == "cli"), opt.name
        args = parser.parse_args(["--model", "m", *value(opt)])
        assert getattr(args, opt.name) is not None, opt.name
    help_text = " ".join(parser.format_help().split())
    for opt in OPTIONS:  # a "(default: ...)" in the help is the owner's default
        if "{default}" in opt.help:
            assert f"(default: {default_of(opt)})" in help_text, opt.name
    assert option("window").mode_defaults == {"window": WINDOW_MODE_WINDOW}
    assert FLAGS["num_inference_steps"] == "--steps" and FLAGS["level_rates"] == "--level-rate"


def test_what_resume_refuses_is_what_the_metadata_keeps(tmp_path, capsys, no_model):
    assert set(RUN_FLAGS) == {opt.name for opt in OPTIONS if opt.metadata} | {"out", "overwrite"}
    stored = {"settings": RunSettings().to_dict(), "consistency": ConsistencyConfig().to_dict()}
    for opt in OPTIONS:
        for key in (opt.metadata or "").split(", "):
            block, _, name = key.partition(".")
            assert block not in stored or not name or name in stored[block], (opt.name, key)
    folder = tmp_path / "run"
    folder.mkdir()
    refused = [word for opt in OPTIONS if opt.refused_on_resume for word in value(opt)]
    assert main(["generate", "--resume", str(folder), *refused]) == 2
    err = capsys.readouterr().err
    flags = err.partition("drop ")[2].partition(" (or")[0].split(", ")
    assert sorted(flags) == sorted(opt.flag for opt in OPTIONS if opt.refused_on_resume)


@pytest.mark.parametrize("opt", restricted(), ids=lambda opt: opt.name)
def test_a_flag_in_a_mode_it_does_not_apply_to_is_refused_as_the_table_says(
    tmp_path, story, capsys, no_model, opt
):
    mode = other_mode(opt)
    argv = ["generate", "--model", "tiny-sd15", "--story", str(story), "--out", str(tmp_path / "out")]
    assert main([*argv, "--mode", mode, *value(opt)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {opt.flag} {opt.problem_in(mode)}"
    if opt.owner == "settings":  # the library says the same, naming the field
        parsed = generate_parser().parse_args(value(opt))
        with pytest.raises(InvalidSetting) as info:
            RunSettings(mode=mode, **opt.fields(getattr(parsed, opt.name)))
        assert (info.value.field, info.value.problem) == (opt.field, opt.problem_in(mode))
    assert not (tmp_path / "out").exists()


def _suite_cases() -> list[list[str]]:
    cases = []
    # each key alone, in a mode it applies to; the story-call options (subject masks, bounds: the command's
    # own) need each other and a mask source: tests/eval/test_suite.py checks what they pass
    for opt in (opt for opt in SUITE_OPTIONS if opt.owner != "cli"):
        mode = [] if opt.applies("bank") or opt.name == "mode" else ["--mode", "window"]
        cases.append([*mode, *value(opt)])
    cases.append(["--mode", "window", "--level-rate", "32=0.5", "--level-rate", "16=0.3", "--no-skip"])
    cases.append(["--mode", "window", "--tile", "3"])  # window mode's window, with a tile too
    return cases


@pytest.mark.parametrize("flags", _suite_cases(), ids=" ".join)
def test_an_eval_suite_configuration_is_generate_with_the_same_flags(tmp_path, story, flags):
    args = build_parser().parse_args(
        ["generate", "--model", "m", "--story", str(story), "--out", str(tmp_path / "o"), *flags]
    )
    job = _from_flags(args)
    items = []  # --flag value → flag=value, a switch bare
    for word in flags:
        if word.startswith("--"):
            items.append(word[2:])
        else:
            items[-1] += f"={word}"
    config = parse_config("c:" + ",".join(items))
    settings, consistency = config.build(RunSettings())
    assert settings.to_dict() == job.settings.to_dict()
    assert consistency.to_dict() == job.config.to_dict()
    assert tuple(opt.key for opt in SUITE_OPTIONS) == ALLOWED_KEYS


def test_window_mode_has_one_window_default(tmp_path, story):
    library = ConsistencyConfig().resolved("window")
    assert library.window == WINDOW_MODE_WINDOW and ConsistencyConfig().resolved("bank").window is None
    args = build_parser().parse_args(
        ["generate", "--model", "m", "--story", str(story), "--out", str(tmp_path / "o"), "--mode", "window"]
    )
    assert _from_flags(args).config.window == library.window
    window = parse_config("long:mode=window")
    assert window.build(RunSettings())[1].window == library.window
    assert "(default: 2 in window mode)" in " ".join(generate_parser().format_help().split())


def test_the_library_run_fills_in_window_modes_window():
    """A window-mode run from the library without a window runs with the CLI's default and records it."""
    from storydiff import StoryDiffusionPipeline

    sp = StoryDiffusionPipeline.from_pretrained("tiny-sd15", ConsistencyConfig())
    result = sp(
        "[Bob] a man\n---\n[Bob] walks\n[Bob] sits\n[Bob] runs\n",
        mode="window",
        num_inference_steps=1,
        progress=False,
    )
    assert result.metadata["consistency"]["window"] == WINDOW_MODE_WINDOW
    assert sp.config.window is None and sp.state.config.window is None  # the installed config is left alone
