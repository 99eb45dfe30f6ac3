"""metadata.json has one owner (#22): ``StoryRecord`` writes and reads it, every reader of a run folder goes
through it (``--resume``, ``eval``, ``eval-suite``, ``video``), files written before it had a format
(``tests/data/before_house``, format 1) keep reading, and a file it cannot read is refused in one line
naming it. No model is loaded here."""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from storydiff.pages.output import StoryOutput, read_metadata
from storydiff.pages.record import (
    FORMAT,
    METADATA,
    NewerFormat,
    RecordError,
    StoryRecord,
    check_resume_world,
    read_record,
)

BEFORE = Path(__file__).resolve().parents[1] / "data" / "before_house"


def _folder(tmp_path: Path, data: dict | str, frames: int = 0, name: str = "run") -> Path:
    """A run folder holding ``data`` as its metadata.json (a str is written as it is) and ``frames`` PNGs."""
    root = tmp_path / name
    (root / "frames").mkdir(parents=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (root / METADATA).write_text(text, encoding="utf-8")
    for i in range(frames):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / "frames" / f"frame_{i:03d}.png")
    return root


def _before(name: str) -> dict:
    return json.loads((BEFORE / name / METADATA).read_text(encoding="utf-8"))


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


# ------------------------------------------------------------------------------------------------------
# the record


@pytest.mark.parametrize("folder", ["bank-stored", "window-killed"])
def test_files_from_before_read_as_format_1_with_their_fields(folder: str) -> None:
    record = read_record(BEFORE / folder)
    assert record.format_version == 1 and record.source == BEFORE / folder / METADATA
    assert record.model == "tiny-sd15" and record.story_text.startswith("[Bob] a man with red hair")
    assert len(record.prompts) == len(record.negative_prompts) == len(record.frame_characters) == 5
    assert record.frame_seeds == [0, 1, 2, 3, 4] and record.captions[3] == "Night falls"
    assert record.characters == {
        "Bob": "a man with red hair, wearing a black suit",
        "Alice": "a woman in a yellow dress",
    }
    assert record.frame_characters[4] == ["Bob", "Alice"] and record.world_size == 1 and record.extra == {}
    assert record.model_config is None and record.loras == [] and record.ip_adapter is None
    assert record.versions["storydiff"] == "0.5.0"
    # the same keys as this version writes, "format" aside: format 2 changed nothing else
    assert {k: v for k, v in record.to_dict().items() if k != "format"} == _before(folder)
    if folder == "bank-stored":
        assert record.complete and record.settings["mode"] == "bank" and record.consistency["rate"] == 0.5
        assert record.identity_frames == {"Bob": [0, 2], "Alice": [1]}
        assert record.bank_bytes == {"Bob": 376832, "Alice": 188416} and record.bank_peak_bytes == 565248
        assert record.seconds == 0.37 and record.pages == 2 and record.finished == "2026-12-07T00:20:56"
    else:
        assert record.status == "running" and record.settings["chunk_size"] == 2
        assert record.finished is record.pages is record.bank_bytes is None
    assert read_metadata(BEFORE / folder)["model"] == "tiny-sd15"  # the dict view for scripts


def test_round_trip_writes_format_2_first_and_keeps_unknown_keys(tmp_path) -> None:
    record = read_record(BEFORE / "bank-stored").replace(loras=[("style.safetensors", 0.8)])
    record.extra = {"halo_bytes_sent": 12}  # a newer minor addition: kept, written back, not read
    path = record.write(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert path == tmp_path / METADATA and next(iter(data)) == "format" and data["format"] == FORMAT == 2
    assert data["loras"] == [["style.safetensors", 0.8]] and data["halo_bytes_sent"] == 12
    again = StoryRecord.read(path)
    assert again == record.replace(format_version=2) and again.loras == [("style.safetensors", 0.8)]
    # a running record has no results yet: those keys are not written at all
    running = StoryRecord(model="m", status="running")
    assert "finished" not in running.to_dict() and "error" not in running.to_dict()
    assert StoryRecord.from_dict(running.to_dict()) == running


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ('{"format": 3, "status": "complete"}', ["written by a newer storydiff (format 3)", "reads up to 2"]),
        ('{"format": 0}', ["unknown format 0", "reads 1 to 2"]),
        ('{"format": "2"}', ["unknown format '2'"]),
        ("{not json", ["is not JSON"]),
        ("[1, 2]", ["is not a story record (a JSON list"]),
        ('{"prompts": "a b"}', ["'prompts' should be a list of texts"]),
        ('{"frame_characters": [["Bob"], [3]]}', ["'frame_characters' should be a list of lists of names"]),
        ('{"world_size": true}', ["'world_size' should be a whole number"]),
    ],
)
def test_unreadable_files_are_refused_in_one_line_naming_them(tmp_path, text: str, parts: list[str]) -> None:
    root = _folder(tmp_path, text)
    with pytest.raises(RecordError) as exc:
        read_record(root)
    _one_line(exc, str(root / METADATA), *parts)
    assert isinstance(exc.value, NewerFormat) == ("newer" in parts[0])


def test_a_reader_says_what_it_needs(tmp_path) -> None:
    root = _folder(tmp_path, {"status": "complete", "prompts": ["a"]})
    record = read_record(root, need=["prompts"])
    assert record.prompts == ["a"] and record.characters == {} and record.world_size == 1
    with pytest.raises(RecordError) as exc:
        read_record(root, need=["prompts", "story_text", "settings"], purpose="a test")
    _one_line(exc, str(root / METADATA), "lacks what a test needs: story_text, settings")
    with pytest.raises(RecordError, match=r"cannot read .*nowhere"):
        read_record(tmp_path / "nowhere")


def test_story_output_writes_the_record(tmp_path) -> None:
    written = read_record(BEFORE / "bank-stored")
    output = StoryOutput(tmp_path / "a")
    output.start(written.replace(status=None, finished=None, seconds=None, pages=None))
    running = read_record(tmp_path / "a")
    assert running.status == "running" and running.format_version == 2 and running.finished is None
    assert running.prompts == written.prompts and output.metadata["status"] == "running"
    output.finish(bank_bytes={"Bob": 1}, bank_peak_bytes=1, seconds=0.5, pages=1)
    done = read_record(tmp_path / "a")
    assert done.complete and done.pages == 1 and done.bank_bytes == {"Bob": 1} and done.finished
    with pytest.raises(TypeError):
        output.finish(not_a_field=1)  # results are the record's fields

    dict_output = StoryOutput(tmp_path / "b")  # the dict a run assembles today is read as a file is
    dict_output.start({**_before("window-killed"), "loras": [("x.safetensors", 1.0)]})
    dict_output.fail(KeyboardInterrupt())
    killed = read_record(tmp_path / "b")
    assert killed.status == "interrupted" and "Ctrl-C" in killed.error and killed.settings["mode"] == "window"
    assert killed.loras == [("x.safetensors", 1.0)]


def test_resume_world(tmp_path) -> None:
    check_resume_world(BEFORE / "window-killed", 1)
    root = _folder(tmp_path, {**_before("window-killed"), "world_size": 2})
    with pytest.raises(ValueError, match=r"generated by 2 process\(es\).*not 1"):
        check_resume_world(root, 1)


# ------------------------------------------------------------------------------------------------------
# its readers


def _resume_args(folder: Path) -> argparse.Namespace:
    from storydiff.cli.generate_flags import RUN_FLAGS

    return argparse.Namespace(resume=str(folder), **{name: None for name in RUN_FLAGS})


def test_resume_reads_the_record(tmp_path) -> None:
    from storydiff.cli.generate import _from_resume

    root = tmp_path / "killed"
    shutil.copytree(BEFORE / "window-killed", root)
    job = _from_resume(_resume_args(root))
    assert job.model == "tiny-sd15" and job.settings.mode == "window" and job.settings.chunk_size == 2
    assert job.config.window == 1 and len(job.story.frames) == 5 and job.files["loras"] == []
    assert job.ip == {"adapter": None, "references": {}}

    (root / METADATA).write_text(
        json.dumps({k: v for k, v in _before("window-killed").items() if k != "consistency"})
    )
    with pytest.raises(RecordError) as exc:
        _from_resume(_resume_args(root))
    _one_line(exc, str(root / METADATA), "lacks what a resume needs: consistency")
    (root / METADATA).write_text(json.dumps({**_before("window-killed"), "format": 9}))
    with pytest.raises(NewerFormat, match="format 9"):
        _from_resume(_resume_args(root))


def test_resume_on_the_command_line_says_what_the_file_lacks(tmp_path, capsys, monkeypatch) -> None:
    import storydiff.models.loading
    from storydiff.cli import main

    monkeypatch.setattr(storydiff.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    root = _folder(tmp_path, {"status": "running", "model": "tiny-sd15"})
    assert main(["generate", "--resume", str(root)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lacks what a resume needs: story_text, settings, consistency" in errors[0]


def test_eval_reads_the_record(tmp_path) -> None:
    from storydiff.evaluation.report import read_story_frames

    root = _folder(tmp_path, _before("bank-stored"), frames=5)
    frames = read_story_frames(root)
    assert frames.record.model == "tiny-sd15" and frames.indices == [0, 1, 2, 3, 4]
    assert frames.character_names == ["Bob", "Alice"] and frames.characters[4] == ["Bob", "Alice"]
    assert frames.texts[3] == "a quiet street at night" and frames.prompts[0].startswith("comic book panel")

    lacking = _folder(tmp_path, {**_before("bank-stored"), "prompts": None}, frames=5, name="lacking")
    with pytest.raises(RecordError) as exc:
        read_story_frames(lacking)
    _one_line(exc, str(lacking / METADATA), "lacks what an evaluation needs: prompts")
    running = _folder(tmp_path, _before("window-killed"), frames=2, name="running")
    with pytest.raises(ValueError, match="status 'running'"):
        read_story_frames(running)
    assert read_story_frames(running, allow_incomplete=True).indices == [0, 1]


def test_eval_suite_reads_the_record(tmp_path) -> None:
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.evaluation.suite import _generated
    from storydiff.pages.story import parse_story
    from storydiff.runs.settings import RunSettings

    before = read_record(BEFORE / "bank-stored")
    root = _folder(tmp_path, _before("bank-stored"))
    job = SimpleNamespace(
        folder=root,
        model=before.model,
        story=parse_story(before.story_text),
        settings=RunSettings.from_dict(before.settings),
        consistency=ConsistencyConfig.from_dict(before.consistency),
    )
    assert _generated(job)  # a run written before reads as this job's complete run
    with pytest.raises(ValueError, match=r"holds a finished run of other settings .*model 'tiny-sd15' there"):
        _generated(SimpleNamespace(**{**vars(job), "model": "tiny-sdxl"}))
    (root / METADATA).write_text("{half")  # unreadable: generated again
    assert not _generated(job)
    (root / METADATA).write_text(json.dumps({**_before("bank-stored"), "status": "running"}))
    assert not _generated(job)
    (root / METADATA).write_text(json.dumps({**_before("bank-stored"), "format": 3}))
    with pytest.raises(NewerFormat):  # a newer storydiff's run is not replaced
        _generated(job)


def test_video_reads_the_record(tmp_path) -> None:
    from storydiff.motion.story_video import read_story_frames

    complete = _folder(tmp_path, _before("bank-stored"), frames=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_story_frames(complete)) == 3
    running = _folder(tmp_path, _before("window-killed"), frames=2, name="running")
    with pytest.warns(RuntimeWarning, match="status 'running'; using the 2 frames present"):
        read_story_frames(running)
    newer = _folder(tmp_path, {"format": 3, "status": "complete"}, frames=2, name="newer")
    with pytest.warns(RuntimeWarning, match=r"newer storydiff \(format 3\).*using the 2 frames present"):
        read_story_frames(newer)
    broken = _folder(tmp_path, "{half", frames=2, name="broken")
    with pytest.warns(RuntimeWarning, match="is not JSON"):
        read_story_frames(broken)
