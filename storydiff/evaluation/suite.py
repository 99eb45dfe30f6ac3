"""A benchmark suite: every set of a benchmark file under every configuration, generated, evaluated, compared.

Each (configuration, set) pair is one story run in ``OUT/<config>/<set-id>/`` — a normal ``storydiff
generate`` folder — scored by ``evaluate_story`` into its ``eval/``. The suite resumes by looking at what is
on disk: a folder whose run is complete and whose evaluation is complete (with the same encoders) is
skipped, a complete run without its evaluation is only evaluated, anything else (no folder, a run killed
half-way) is generated again from scratch. A complete run made with other settings than the ones asked for
now is an error, not an overwrite: it may be hours of work under a reused configuration name.

Everything is checked before the model loads (the file, every configuration, every set under every
configuration), and the model and the encoders load only if some story needs them, once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..consistency.config import ConsistencyConfig, InvalidSetting
from ..pages.output import METADATA, check_output_folder
from ..pages.record import NewerFormat, RecordError, StoryRecord, read_record
from ..pages.story import Story, parse_story, story_source
from ..runs.options import SUITE_OPTIONS, flag_for, option_for_field, split_fields
from ..runs.settings import RunSettings, consistency_for, from_options
from ..support.progress import Progress, progress_bar
from .benchmark_file import BenchmarkSet

__all__ = [
    "ALLOWED_KEYS",
    "SuiteConfig",
    "SuiteJob",
    "SuiteResult",
    "aggregate",
    "build_comparison",
    "evaluate_set",
    "generate_set",
    "job_state",
    "parse_config",
    "plan_suite",
    "read_job_report",
    "run_suite",
]

# The files ``writers.write_report`` puts into ``eval/``: an evaluation is finished when all are there
# (each is written atomically, but a kill can fall between two of them).
EVAL_FILES = ("report.json", "frames.csv", "characters.csv", "report.png")


# Configuration keys: the flags of `storydiff generate` that change the frames (the option table's
# SUITE_OPTIONS). The seed is the suite's (--seed), the same for every configuration, so that
# configurations differ only in what they name; options that change no frame (pages, fonts, saved banks,
# checkpoints, torchrun) are left out.
ALLOWED_KEYS = tuple(option.key for option in SUITE_OPTIONS)
_BY_KEY = {option.key: option for option in SUITE_OPTIONS}
_KINDS = {int: "a whole number", float: "a number"}
_CONFIG_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")
# what the suite itself writes into OUT beside the configurations' folders
RESERVED_NAMES = ("comparison.json", "comparison.csv", "tradeoff.png", "suite.json")
# keys of the old syntax (RunSettings / ConsistencyConfig field names) that no flag sets
_NO_FLAG = ("skip_prob_early", "skip_prob_late", "skip_switch_step")


def _key(text: str) -> str:
    """A key as the flag spells it: ``--level_rate`` → ``level-rate``."""
    return text.strip().removeprefix("--").replace("_", "-")


def _rewrite(key: str, value: str) -> str | None:
    """How to write ``key=value`` of the old syntax (field names, ``level_rates=32:0.5+16:0.3``, ``none`` for
    an optional value) as flags, or None if it is not of that syntax."""
    if key in _NO_FLAG:
        return "write no-skip to turn the layer skips off (no flag of storydiff generate sets their odds)"
    if key == "level_rates":
        items = [item.partition(":") for item in value.split("+")]
        if all(level and colon and rate for level, colon, rate in items):
            return "write " + ",".join(f"level-rate={level}={rate}" for level, _, rate in items)
        return "write level-rate=LEVEL=RATE once per level, e.g. level-rate=32=0.5,level-rate=16=0.3"
    found = _BY_KEY.get(_key(key)) or option_for_field(key)
    if found is None or not found.suite:
        return None
    takes_none = found.parse is None and (found.choices is None or "none" in found.choices)
    if value.lower() == "none" and not takes_none:
        return f"leave {found.key} out for its default ({found.flag} takes no 'none')"
    return f"write {found.key}={value}" if found.key != _key(key) else None


@dataclass(frozen=True)
class SuiteConfig:
    """A named configuration: the values of `storydiff generate` options (``values``, by option name) that
    differ from the suite's base; ``run`` and ``consistency`` are the RunSettings and ConsistencyConfig
    fields they set; ``text`` is the form it was given in."""

    name: str
    values: dict
    text: str

    @property
    def run(self) -> dict:
        return split_fields(self.values)[0]

    @property
    def consistency(self) -> dict:
        return split_fields(self.values)[1]

    def build(self, base: RunSettings) -> tuple[RunSettings, ConsistencyConfig]:
        """The run's settings and configuration over ``base``, made as `storydiff generate` makes them."""
        return from_options(self.values, base=base)

    def settings(self, base: RunSettings) -> RunSettings:
        return self.build(base)[0]

    def consistency_config(self, settings: RunSettings) -> ConsistencyConfig:
        return consistency_for(settings, self.consistency)

    @property
    def story_options(self) -> dict:
        """What the story call takes besides settings (``StoryDiffusionPipeline.__call__``): subject masks
        (``auto`` only: benchmark sets have no mask folders), bounded attention, the background share."""
        masks = self.values.get("subject_masks")
        options = {} if masks in (None, "off") else {"subject_masks": masks}
        if self.values.get("bounded"):
            options["bounded"] = True
        if self.values.get("background_share") is not None:
            options["background_share"] = self.values["background_share"]
        return options


def parse_config(text: str, base: RunSettings | None = None) -> SuiteConfig:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``, each item a flag of `storydiff generate` as it is typed
    there, its ``--`` optional and ``_`` / ``-`` alike (keys: ``ALLOWED_KEYS``): ``level-rate=32=0.5``
    (repeatable, as the flag), ``no-skip`` (a switch, bare). ``csa:rate=0.5,level-rate=32=0.5`` runs what
    ``storydiff generate --rate 0.5 --level-rate 32=0.5`` runs. ValueError naming the configuration and what
    is wrong (an item of the old syntax — field names, ``level_rates=32:0.5+16:0.3``, ``none`` — says how to
    write it now); the values are checked by RunSettings and ConsistencyConfig themselves (over
    ``base``)."""
    name, _, body = text.partition(":")
    name = name.strip()
    if name in RESERVED_NAMES:
        raise ValueError(
            f"--config {text!r}: {name!r} is the name of a file the suite writes; choose another"
        )
    if not _CONFIG_NAME.fullmatch(name):
        raise ValueError(
            f"--config {text!r}: the name must be 1-64 letters, digits, '_', '.' or '-' (it names a folder), "
            f"got {name!r}; expected NAME:KEY=VALUE,KEY=VALUE"
        )
    values: dict = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, value = (part.strip() for part in item.partition("="))
        rewrite = _rewrite(key, value) if equals else None
        if rewrite is not None:
            raise ValueError(
                f"--config {text!r}: {item} is the old syntax; {rewrite} (configurations take the flags of "
                "storydiff generate)"
            )
        found = _BY_KEY.get(_key(key))
        if found is None:
            raise ValueError(
                f"--config {text!r}: unknown key {key!r}; allowed keys: {', '.join(ALLOWED_KEYS)}"
            )
        if found.action == "store_true":
            if equals:
                raise ValueError(f"--config {text!r}: {found.key} is a switch: give it bare, got {item!r}")
            parsed = True
        elif not equals:
            raise ValueError(f"--config {text!r}: expected KEY=VALUE, got {item!r}")
        else:
            try:
                parsed = (found.parse or str)(value)
            except ValueError as exc:
                kind = _KINDS.get(found.parse)
                problem = f"expected {kind}, got {value!r}" if kind else str(exc)
                raise ValueError(f"--config {text!r}: {found.key}: {problem}") from None
        if found.action == "append":
            values.setdefault(found.name, []).append(parsed)
        elif found.name in values:
            raise ValueError(f"--config {text!r}: {found.key} is given twice")
        else:
            values[found.name] = parsed
    masks = values.get("subject_masks")
    if masks not in (None, "off", "auto"):
        raise ValueError(
            f"--config {text!r}: subject-masks takes auto or off in a suite (benchmark sets have no mask "
            f"folders), got {masks!r}"
        )
    config = SuiteConfig(name, values, text)
    try:
        config.build(base or RunSettings())
    except InvalidSetting as exc:
        key = flag_for(exc.field).removeprefix("--")  # its key: the flag without --
        raise ValueError(f"--config {text!r}: {key} {exc.problem}") from None
    except ValueError as exc:  # a value its flag cannot take: --level-rate 16:0.5
        raise ValueError(f"--config {text!r}: {exc}") from None
    return config


@dataclass(frozen=True)
class SuiteJob:
    """One story run of the suite: a benchmark set under a configuration, and where it goes."""

    config: SuiteConfig
    set: BenchmarkSet
    model: str
    story: Story
    settings: RunSettings
    consistency: ConsistencyConfig
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.config.name}/{self.set.id}"


def plan_suite(
    sets: list[BenchmarkSet],
    configs: list[SuiteConfig],
    *,
    model: str,
    out_dir: str | os.PathLike,
    base: RunSettings,
) -> list[SuiteJob]:
    """Every (configuration, set) job, configurations outermost; ValueError naming the set and the
    configuration for a set that cannot run under it (e.g. fewer frames than identity frames), or for two
    configurations of one name. Nothing is created."""
    from ..runs.plan import check_run

    names = [config.name for config in configs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"--config names must differ (each names a folder); given twice: {', '.join(twice)}")
    jobs = []
    for config in configs:
        settings, consistency = config.build(base)
        for one in sets:
            story = parse_story(one.story_text())
            folder = Path(out_dir) / config.name / one.id
            try:
                check_run(story, settings, consistency)
                check_output_folder(folder, overwrite=True)
            except (InvalidSetting, OSError, ValueError) as exc:
                raise ValueError(f"set {one.id!r} under --config {config.name}: {exc}") from None
            jobs.append(SuiteJob(config, one, model, story, settings, consistency, folder))
    return jobs


# ------------------------------------------------------------------------------------------------------
# What is on disk


def _json_form(data):
    """``data`` as it reads back from a JSON file (tuples as lists, int keys as text)."""
    return json.loads(json.dumps(data, default=str))


def _differences(job: SuiteJob, record: StoryRecord) -> list[str]:
    """How the complete run in ``job.folder`` differs from the run the job asks for."""
    differences = []
    if record.model != job.model:
        differences.append(f"model {record.model!r} there, {job.model!r} now")
    if record.story_text != story_source(job.story):
        differences.append("another story (the benchmark set changed)")
    stored, wanted = record.settings or {}, _json_form(job.settings.to_dict())
    for key, value in wanted.items():
        # a size not given is the model's, filled in by the pipeline: any stored size matches it
        if value is not None and stored.get(key) != value:
            differences.append(f"{key} {stored.get(key)!r} there, {value!r} now")
    stored, wanted = record.consistency or {}, _json_form(job.consistency.to_dict())
    for key, value in wanted.items():
        if stored.get(key) != value:
            differences.append(f"{key} {stored.get(key)!r} there, {value!r} now")
    return differences


def _generated(job: SuiteJob) -> bool:
    """Whether ``job.folder`` holds this job's complete run; ValueError if it holds a complete run of
    other settings (never overwritten: rename the configuration, or delete the folder)."""
    if not (job.folder / METADATA).is_file():
        return False
    try:
        record = read_record(job.folder)
    except NewerFormat:  # a newer storydiff's run: not replaced by this one
        raise
    except RecordError:  # unreadable: a half-written folder, done again
        return False
    if not record.complete:
        return False
    differences = _differences(job, record)
    if differences:
        raise ValueError(
            f"{job.folder} holds a finished run of other settings ({'; '.join(differences)}); give the "
            "configuration another name or the suite another --out, or delete that folder to redo it"
        )
    return True


def _evaluated(job: SuiteJob, encoders: dict[str, str | None]) -> bool:
    """Whether ``job.folder/eval`` holds a whole evaluation of the complete run, by ``encoders``."""
    folder = job.folder / "eval"
    if not all((folder / name).is_file() for name in EVAL_FILES):
        return False
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    whole = report.get("status") == "complete" and report.get("frames_missing") == []
    used = report.get("encoders") or {}
    return whole and all(used.get(kind) == source for kind, source in encoders.items())


def job_state(job: SuiteJob, encoders: dict[str, str | None]) -> str:
    """The job's state on disk, by the rules ``run_suite`` resumes by: "finished" (generated and evaluated
    by ``encoders``), "generated" (only to be scored) or "todo" (no complete run: generated again from
    scratch); ValueError for a finished run of other settings (``_generated``)."""
    if not _generated(job):
        return "todo"
    return "finished" if _evaluated(job, encoders) else "generated"


def read_job_report(job: SuiteJob) -> dict:
    """The job's ``eval/report.json``, as ``run_suite`` reports it."""
    return json.loads((job.folder / "eval" / "report.json").read_text("utf-8"))


# ------------------------------------------------------------------------------------------------------
# The work of one job (module functions, so a test can count or interrupt them)


def generate_set(pipe, job: SuiteJob) -> None:
    """Generate ``job``'s story into its folder on the loaded diffusers pipeline ``pipe``, replacing any
    half-written run there. A fresh StoryDiffusionPipeline per story: a bank kept by one story (the stored
    schedule keeps them) must not be read by the next story's character of the same name."""
    from ..pipeline import StoryDiffusionPipeline

    shutil.rmtree(job.folder / "eval", ignore_errors=True)  # scores of an earlier, unfinished run
    story_pipe = StoryDiffusionPipeline(pipe, job.consistency, model_name=job.model)
    try:
        options = job.config.story_options
        story_pipe(job.story, job.settings, out_dir=job.folder, overwrite=True, progress=False, **options)
    finally:
        story_pipe.close()


def evaluate_set(job: SuiteJob, clip, dino, *, batch_size: int = 16) -> dict:
    """Score ``job``'s complete run into its ``eval/``; the report."""
    from .report import evaluate_story

    return evaluate_story(job.folder, clip, dino, batch_size=batch_size).report


# ------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class SuiteResult:
    """What the suite did per job label: "generated" (and evaluated), "evaluated" (a complete run scored)
    or "skipped" (done before); the per-set reports by job label."""

    actions: dict[str, str] = dataclasses.field(default_factory=dict)
    reports: dict[str, dict] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        done = list(self.actions.values())
        return {what: done.count(what) for what in ("generated", "evaluated", "skipped")}


def run_suite(
    jobs: list[SuiteJob],
    *,
    load_pipe: Callable[[], object],
    load_encoders: Callable[[], tuple],
    encoders: dict[str, str | None],
    batch_size: int = 16,
    progress: Progress = True,
    on_done: Callable[[SuiteJob, str, float], None] | None = None,
    desc: str = "eval-suite",
) -> SuiteResult:
    """Run every job not done yet (module docstring); ``load_pipe()`` and ``load_encoders()`` (→ clip,
    dino or None) are called once, when first needed; ``encoders`` names their sources ({"clip", "dino"}),
    which a finished evaluation must match. Raises what a job raises (KeyboardInterrupt included): the
    jobs finished until then stay finished, and a run again continues after them. ``on_done(job, action,
    seconds)`` is called after each job this call finished ("generated" or "evaluated", not "skipped"),
    with the seconds it took (the first one's include loading what it needed): the ranks of a sharded
    suite write their done markers there (``suite_ranks.py``)."""
    result = SuiteResult()
    # every folder is read first, so that a finished run of other settings stops the suite before it works
    generated = {job.label: _generated(job) for job in jobs}
    pipe = models = None
    bar = progress_bar(len(jobs), desc, "story", progress)
    try:
        for job in jobs:
            started = time.perf_counter()
            if generated[job.label] and _evaluated(job, encoders):
                action = "skipped"
                bar.set_postfix_str(f"{job.label}: done earlier, skipped")
            else:
                if not generated[job.label]:
                    bar.set_postfix_str(f"{job.label}: generating")
                    pipe = pipe if pipe is not None else load_pipe()
                    generate_set(pipe, job)
                bar.set_postfix_str(f"{job.label}: evaluating")
                models = models if models is not None else load_encoders()
                evaluate_set(job, *models, batch_size=batch_size)
                action = "evaluated" if generated[job.label] else "generated"
                bar.set_postfix_str(f"{job.label}: {action}")
            result.actions[job.label] = action
            result.reports[job.label] = read_job_report(job)
            if on_done is not None and action != "skipped":
                on_done(job, action, time.perf_counter() - started)
            bar.update()
    finally:
        bar.close()
    return result


# ------------------------------------------------------------------------------------------------------
# Aggregation


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def set_scores(report: dict) -> dict[str, float | None]:
    """One set's numbers: per identity metric the mean over its characters of their pairwise mean (None
    when no character has two frames), and its mean CLIP-T (story text, styled prompt)."""
    scores = {
        metric: _mean((entry.get(metric) or {}).get("mean") for entry in report["characters"].values())
        for metric in report["identity_metrics"]
    }
    scores.update(clip_t=report["clip_t_mean"], clip_t_styled=report["clip_t_styled_mean"])
    return scores


def aggregate(jobs: list[SuiteJob], reports: dict[str, dict]) -> list[dict]:
    """Per configuration, in the order given: its options, resolved settings, and the mean over its sets
    of each set's scores (``set_scores``), with the per-set scores beside them."""
    rows = []
    for name in dict.fromkeys(job.config.name for job in jobs):
        mine = [job for job in jobs if job.config.name == name]
        config = mine[0].config
        per_set = {job.set.id: set_scores(reports[job.label]) for job in mine}
        keys = list(dict.fromkeys(key for scores in per_set.values() for key in scores))
        rows.append(
            {
                "config": config.name,
                "options": config.text.partition(":")[2],
                "sets": len(per_set),
                **{key: _mean(scores.get(key) for scores in per_set.values()) for key in keys},
                "settings": mine[0].settings.to_dict(),
                "consistency": _json_form(mine[0].consistency.to_dict()),
                "per_set": per_set,
            }
        )
    return rows


def build_comparison(
    jobs: list[SuiteJob], reports: dict[str, dict], *, benchmark: str, encoders: dict[str, str | None]
) -> dict:
    """What ``comparison.json`` holds: where the numbers come from, and ``aggregate``'s rows."""
    first = reports[jobs[0].label]
    return {
        "benchmark": benchmark,
        "model": jobs[0].model,
        "encoders": encoders,
        "identity_metrics": first["identity_metrics"],
        "note": first.get("note"),
        "configs": aggregate(jobs, reports),
    }
