"""The shapes world: a caption grammar and a deterministic renderer, the data ``builtin:shapes`` learns.

An image is one flat shape on a plain light background; its caption comes from a small grammar
(:data:`TEMPLATES`)::

    a {colour} {shape} {position}                      a red circle on the left
    a {size} {colour} {shape} {position}               a small blue square at the top
    a photo of a {colour} {shape} {position}           a photo of a yellow triangle at the bottom
    {position} there is a {colour} {shape}             on the right there is a green circle

with colour in {red, green, blue, yellow}, shape in {circle, square, triangle} (the trained
shapes), position in {on the left, on the right, at the top, at the bottom} and size in {small,
large}. Sizes are always drawn; the caption names them only in the sized template (real captions
leave things out too). :data:`UNSEEN_SHAPES` (star, cross) are rendered but never trained on: they
are the new concepts of the fine-tune proof.

Every sample is a pure function of ``(seed, index)``: the same index gives the same caption and the
same pixels on every machine (PIL's polygon fill plus a numpy ``default_rng`` noise field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The image side of the shapes world, in pixels (the model's training resolution).
RESOLUTION = 32
#: RGB of each colour word.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 80, 220),
    "yellow": (240, 200, 20),
}
BACKGROUND = (236, 236, 236)
#: Shapes the model is trained on; :data:`UNSEEN_SHAPES` are rendered, never trained on.
SHAPES = ("circle", "square", "triangle")
UNSEEN_SHAPES = ("star", "cross")
ALL_SHAPES = SHAPES + UNSEEN_SHAPES
#: Position phrase -> the object's centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
}
#: Size word -> half the object's extent as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "large": 0.24}
#: Caption templates; ``{size}`` appears in one only.
TEMPLATES = (
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape} {position}",
    "a photo of a {colour} {shape} {position}",
    "{position} there is a {colour} {shape}",
)
#: How far a centre wanders from its anchor (fraction of the side), and the pixel noise (of 255).
JITTER = 0.04
NOISE_STD = 3.0
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What one image shows and how its caption says it."""

    colour: str
    shape: str
    position: str
    size: str
    template: int = 0
    #: Offset of the centre from its anchor, as a fraction of the side (x, y).
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position, self.size, self.template)

    @property
    def names_size(self) -> bool:
        return "{size}" in TEMPLATES[self.template]


def caption(colour: str, shape: str, position: str, size: str = "small", template: int = 0) -> str:
    """The caption of a scene in one of the :data:`TEMPLATES`."""
    return TEMPLATES[template].format(colour=colour, shape=shape, position=position, size=size)


def vocabulary() -> list[str]:
    """Every word a caption can hold (the tokenizer's training corpus), unseen shapes included."""
    words = set()
    for template in TEMPLATES:
        words.update(template.replace(",", " ").split())
    words.update(COLOURS)
    words.update(ALL_SHAPES)
    words.update(SIZES)
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(word for word in words if "{" not in word)


def sample_scene(seed: int, index: int, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """Sample ``index`` of the data set drawn with ``seed`` (uniform over every choice)."""
    rng = np.random.default_rng([seed, index])
    return Scene(
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        shape=shapes[rng.integers(len(shapes))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        template=int(rng.integers(len(TEMPLATES))),
        offset=tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2)),
    )


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` centred at (cx, cy) within a box of half-side ``radius``;
    None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        r = radius * 0.9
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle) + radius * 0.1))
        return points
    if shape == "cross":
        a, b = radius, radius * 0.36
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(ALL_SHAPES)}")


def render(scene: Scene, resolution: int = RESOLUTION, noise_seed: int | None = None) -> np.ndarray:
    """The scene as a ``(resolution, resolution, 3)`` uint8 array (anti-aliased by supersampling);
    with ``noise_seed``, plus Gaussian pixel noise of :data:`NOISE_STD` drawn from that seed."""
    from PIL import Image, ImageDraw

    side = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    ax, ay = POSITIONS[scene.position]
    cx, cy = (ax + scene.offset[0]) * side, (ay + scene.offset[1]) * side
    radius = SIZES[scene.size] * side
    outline = shape_polygon(scene.shape, cx, cy, radius)
    if outline is None:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=COLOURS[scene.colour])
    else:
        draw.polygon(outline, fill=COLOURS[scene.colour])
    pixels = np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.float64)
    if noise_seed is not None:
        pixels = pixels + np.random.default_rng(noise_seed).normal(0.0, NOISE_STD, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def training_batch(seed: int, first_index: int, count: int, shapes: tuple[str, ...] = SHAPES):
    """``count`` consecutive samples from ``first_index``: (captions, images as float32 in [-1, 1],
    shape ``(count, 3, H, W)``). Each sample's noise is seeded by its index."""
    scenes = [sample_scene(seed, index, shapes) for index in range(first_index, first_index + count)]
    images = np.stack([render(scene, noise_seed=seed * 1_000_003 + index)
                       for index, scene in zip(range(first_index, first_index + count), scenes)])
    pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return [scene.caption for scene in scenes], pixels


def grammar_scenes(shapes: tuple[str, ...] = SHAPES, templates: tuple[int, ...] = (0,)) -> list[Scene]:
    """Every (colour, shape, position[, size]) combination in the given templates, in a fixed order."""
    scenes = []
    for template in templates:
        sizes = list(SIZES) if "{size}" in TEMPLATES[template] else ["small"]
        for shape in shapes:
            for colour in COLOURS:
                for position in POSITIONS:
                    scenes.extend(Scene(colour, shape, position, size, template) for size in sizes)
    return scenes


def parse_caption(text: str) -> Scene:
    """The scene a grammar caption asks for (size ``small`` when the caption does not say);
    a caption outside the grammar is refused with a ValueError naming it."""
    for template_index in range(len(TEMPLATES)):
        for scene in grammar_scenes(ALL_SHAPES, (template_index,)):
            if scene.caption == text.strip():
                return scene
    raise ValueError(f"caption {text!r} is not in the shapes grammar (nullcov.shapes.grammar.TEMPLATES)")
