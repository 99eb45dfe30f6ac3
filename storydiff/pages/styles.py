"""Style templates: wrap a frame prompt in wording that steers the look of the whole story.

The official app offers nine styles — "(No style)", "Japanese Anime" (its default), "Digital/Oil Painting",
"Pixar/Disney Character", "Photographic", "Comic book", "Line art", "Black and White Film Noir",
"Isometric Rooms" — and every one of those names is accepted here (``OFFICIAL_NAMES``), with our own
wording (we do not reuse theirs); a few more styles are ours. A single style per story is what keeps the
panels looking like one comic, so the style is applied to every frame prompt the same way, and its
negative prompt is shared by all frames.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """A named style: ``template`` contains ``{prompt}``; ``negative`` is added to the negative prompt."""

    name: str
    template: str
    negative: str

    def __post_init__(self) -> None:
        # A template without the placeholder would silently drop the user's prompt.
        if "{prompt}" not in self.template:
            raise ValueError(f"style {self.name!r}: template must contain '{{prompt}}'")


_STYLES = (
    Style("none", "{prompt}", ""),
    Style(
        "photographic",
        "photograph of {prompt}, natural light, 50mm lens, sharp focus, realistic skin texture, fine detail",
        "drawing, painting, illustration, cartoon, anime, cgi render, oversaturated, blurry, deformed",
    ),
    Style(
        "cinematic",
        "film still, {prompt}, dramatic lighting, wide-screen composition, shallow depth of field, "
        "colour graded, moody atmosphere",
        "cartoon, anime, sketch, flat lighting, amateur snapshot, text, watermark, blurry, deformed",
    ),
    Style(
        "comic book",
        "comic book panel of {prompt}, bold ink outlines, flat vivid colours, halftone shading, "
        "dynamic framing",
        "photograph, photorealistic, 3d render, muted colours, blurry, deformed, extra limbs, watermark",
    ),
    Style(
        "japanese anime",
        "anime illustration, {prompt}, clean cel shading, expressive eyes, crisp line work, "
        "bright studio-quality colours",
        "photograph, realistic, 3d render, western cartoon, messy lines, blurry, deformed hands, watermark",
    ),
    Style(
        "digital art",
        "digital painting of {prompt}, detailed concept art, soft rim light, rich colours, high detail",
        "photograph, low resolution, jpeg artifacts, flat colours, blurry, deformed, watermark",
    ),
    Style(
        "pixel art",
        "pixel art of {prompt}, retro 16-bit video game sprite look, limited palette, crisp square pixels",
        "photograph, realistic, smooth gradients, anti-aliasing, blurry, high resolution detail, 3d render",
    ),
    Style(
        "fantasy art",
        "epic fantasy painting, {prompt}, magical glowing light, richly detailed scenery, storybook wonder",
        "photograph, modern city, mundane, dull colours, low detail, blurry, deformed, watermark",
    ),
    Style(
        "watercolor",
        "watercolour painting of {prompt}, soft washes, pigments bleeding on textured paper, pastel tones",
        "photograph, 3d render, hard digital edges, neon colours, heavy outlines, blurry, deformed",
    ),
    Style(
        "digital oil painting",
        "oil painting of {prompt}, visible brush strokes, rich impasto texture, warm gallery light, "
        "painterly detail",
        "photograph, 3d render, flat vector art, anime, cartoon, blurry, deformed, watermark, text",
    ),
    Style(
        "animated character",
        "3d animated feature film still of {prompt}, appealing stylised character, soft global "
        "illumination, expressive face, polished render",
        "photograph, realistic skin, anime, sketch, flat colours, low poly, blurry, deformed, watermark",
    ),
    Style(
        "film noir",
        "black and white film noir still of {prompt}, hard shadows, venetian-blind light, high contrast, "
        "grainy 1940s film",
        "colour, colourful, bright daylight, cartoon, anime, low contrast, blurry, deformed, watermark",
    ),
    Style(
        "isometric rooms",
        "isometric cutaway room of {prompt}, tiny detailed diorama, clean 3d render, soft studio light, "
        "orthographic view",
        "photograph, perspective distortion, close-up portrait, messy, dark, blurry, deformed, watermark",
    ),
    Style(
        "line art",
        "black ink line drawing of {prompt}, clean contour lines, minimal hatching, white background",
        "colour, colour fill, shading gradients, photograph, 3d render, blurry, smudged, deformed",
    ),
)

#: Every style by its canonical name.
STYLES: dict[str, Style] = {style.name: style for style in _STYLES}

#: The official app's style names and the style each means here (names as its menu writes them).
OFFICIAL_NAMES = {
    "(No style)": "none",
    "Japanese Anime": "japanese anime",
    "Digital/Oil Painting": "digital oil painting",
    "Pixar/Disney Character": "animated character",
    "Photographic": "photographic",
    "Comic book": "comic book",
    "Line art": "line art",
    "Black and White Film Noir": "film noir",
    "Isometric Rooms": "isometric rooms",
}

#: Our default is a comic look (the official app's default is "Japanese Anime": ``--preset official``).
DEFAULT_STYLE = "comic book"


def _canonical(name: str) -> str:
    # Command lines prefer "comic-book" or "comic_book"; accept those spellings for the same style, and
    # the official menu's "Digital/Oil Painting" and "(No style)".
    return " ".join(name.replace("_", " ").replace("-", " ").replace("/", " ").strip("() ").lower().split())


_ALIASES = {_canonical(official): ours for official, ours in OFFICIAL_NAMES.items()}


def get_style(name: str) -> Style:
    """The style called ``name`` — ours or the official app's (case, '-', '_', '/' and the brackets of
    "(No style)" ignored); ValueError listing the styles if unknown."""
    key = _canonical(name)
    style = STYLES.get(_ALIASES.get(key, key))
    if style is None:
        available = ", ".join(repr(key) for key in STYLES)
        raise ValueError(f"unknown style {name!r}; available styles: {available}")
    return style


def apply_style(prompt: str, style: str, negative: str = "") -> tuple[str, str]:
    """Return (styled prompt, negative prompt): the style's negative joined with the user's extra one.

    ``str.replace`` rather than ``str.format``: prompts may contain braces that format would choke on.
    """
    chosen = get_style(style)
    styled = chosen.template.replace("{prompt}", prompt)
    negatives = [part.strip() for part in (chosen.negative, negative) if part.strip()]
    return styled, ", ".join(negatives)
