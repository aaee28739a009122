"""A procedurally rendered, fully annotated collection of artwork-like images.

Each image shows one object (vase, bowl, plate, scroll, stela, amulet, ...) of a material
and colour, lit by a gradient on a background, decorated with 1-4 groups of motifs
(flower, bird, dragon, lotus, scarab, ...). A motif group has its own colour, count
(one/two/three), size (about 19-76 px at 256 px) and position; groups never overlap.
Every group is a ground-truth annotation whose phrase ("two gold birds") also occurs in
the captions, so fragment <-> phrase alignment can be trained and measured exactly.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same seed gives
byte-identical files, and any image can be rendered alone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw

from collection.layout import Annotation, Artwork, CollectionWriter, sha256_of, split_for
from collection.phrases import normalise_phrase
from models.vocab import tokenize

log = logging.getLogger(__name__)

MIN_MOTIF, MAX_MOTIF = 19 / 256, 76 / 256  # motif size as a fraction of the image side

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (196, 38, 34),
    "blue": (36, 70, 190),
    "green": (38, 140, 56),
    "gold": (222, 172, 38),
    "black": (22, 22, 24),
    "white": (246, 244, 236),
    "purple": (118, 46, 150),
    "turquoise": (36, 190, 186),
    "pink": (236, 128, 172),
    "brown": (118, 72, 34),
}
MOTIF_COLOURS = tuple(COLOURS)
OBJECT_COLOURS = ("white", "blue", "green", "red", "black", "turquoise", "brown")

# Materials that take any glaze colour; the others have their own colour and take none.
GLAZED = ("porcelain", "faience", "glass", "lacquer", "painted stone")
NATURAL: dict[str, tuple[int, int, int]] = {
    "bronze": (140, 100, 52),
    "jade": (92, 150, 100),
    "terracotta": (186, 98, 58),
    "wood": (130, 86, 46),
    "limestone": (206, 196, 172),
}
OBJECTS = ("vase", "jar", "bottle", "bowl", "cup", "plate", "scroll", "stela", "amulet", "box")

BACKGROUNDS = ((40, 40, 44), (120, 120, 124), (214, 206, 190), (232, 232, 230), (58, 64, 80),
               (150, 132, 110))

# ---------------------------------------------------------------------------- motifs
# A motif is drawn from primitives in unit coordinates ([-1, 1] on its longest side):
# ("poly", points) filled with the motif colour, ("line", points, width) a polyline, and
# ("detail"/"detail-line", ...) the same in a darker (or, for dark motifs, lighter) shade.
Primitive = tuple  # (kind, points) or (kind, points, width)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16, turn: float = 0.0):
    return [(cx + rx * math.cos(2 * math.pi * k / n) * math.cos(turn)
             - ry * math.sin(2 * math.pi * k / n) * math.sin(turn),
             cy + rx * math.cos(2 * math.pi * k / n) * math.sin(turn)
             + ry * math.sin(2 * math.pi * k / n) * math.cos(turn)) for k in range(n)]


def _star() -> list[Primitive]:
    points = [((1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi * k / 5),
               -(1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5)) for k in range(10)]
    return [("poly", points)]


def _flower() -> list[Primitive]:
    petals = [("poly", _ellipse(0.58 * math.cos(a), 0.58 * math.sin(a), 0.42, 0.42, 12))
              for a in (2 * math.pi * k / 6 for k in range(6))]
    return [*petals, ("detail", _ellipse(0, 0, 0.32, 0.32, 12))]


def _lotus() -> list[Primitive]:
    petals = []
    for angle in (-0.9, -0.45, 0.0, 0.45, 0.9):
        tip = (0.95 * math.sin(angle), 0.55 - 1.5 * math.cos(angle))
        side = 0.22
        petals.append(("poly", [(0, 0.6), (tip[0] - side * math.cos(angle), (0.6 + tip[1]) / 2),
                                tip, (tip[0] + side * math.cos(angle), (0.6 + tip[1]) / 2)]))
    return [*petals, ("poly", [(-0.6, 0.6), (0.6, 0.6), (0.4, 0.85), (-0.4, 0.85)])]


def _bird() -> list[Primitive]:
    return [
        ("poly", _ellipse(-0.05, 0.1, 0.58, 0.3)),                       # body
        ("poly", _ellipse(0.55, -0.25, 0.22, 0.2, 12)),                  # head
        ("poly", [(0.74, -0.3), (1.0, -0.2), (0.74, -0.14)]),            # beak
        ("poly", [(-0.3, 0.0), (0.25, 0.0), (-0.15, -0.85)]),           # raised wing
        ("poly", [(-0.55, 0.05), (-1.0, -0.2), (-0.95, 0.25)]),          # tail
        ("detail", _ellipse(0.6, -0.29, 0.06, 0.06, 8)),                 # eye
    ]


def _fish() -> list[Primitive]:
    return [
        ("poly", _ellipse(-0.15, 0.0, 0.68, 0.38)),
        ("poly", [(0.42, 0.0), (1.0, -0.45), (1.0, 0.45)]),
        ("poly", [(-0.3, -0.3), (0.05, -0.62), (0.1, -0.3)]),            # dorsal fin
        ("detail", _ellipse(-0.58, -0.08, 0.08, 0.08, 8)),
        ("detail-line", [(-0.35, -0.3), (-0.3, 0.0), (-0.35, 0.3)], 0.07),  # gill
    ]


def _scarab() -> list[Primitive]:
    legs = []
    for y in (-0.25, 0.1, 0.45):
        legs.append(("line", [(-0.35, y), (-0.85, y - 0.25), (-0.95, y + 0.05)], 0.09))
        legs.append(("line", [(0.35, y), (0.85, y - 0.25), (0.95, y + 0.05)], 0.09))
    return [
        *legs,
        ("poly", _ellipse(0, 0.15, 0.48, 0.72)),
        ("poly", _ellipse(0, -0.72, 0.3, 0.22, 12)),
        ("detail-line", [(0, -0.45), (0, 0.85)], 0.07),
        ("detail-line", [(-0.45, -0.15), (0.45, -0.15)], 0.07),
    ]


def _dragon() -> list[Primitive]:
    body = [(-1.0 + 1.75 * k / 24, 0.35 * math.sin(2 * math.pi * k / 16)) for k in range(25)]
    spikes = [("poly", [(x - 0.07, y - 0.08), (x, y - 0.32), (x + 0.07, y - 0.08)])
              for x, y in body[2:22:4]]
    head = [(0.7, -0.05), (1.0, -0.25), (1.0, 0.1), (0.8, 0.25)]
    return [("line", body, 0.2), *spikes, ("poly", head),
            ("poly", [(0.85, -0.12), (0.95, -0.5), (0.75, -0.2)]),
            ("detail", _ellipse(0.88, -0.06, 0.05, 0.05, 8))]


def _cloud() -> list[Primitive]:
    return [("poly", _ellipse(-0.5, 0.15, 0.4, 0.35)), ("poly", _ellipse(0.0, -0.12, 0.5, 0.45)),
            ("poly", _ellipse(0.52, 0.12, 0.42, 0.36)),
            ("poly", [(-0.85, 0.15), (0.9, 0.15), (0.85, 0.45), (-0.8, 0.45)])]


def _wave() -> list[Primitive]:
    return [("line", [(-1.0 + 2 * k / 20, y + 0.18 * math.sin(2 * math.pi * k / 10))
                      for k in range(21)], 0.16) for y in (-0.5, 0.0, 0.5)]


def _inscription_band() -> list[Primitive]:
    glyphs: list[Primitive] = []
    for k in range(5):
        x = -0.8 + 0.4 * k
        kind = k % 3
        if kind == 0:
            glyphs.append(("detail", _ellipse(x, 0, 0.1, 0.14, 8)))
        elif kind == 1:
            glyphs.append(("detail-line", [(x - 0.1, -0.15), (x + 0.1, 0.15)], 0.06))
            glyphs.append(("detail-line", [(x - 0.1, 0.15), (x + 0.1, -0.15)], 0.06))
        else:
            glyphs.append(("detail-line", [(x - 0.1, 0.15), (x, -0.15), (x + 0.1, 0.15)], 0.06))
    return [("poly", [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]), *glyphs]


def _butterfly() -> list[Primitive]:
    return [("poly", _ellipse(-0.45, -0.35, 0.5, 0.4, 14, -0.5)),
            ("poly", _ellipse(0.45, -0.35, 0.5, 0.4, 14, 0.5)),
            ("poly", _ellipse(-0.35, 0.45, 0.32, 0.3, 12, 0.4)),
            ("poly", _ellipse(0.35, 0.45, 0.32, 0.3, 12, -0.4)),
            ("detail-line", [(0, -0.7), (0, 0.8)], 0.1)]


def _spiral() -> list[Primitive]:
    points = [(0.95 * t * math.cos(6 * math.pi * t), 0.95 * t * math.sin(6 * math.pi * t))
              for t in (k / 48 for k in range(1, 49))]
    return [("line", points, 0.13)]


@dataclass(frozen=True)
class Motif:
    name: str
    plural: str
    shape: tuple[Primitive, ...]


def _motif(name: str, plural: str, shape: Callable[[], list[Primitive]]) -> Motif:
    return Motif(name, plural, tuple(shape()))


MOTIFS = (
    _motif("flower", "flowers", _flower),
    _motif("bird", "birds", _bird),
    _motif("dragon", "dragons", _dragon),
    _motif("cloud", "clouds", _cloud),
    _motif("wave", "waves", _wave),
    _motif("lotus", "lotuses", _lotus),
    _motif("scarab", "scarabs", _scarab),
    _motif("inscription band", "inscription bands", _inscription_band),
    _motif("fish", "fish", _fish),
    _motif("star", "stars", _star),
    _motif("butterfly", "butterflies", _butterfly),
    _motif("spiral", "spirals", _spiral),
)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}


@dataclass
class MotifGroup:
    motif: Motif
    colour: str
    count: int
    box: tuple[int, int, int, int]  # xyxy, pixels

    @property
    def mention(self) -> str:
        """How a caption names the group: "a red lotus", "two gold birds"."""
        noun = self.motif.name if self.count == 1 else self.motif.plural
        return f"{_article(self.colour) if self.count == 1 else COUNT_WORDS[self.count]} " \
               f"{self.colour} {noun}"

    @property
    def phrase(self) -> str:
        return normalise_phrase(self.mention)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------- objects
def _profile_polygon(radius: Callable[[float], float], box: tuple[float, float, float, float],
                     steps: int = 24) -> list[tuple[float, float]]:
    """A vessel silhouette from a half-width profile ``radius(t)``, t=0 top .. 1 bottom."""
    x1, y1, x2, y2 = box
    cx, half = (x1 + x2) / 2, (x2 - x1) / 2
    ts = [k / steps for k in range(steps + 1)]
    right = [(cx + half * radius(t), y1 + t * (y2 - y1)) for t in ts]
    left = [(cx - half * radius(t), y1 + t * (y2 - y1)) for t in reversed(ts)]
    return right + left


def _vessel(neck: float, belly_at: float, foot: float):
    def radius(t: float) -> float:
        if t < belly_at:  # shoulder: from the neck out to the belly
            return neck + (1 - neck) * math.sin(0.5 * math.pi * t / belly_at)
        return foot + (1 - foot) * math.cos(0.5 * math.pi * (t - belly_at) / (1 - belly_at))
    return radius


def _object_shape(name: str, box: tuple[float, float, float, float], rng: np.random.Generator
                  ) -> list[list[tuple[float, float]]]:
    """Filled polygons (the first is the body) of an object inside ``box``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if name == "vase":
        return [_profile_polygon(_vessel(rng.uniform(0.3, 0.45), rng.uniform(0.35, 0.55), 0.45), box)]
    if name == "jar":
        return [_profile_polygon(_vessel(rng.uniform(0.55, 0.7), 0.3, 0.7), box)]
    if name == "bottle":
        return [_profile_polygon(lambda t: 0.25 if t < 0.35 else _vessel(0.25, 0.6, 0.6)(t), box)]
    if name == "bowl":
        return [_profile_polygon(lambda t: math.sqrt(max(0.0, 1 - t * t)) * 0.9 + 0.1, box)]
    if name == "cup":
        return [_profile_polygon(lambda t: 1.0 - 0.35 * t if t < 0.8 else 0.45, box)]
    if name == "plate":
        return [_ellipse((x1 + x2) / 2, (y1 + y2) / 2, w / 2, h / 2, 40)]
    if name == "scroll":
        roll = 0.08 * w
        return [[(x1 + roll, y1 + 0.05 * h), (x2 - roll, y1 + 0.05 * h),
                 (x2 - roll, y2 - 0.05 * h), (x1 + roll, y2 - 0.05 * h)],
                [(x1, y1), (x1 + roll, y1), (x1 + roll, y2), (x1, y2)],
                [(x2 - roll, y1), (x2, y1), (x2, y2), (x2 - roll, y2)]]
    if name == "stela":
        arch = [((x1 + x2) / 2 + w / 2 * math.cos(math.pi * k / 16),
                 y1 + w / 2 - w / 2 * math.sin(math.pi * k / 16)) for k in range(17)]
        return [[*arch, (x1, y2), (x2, y2)]]
    if name == "amulet":
        loop = _ellipse((x1 + x2) / 2, y1 + 0.06 * h, 0.08 * w, 0.06 * h, 12)
        return [_ellipse((x1 + x2) / 2, y1 + 0.56 * h, w / 2, 0.44 * h, 40), loop]
    if name == "box":
        return [[(x1, y1 + 0.18 * h), (x2, y1 + 0.18 * h), (x2, y2), (x1, y2)],
                [(x1 - 0.02 * w, y1), (x2 + 0.02 * w, y1), (x2 + 0.02 * w, y1 + 0.18 * h),
                 (x1 - 0.02 * w, y1 + 0.18 * h)]]
    raise ValueError(f"unknown object {name!r}")


def _object_box(name: str, size: int, rng: np.random.Generator) -> tuple[float, ...]:
    """Where the object sits: large, roughly centred, proportioned like the real thing."""
    aspect = {"bowl": (0.85, 0.5), "plate": (0.85, 0.8), "scroll": (0.9, 0.6),
              "box": (0.85, 0.65), "cup": (0.7, 0.65), "amulet": (0.66, 0.88),
              "stela": (0.68, 0.9)}.get(name, (0.72, 0.92))
    w = size * aspect[0] * rng.uniform(0.9, 1.05)
    h = size * aspect[1] * rng.uniform(0.9, 1.05)
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    return (max(1.0, cx - w / 2), max(1.0, cy - h / 2),
            min(size - 1.0, cx + w / 2), min(size - 1.0, cy + h / 2))


# ---------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid, upsampled bilinearly."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(image)  # (size, size)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A lit backdrop: two tones blended along a random direction."""
    pick = rng.choice(len(BACKGROUNDS), 2, replace=False)
    a = np.array(BACKGROUNDS[pick[0]], np.float32)
    b = np.array(BACKGROUNDS[pick[1]], np.float32) * 0.5 + a * 0.5
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = (math.cos(angle) * ramp)[None, :] + (math.sin(angle) * ramp + 0.5)[:, None]
    return a + (b - a) * t[..., None]  # (size, size, 3)


def _material_texture(material: str, base: np.ndarray, rng: np.random.Generator, size: int,
                      box: tuple[float, ...], backdrop: np.ndarray) -> np.ndarray:
    """The object's surface: its colour, shaded round, with the material's look."""
    x1, _, x2, _ = box
    xs = np.clip((np.arange(size, dtype=np.float32) - x1) / max(1.0, x2 - x1), 0, 1)
    # A curved surface lit from one side: darker at the rims, a sheen off-centre.
    light = rng.uniform(0.3, 0.7)
    shade = 0.62 + 0.45 * np.cos((xs - light) * math.pi * 0.9)  # (size,)
    row = base[None, :] * shade[:, None]  # (size, 3): shading varies across, not down
    if material in ("porcelain", "glass", "lacquer", "faience"):
        sheen = np.exp(-((xs - light + 0.12) ** 2) / 0.004) * (0.9 if material != "faience" else 0.4)
        row = row + sheen[:, None] * 110
    surface = np.broadcast_to(row, (size, size, 3))  # a view; textures below make copies
    if material == "glass":
        surface = 0.6 * surface + 0.4 * backdrop
    elif material == "faience":
        surface = surface * (1 + 0.08 * _smooth_noise(rng, size, 24)[..., None])
    elif material in ("painted stone", "limestone", "terracotta"):
        grain = rng.standard_normal((size, size, 1), dtype=np.float32)
        surface = surface + grain * (9 if material != "terracotta" else 5)
    elif material == "bronze":
        patina = np.clip(_smooth_noise(rng, size, 10), 0, 1)[..., None]
        surface = surface * (1 - 0.5 * patina) + np.array([70, 130, 100], np.float32) * 0.5 * patina
    elif material == "jade":
        surface = surface * (1 + 0.18 * _smooth_noise(rng, size, 6)[..., None])
    elif material == "wood":
        ys = np.arange(size, dtype=np.float32)
        grain = np.sin(ys / rng.uniform(2.0, 3.5) + 3 * _smooth_noise(rng, size, 5))
        surface = surface * (1 + 0.12 * grain[..., None])
    return surface


def _transform(points, scale: float, turn: float, cx: float, cy: float):
    c, s = math.cos(turn), math.sin(turn)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in points]


def _draw_motif(draw: ImageDraw.ImageDraw, motif: Motif, colour: tuple[int, int, int],
                scale: float, turn: float, cx: float, cy: float) -> tuple[float, ...]:
    """Draw one motif centred at (cx, cy); returns its tight xyxy box."""
    dark = sum(colour) < 200
    detail = tuple(min(255, int(v * 0.4 + 150)) for v in colour) if dark else \
        tuple(int(v * 0.4) for v in colour)
    xs, ys = [], []
    for primitive in motif.shape:
        kind, points = primitive[0], _transform(primitive[1], scale, turn, cx, cy)
        fill = detail if kind.startswith("detail") else colour
        if kind.endswith("line"):
            width = max(1, round(primitive[2] * scale * 2))
            draw.line(points, fill=fill, width=width, joint="curve")
            pad = width / 2
        else:
            draw.polygon(points, fill=fill)
            pad = 0.5
        xs += [p[0] - pad for p in points] + [p[0] + pad for p in points]
        ys += [p[1] - pad for p in points] + [p[1] + pad for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _motif_extent(motif: Motif, scale: float, turn: float) -> tuple[float, float, float, float]:
    """Box of a motif drawn at the origin (before placement), so a group can be laid out."""
    xs, ys = [], []
    for primitive in motif.shape:
        pad = primitive[2] * scale if primitive[0].endswith("line") else 0.5
        for x, y in _transform(primitive[1], scale, turn, 0, 0):
            xs += [x - pad, x + pad]
            ys += [y - pad, y + pad]
    return min(xs), min(ys), max(xs), max(ys)


@dataclass
class SynthArtwork:
    """One rendered image and everything said about it."""

    image: Image.Image
    title: str  # "Blue porcelain vase"
    object_mention: str  # "a blue porcelain vase"
    object_words: dict[str, str]  # colour / material / object
    groups: list[MotifGroup]
    captions: list[str]


def render(seed: int, index: int, size: int = 256) -> SynthArtwork:
    """Render artwork ``index`` of the collection made with ``seed``."""
    rng = np.random.default_rng([seed, index])
    object_name = OBJECTS[rng.integers(len(OBJECTS))]
    if rng.random() < 0.6:
        material = GLAZED[rng.integers(len(GLAZED))]
        colour_name = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
        base = np.array(COLOURS[colour_name], np.float32) * 0.85 + 20
    else:
        material = tuple(NATURAL)[rng.integers(len(NATURAL))]
        colour_name = ""
        base = np.array(NATURAL[material], np.float32)

    backdrop = _background(rng, size)
    box = _object_box(object_name, size, rng)
    polygons = _object_shape(object_name, box, rng)
    mask_image = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(mask_image)
    for polygon in polygons:
        mask_draw.polygon(polygon, fill=255)
    body_mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(body_mask).polygon(polygons[0], fill=255)
    mask = np.asarray(mask_image, np.float32)[..., None] / 255  # (size, size, 1)
    surface = _material_texture(material, base, rng, size, box, backdrop)
    pixels = backdrop + (surface - backdrop) * mask
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    groups = _place_motifs(draw, rng, np.asarray(body_mask) > 0, box, base)

    # Light falls off across the whole photograph, and the camera adds a little noise.
    pixels = np.asarray(image, np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.05, 0.18) * (math.cos(angle) * ramp[None, :]
                                           + math.sin(angle) * ramp[:, None])
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(1.5, 5.0)
    pixels = pixels * light[..., None] + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    words = [w for w in (colour_name, material, object_name) if w]
    mention = f"{_article(words[0])} {' '.join(words)}"
    title = " ".join(words).capitalize()
    object_words = {"colour": colour_name, "material": material, "object": object_name}
    captions = _captions(rng, mention, object_words, groups)
    return SynthArtwork(image, title, mention, object_words, groups, captions)


def _place_motifs(draw: ImageDraw.ImageDraw, rng: np.random.Generator, body: np.ndarray,
                  object_box: tuple[float, ...], base: np.ndarray) -> list[MotifGroup]:
    """Lay 1-4 non-overlapping motif groups on the object's body and draw them."""
    size = body.shape[0]
    left, top, right, bottom = object_box
    wanted = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    kinds = rng.choice(len(MOTIFS), wanted, replace=False)
    # Motif colours that stand out from the object's own colour.
    visible = [c for c in MOTIF_COLOURS if np.abs(np.array(COLOURS[c]) - base).sum() > 150]
    placed: list[tuple[float, float, float, float]] = []
    groups = []
    for kind in kinds:
        motif = MOTIFS[kind]
        colour = visible[rng.integers(len(visible))]
        count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        side = rng.uniform(MIN_MOTIF, MAX_MOTIF) * size
        turn = rng.uniform(-0.3, 0.3)
        spot = None
        extent = _motif_extent(motif, side / 2, turn)
        for attempt in range(30):
            if attempt and attempt % 6 == 0:  # crowded: try smaller, then fewer motifs
                side = max(MIN_MOTIF * size, side * 0.8)
                count = max(1, count - 1) if attempt >= 18 else count
                extent = _motif_extent(motif, side / 2, turn)
            ew, eh = extent[2] - extent[0], extent[3] - extent[1]
            gap = 0.15 * side
            horizontal = bool(rng.random() < 0.7)
            gw = ew * count + gap * (count - 1) if horizontal else ew
            gh = eh if horizontal else eh * count + gap * (count - 1)
            if gw >= right - left or gh >= bottom - top:
                continue
            gx1 = rng.uniform(left, right - gw)
            gy1 = rng.uniform(top, bottom - gh)
            group_box = (gx1, gy1, gx1 + gw, gy1 + gh)
            if _fits(group_box, body, placed):
                spot = (group_box, extent, ew, eh, gap, horizontal)
                break
        if spot is None:
            continue
        group_box, extent, ew, eh, gap, horizontal = spot
        boxes = []
        for k in range(count):
            ox = group_box[0] + (k * (ew + gap) if horizontal else 0) - extent[0]
            oy = group_box[1] + (0 if horizontal else k * (eh + gap)) - extent[1]
            boxes.append(_draw_motif(draw, motif, COLOURS[colour], side / 2, turn, ox, oy))
        tight = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                 max(b[2] for b in boxes), max(b[3] for b in boxes))
        placed.append(group_box)
        groups.append(MotifGroup(motif, colour, count, (
            max(0, math.floor(tight[0])), max(0, math.floor(tight[1])),
            min(size, math.ceil(tight[2])), min(size, math.ceil(tight[3])))))
    if not groups:  # never seen: the smallest single motif fits on every object
        raise RuntimeError("no motif group could be placed on the object")
    return groups


def _fits(box: tuple[float, ...], body: np.ndarray, placed: list[tuple[float, ...]]) -> bool:
    """Inside the object's body (>= 92 % of its pixels) and clear of every other group."""
    margin = 4
    for other in placed:
        if not (box[2] + margin <= other[0] or other[2] + margin <= box[0]
                or box[3] + margin <= other[1] or other[3] + margin <= box[1]):
            return False
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = body[y1:y2 + 1, x1:x2 + 1]
    return inside.size > 0 and inside.mean() >= 0.92


# ---------------------------------------------------------------------------- captions
TEMPLATES = (
    "{Object} decorated with {motifs}.",
    "{Object} with {motifs}.",
    "This {object_bare} shows {motifs}.",
    "{Motifs} {are} painted on the body of {object}.",
    "{Object}, its surface decorated with {motifs}.",
    "The {object_bare} bears {motifs}.",
    "{Motifs} {adorn} {object}.",
    "On {object} we see {motifs}.",
)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(rng: np.random.Generator, mention: str, object_words: dict[str, str],
              groups: list[MotifGroup]) -> list[str]:
    """1-5 captions; the first names every motif group, the others a random subset."""
    n_captions = int(rng.integers(1, 6))
    captions: list[str] = []
    # Shorter names for the object vary the text: "a porcelain vase", "a blue vase".
    variants = [mention]
    material, colour, name = object_words["material"], object_words["colour"], object_words["object"]
    variants.append(f"{_article(material)} {material} {name}")
    if colour:
        variants.append(f"{_article(colour)} {colour} {name}")
    for _ in range(4 * n_captions):  # a few tries: small images allow few distinct sentences
        if len(captions) == n_captions:
            break
        if captions:
            pick = rng.random(len(groups)) < 0.6
            chosen = [g for g, keep in zip(groups, pick, strict=True) if keep] or [
                groups[rng.integers(len(groups))]]
        else:
            chosen = list(groups)
        obj = variants[0] if not captions else variants[rng.integers(len(variants))]
        caption = _relation_caption(obj, chosen) if len(chosen) == 2 and rng.random() < 0.3 \
            else _template_caption(rng, obj, chosen)
        if caption not in captions:
            captions.append(caption)
    return captions


def _template_caption(rng: np.random.Generator, obj: str, chosen: list[MotifGroup]) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    motifs = _join([g.mention for g in chosen])
    plural = len(chosen) > 1 or chosen[0].count > 1
    return template.format(
        Object=_capitalise(obj), object=obj, object_bare=obj.split(" ", 1)[1],
        motifs=motifs, Motifs=_capitalise(motifs), are="are" if plural else "is",
        adorn="adorn" if plural else "adorns",
    )


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _relation_caption(obj: str, chosen: list[MotifGroup]) -> str:
    """A sentence that places two groups: "Two gold birds above a red lotus on a jade bowl"."""
    a, b = chosen
    if a.box[3] <= b.box[1]:
        relation = "above"
    elif b.box[3] <= a.box[1]:
        relation = "below"
    else:
        relation = "beside"
    return _capitalise(f"{a.mention} {relation} {b.mention} on {obj}.")


# ---------------------------------------------------------------------------- writing
def voc_xml(filename: str, size: tuple[int, int], groups: list[MotifGroup]) -> bytes:
    """A Pascal VOC annotation: one <object> per motif group, named by its phrase."""
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "images"
    ElementTree.SubElement(root, "filename").text = filename
    size_node = ElementTree.SubElement(root, "size")
    for tag, value in (("width", size[0]), ("height", size[1]), ("depth", 3)):
        ElementTree.SubElement(size_node, tag).text = str(value)
    for group in groups:
        node = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(node, "name").text = group.phrase
        ElementTree.SubElement(node, "difficult").text = "0"
        bndbox = ElementTree.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), group.box, strict=True):
            ElementTree.SubElement(bndbox, tag).text = str(value)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def synthesise(out: str | Path, *, n: int, seed: int, size: int = 256, force: bool = False,
               progress: bool = True) -> dict:
    """Write a synthetic collection of ``n`` images to ``out``; returns its counts.

    Artwork phrases are the captions' extracted phrases (so they match what the text side
    extracts everywhere else) together with every annotation phrase.
    """
    from tqdm import tqdm

    from collection.phrases import extract_phrases_batch

    name = f"synth-{n}-seed{seed}"
    with CollectionWriter(out, name=name, source=f"artalign synth --n {n} --seed {seed} "
                          f"--size {size}", force=force) as writer:
        (writer.root / "annotations").mkdir()
        rendered: list[tuple[str, SynthArtwork, str, str]] = []
        started, cpu_started = time.perf_counter(), time.process_time()
        for index in tqdm(range(n), desc="rendering", unit="img", disable=not progress):
            artwork_id = f"synth-{index:06d}"
            art = render(seed, index, size)
            buffer = io.BytesIO()
            art.image.save(buffer, format="PNG", compress_level=1)
            data = buffer.getvalue()
            filename = f"{artwork_id}.png"
            (writer.root / "images" / filename).write_bytes(data)
            (writer.root / "annotations" / f"{artwork_id}.xml").write_bytes(
                voc_xml(filename, art.image.size, art.groups))
            rendered.append((artwork_id, art, filename, sha256_of(data)))
        render_seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        # CPU time is the one-core rate even when other processes share the machine.
        log.info("rendered %d images in %.1f s: %.1f images/s, %.1f per CPU second", n,
                 render_seconds, n / max(render_seconds, 1e-9), n / max(cpu_seconds, 1e-9))
        phrase_lists = extract_phrases_batch([" ".join(a.captions) for _, a, _, _ in rendered])
        captions_json = []
        for (artwork_id, art, filename, digest), extracted in zip(rendered, phrase_lists,
                                                                  strict=True):
            split = split_for(artwork_id)
            annotations = [Annotation(g.phrase, tuple(float(v) for v in g.box)) for g in art.groups]
            phrases = list(dict.fromkeys([*extracted, *(a.phrase for a in annotations)]))
            writer.add(Artwork(
                id=artwork_id, image=f"images/{filename}", sha256=digest,
                width=size, height=size, split=split, title=art.title,
                metadata={"source": "synthetic", "classification": art.object_words["object"],
                          "material": art.object_words["material"],
                          "colour": art.object_words["colour"]},
                captions=art.captions, phrases=phrases, annotations=annotations,
            ))
            captions_json.append({
                "filename": filename, "filepath": split,
                "sentences": [{"raw": c, "tokens": tokenize(c)} for c in art.captions],
            })
        (writer.root / "caption_data.json").write_text(
            json.dumps({"images": captions_json}, indent=0), encoding="utf-8")
    counts = dict(writer.counts)
    counts["render_images_per_s"] = round(n / max(render_seconds, 1e-9), 1)
    counts["render_images_per_cpu_s"] = round(n / max(cpu_seconds, 1e-9), 1)
    return counts
