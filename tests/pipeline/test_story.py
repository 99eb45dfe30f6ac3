"""Story file parsing, prompt substitution, identity frames, and style templates."""

from __future__ import annotations

import warnings

import pytest

from storydiff.pages.story import (
    Character,
    Frame,
    IdentityFramesWarning,
    Story,
    load_story,
    parse_story,
    story_source,
)
from storydiff.pages.styles import DEFAULT_STYLE, OFFICIAL_NAMES, STYLES, apply_style, get_style

BOB = "a man, wearing a black suit"
ALICE = "a woman with red hair, in a green coat"

STORY = f"""\
// two characters
[Bob] {BOB}
[Alice] {ALICE}

---
[Bob] wakes up in a small flat #Monday.
[Bob] walks in the park
// a comment between frames
[NC] an empty bench under a tree #Nobody came.
[Alice] reads a letter at the window #
[Bob] and [Alice] have dinner by candlelight # At last. #2
[Alice] smiles
"""


def test_parse_two_characters() -> None:
    story = parse_story(STORY)
    assert story.characters == {"Bob": Character("Bob", BOB), "Alice": Character("Alice", ALICE)}
    assert list(story.characters) == ["Bob", "Alice"]  # definition order
    assert len(story.frames) == 6
    first = story.frames[0]
    assert first == Frame(
        index=0, text="[Bob] wakes up in a small flat", characters=("Bob",), caption="Monday.", line=6
    )
    assert [f.index for f in story.frames] == list(range(6))
    assert [f.line for f in story.frames] == [6, 7, 9, 10, 11, 12]
    assert story.frames[1].caption is None
    assert story.frames[2].characters == ()
    assert story.frames[2].caption == "Nobody came."
    assert story.frames[3].caption == ""  # a bare '#': no caption
    dinner = story.frames[4]
    assert dinner.characters == ("Bob", "Alice")
    assert dinner.text == "[Bob] and [Alice] have dinner by candlelight # At last."  # split at the LAST '#'
    assert dinner.caption == "2"
    assert story.captions() == ["Monday.", None, "Nobody came.", None, "2", None]


def test_prompt_substitution() -> None:
    story = parse_story(STORY)
    assert story.prompt(story.frames[1]) == f"{BOB} walks in the park"
    assert story.prompt(story.frames[2]) == "an empty bench under a tree"
    assert story.prompts()[4] == f"{BOB} and {ALICE} have dinner by candlelight # At last."


def test_prompt_whitespace_and_glued_tags() -> None:
    story = parse_story("[Bob] a man\n---\n  [Bob]walks   in\tthe  park  \n")
    assert story.prompt(story.frames[0]) == "a man walks in the park"


def test_frames_of_and_repeated_tags() -> None:
    story = parse_story(STORY + "[Alice] waves at [Bob], then [Alice] leaves\n")
    assert story.frames[-1].characters == ("Alice", "Bob")
    assert story.frames_of("Bob") == [0, 1, 4, 6]
    assert story.frames_of("Alice") == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="'Carol'"):
        story.frames_of("Carol")


def test_identity_frames() -> None:
    story = parse_story(STORY)
    assert story.identity_frames(1) == {"Bob": [0], "Alice": [3]}
    assert story.identity_frames(2) == {"Bob": [0, 1], "Alice": [3, 5]}
    assert list(story.identity_frames(2)) == ["Bob", "Alice"]


def test_fewer_solo_frames_than_asked_uses_those_with_a_warning() -> None:
    story = parse_story(STORY)  # Bob alone in 2 frames, Alice in 2
    with pytest.warns(IdentityFramesWarning) as record:
        assert story.identity_frames(3) == {"Bob": [0, 1], "Alice": [3, 5]}
    assert [str(w.message).split(":")[0] for w in record] == [
        "character 'Bob' appears alone in only 2 frame(s)",
        "character 'Alice' appears alone in only 2 frame(s)",
    ]
    assert "instead of 3 identity frames (--id-frames" in str(record[0].message)
    assert story.identity_shortfalls(3) == {"Bob": 2, "Alice": 2}
    assert story.identity_shortfalls(2) == {}
    assert story.identity_shortfalls(3, names=["Alice"]) == {"Alice": 2}


def test_enough_solo_frames_means_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_story(STORY).identity_frames(2) == {"Bob": [0, 1], "Alice": [3, 5]}


def test_no_solo_frame_is_an_error_that_says_how_to_fix_it() -> None:
    # A frame with two characters does not count as an identity frame.
    only_pair = parse_story("[Bob] b\n[Alice] a\n---\n[Bob] and [Alice] sit\n[Alice] runs\n")
    with pytest.raises(ValueError) as info:
        only_pair.identity_frames(1)
    assert str(info.value) == (
        "character 'Bob' never appears alone in a frame (it shares line(s) 4 with other characters), so no "
        "identity frame can show it alone; add a frame where it is the only character, e.g. '[Bob] "
        "standing, full-length portrait'"
    )
    # restricted to characters that need identity frames (e.g. Bob's bank is loaded), it runs
    assert only_pair.identity_frames(1, names=["Alice"]) == {"Alice": [1]}


def test_panel_captions_default_to_the_line_without_its_tags() -> None:
    story = parse_story(
        "[Bob] b\n[Alice] a\n---\n[Bob] walks in the park #A walk\n[Bob] and [Alice]  sit\n"
        "[NC] an empty bench\nrain over[Bob]'s house\n"
    )
    expected = ["A walk", "Bob and Alice sit", "an empty bench", "rain over Bob's house"]
    assert story.panel_captions() == expected
    assert story.panel_captions("hash") == ["A walk", None, None, None]
    assert story.panel_captions("none") == [None] * 4
    assert story.captions() == story.panel_captions("hash")
    with pytest.raises(ValueError, match="caption source must be one of line, hash, none, got 'tags'"):
        story.panel_caption(story.frames[0], "tags")


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_identity_frames_bad_count(count: object) -> None:
    with pytest.raises(ValueError, match="id_frames must be an integer >= 1"):
        parse_story(STORY).identity_frames(count)  # type: ignore[arg-type]


def test_unused_character_is_not_required() -> None:
    story = parse_story("[Bob] b\n[Eve] e\n---\n[Bob] sits\n")
    assert story.identity_frames(1) == {"Bob": [0]}
    assert story.frames_of("Eve") == []


def test_three_or_more_characters() -> None:
    text = "[A] alpha\n[B] beta\n[C] gamma\n[Dee Dee_2-x] delta\n---\n"
    text += "[A] one\n[B] two\n[C] three\n[Dee Dee_2-x] four\n"
    text += "[A], [B], [C] and [Dee Dee_2-x] together\n"
    story = parse_story(text)
    assert list(story.characters) == ["A", "B", "C", "Dee Dee_2-x"]
    assert story.frames[4].characters == ("A", "B", "C", "Dee Dee_2-x")
    assert story.prompt(story.frames[4]) == "alpha, beta, gamma and delta together"
    assert story.identity_frames(1) == {"A": [0], "B": [1], "C": [2], "Dee Dee_2-x": [3]}


def test_separate_characters_argument() -> None:
    story = parse_story("\n[Bob] runs #go\n[NC] rain\n", characters=f"// cast\n[Bob] {BOB}\n")
    assert story.characters == {"Bob": Character("Bob", BOB)}
    assert story.frames[0].line == 2  # line numbers refer to the frame text
    assert story.prompt(story.frames[0]) == f"{BOB} runs"


def test_separate_characters_rejects_separator() -> None:
    with pytest.raises(ValueError, match=r"line 2: unexpected '---'"):
        parse_story("[Bob] x\n---\n[Bob] runs\n", characters="[Bob] b")


def test_separate_characters_errors_name_their_block() -> None:
    with pytest.raises(ValueError, match="characters line 2: character 'Bob' is defined twice"):
        parse_story("[Bob] runs", characters="[Bob] b\n[Bob] c")


def test_no_separator_means_frames_only() -> None:
    story = parse_story("[NC] a castle at dawn #Once upon a time\na dragon over the hills\n")
    assert story.characters == {}
    assert [f.characters for f in story.frames] == [(), ()]
    assert story.prompts() == ["a castle at dawn", "a dragon over the hills"]
    assert story.identity_frames(4) == {}


def test_no_separator_with_tags_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"line 1: undefined character \[Bob\] \(defined: none\).*'---'"):
        parse_story("[Bob] a man\n[Bob] walks\n")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[Bob] b\n---\n[Bob] hi\n[Carol] hi\n", r"line 4: undefined character \[Carol\] \(defined: 'Bob'\)"),
        (
            "[Bob] b\n[Alice] a\n---\n[bob] hi\n",
            r"line 4: undefined character \[bob\] \(defined: 'Bob', 'Alice'\)",
        ),
        ("", "empty story"),
        ("// only a comment\n\n", "empty story"),
        ("[Bob] b\n---\n\n// nothing\n", "empty story"),
        ("[Bob] b\n[Bob] c\n---\n[Bob] hi\n", "line 2: character 'Bob' is defined twice"),
        ("Bob a man\n---\n[Bob] hi\n", r"line 1: expected a character definition '\[Name\] description'"),
        ("[Bob]\n---\n[Bob] hi\n", "line 1: character 'Bob' has an empty description"),
        ("[Bob]   \n---\n[Bob] hi\n", "line 1: character 'Bob' has an empty description"),
        ("[NC] nobody\n---\nx\n", "line 1: the name 'NC' is reserved"),
        ("[nc] nobody\n---\nx\n", "line 1: the name 'nc' is reserved"),
        ("[Bob!] b\n---\nx\n", "line 1: invalid character name 'Bob!'"),
        ("[] b\n---\nx\n", "line 1: invalid character name ''"),
        (" [ Bob] b\n---\nx\n", "line 1: invalid character name ' Bob'"),
        ("[" + "x" * 41 + "] b\n---\nx\n", "line 1: invalid character name"),
        ("[Bob] b\n---\n[NC] [Bob] walks\n", r"line 3: \[NC\] marks a frame without characters.*\[Bob\]"),
        ("[Bob] b\n---\n[Bob] hi\n[NC] #just a caption\n", "line 4: frame has no prompt text"),
        ("x\n#only a caption\n", "line 2: frame has no prompt text"),
        ("[Bob] b\n---\nhi\n---\nho\n", "line 4: unexpected second '---'"),
    ],
)
def test_errors(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_story(text)


def test_character_tag_alone_gives_a_prompt() -> None:
    story = parse_story("[Bob] a man\n---\n[Bob] #hi\n")
    assert story.prompt(story.frames[0]) == "a man"
    assert story.frames[0].caption == "hi"


def test_forty_character_name_and_other_scripts() -> None:
    name = "Zoë " + "x" * 36
    story = parse_story(f"[{name}] someone\n---\n[{name}] waves\n")
    assert story.frames[0].characters == (name,)


def test_load_story(tmp_path) -> None:
    path = tmp_path / "story.txt"
    path.write_text(STORY.replace("flat", "flat – café"), encoding="utf-8")
    story = load_story(path)
    assert isinstance(story, Story)
    assert "café" in story.prompt(story.frames[0])
    assert load_story(str(path)).frames == story.frames


def test_load_story_errors(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_story(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("[Bob] b\n---\n[Carol] hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt: line 3: undefined character \[Carol\]"):
        load_story(bad)


# --- styles ---------------------------------------------------------------------------------------------


def test_styles_table() -> None:
    assert DEFAULT_STYLE in STYLES
    assert len(STYLES) == 14
    assert STYLES["none"].template == "{prompt}" and STYLES["none"].negative == ""
    for name, style in STYLES.items():
        assert style.name == name
        assert "{prompt}" in style.template


@pytest.mark.parametrize("name", list(STYLES))
def test_every_style_formats_the_prompt(name: str) -> None:
    prompt = "a man, wearing a black suit {with braces} walks in the park"
    styled, negative = apply_style(prompt, name)
    assert prompt in styled
    assert negative == STYLES[name].negative
    styled_extra, negative_extra = apply_style(prompt, name, negative="  extra fingers ")
    assert styled_extra == styled
    assert negative_extra.endswith("extra fingers")
    assert negative_extra == ", ".join(p for p in (STYLES[name].negative, "extra fingers") if p)


@pytest.mark.parametrize("official", list(OFFICIAL_NAMES))
def test_every_official_style_name_is_accepted(official: str) -> None:
    assert get_style(official) is STYLES[OFFICIAL_NAMES[official]]
    assert get_style(official.upper()) is get_style(official)


def test_official_names_map_to_distinct_styles() -> None:
    assert len(set(OFFICIAL_NAMES.values())) == len(OFFICIAL_NAMES) == 9
    assert get_style("digital-oil-painting").name == "digital oil painting"


def test_style_none_is_identity() -> None:
    assert apply_style("a cat", "none") == ("a cat", "")
    assert apply_style("a cat", "none", "dog") == ("a cat", "dog")


def test_style_name_spellings() -> None:
    assert get_style("Comic-Book") is STYLES["comic book"]
    assert get_style("japanese_anime") is STYLES["japanese anime"]


def test_unknown_style() -> None:
    with pytest.raises(ValueError, match=r"unknown style 'oil'.*'comic book'.*'watercolor'"):
        apply_style("a cat", "oil")


def test_story_source_round_trips():
    """Resume re-parses the story text stored in the run metadata: it must give back the same story."""
    from storydiff.pages.story import story_source

    text = (
        "[Bob] a man\n[Ann Lee] a woman\n---\n[Bob] walks #Walk\nno tag at all\n[NC] a #1 fan #\n"
        "[Bob] and [Ann Lee] meet #They meet #again\n[Ann Lee] reads a #2 book\n"
    )
    story = parse_story(text)
    again = parse_story(story_source(story))
    assert again.characters == story.characters
    assert [(f.characters, f.caption) for f in again.frames] == [
        (f.characters, f.caption) for f in story.frames
    ]
    assert again.prompts() == story.prompts()


def test_a_bare_hash_asks_for_no_caption() -> None:
    story = parse_story("[Bob] b\n---\n[Bob] sits #\n[Bob] runs\n[Bob] a # in the text #\n")
    assert [f.caption for f in story.frames] == ["", None, ""]
    assert story.panel_captions() == [None, "Bob runs", None]
    assert story.captions() == [None, None, None]
    again = parse_story(story_source(story))  # the bare '#' survives the metadata round trip
    assert again.frames == story.frames
