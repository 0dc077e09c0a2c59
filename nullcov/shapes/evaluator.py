"""Read a shapes-world image: which colour, shape, position and size it shows (nothing learned, nothing downloaded).

- **Foreground**: pixels whose RGB distance from the background (the median of the image's border)
  exceeds :data:`FOREGROUND_DISTANCE`; the largest 4-connected component is the object.
- **Colour**: the object's median RGB, nearest of :data:`nullcov.shapes.grammar.COLOURS`.
- **Position**: the object's centroid, nearest of :data:`nullcov.shapes.grammar.POSITIONS`' anchors.
- **Size**: the object's larger extent against the midpoint of the small and large extents.
- **Shape**: geometry: the object's mask cropped to its bounding box and resampled to
  :data:`TEMPLATE_SIDE` squared, compared (mean absolute difference) with the same crop of a clean
  render of each shape in :data:`nullcov.shapes.grammar.ALL_SHAPES` (unseen shapes included); nearest wins.

:func:`read_image` returns a :class:`Reading`; :func:`score` compares it with the scene a caption asks
for; :func:`accuracy` is the share of prompts read correctly (the shapes benchmark's and the fine-tune
proof's). The accuracy on held-out renders (clean, noisy, blurred) is measured by
:func:`render_accuracy` and reported by ``make bench-shapes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from nullcov.shapes import grammar as shapes

#: RGB distance (0-255 scale) from the background above which a pixel belongs to the object.
FOREGROUND_DISTANCE = 60.0
#: Fewer object pixels than this: nothing was drawn (every attribute reads as ``none``).
MIN_OBJECT_PIXELS = 6
TEMPLATE_SIDE = 12
ATTRIBUTES = ("colour", "shape", "position", "size")
NONE = "none"


@dataclass(frozen=True)
class Reading:
    """What an image shows; every attribute is ``none`` when no object was found."""

    colour: str
    shape: str
    position: str
    size: str
    #: The object's pixels, (H, W) bool (all False when none was found).
    mask: np.ndarray

    @property
    def found(self) -> bool:
        return self.colour != NONE


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (flood fill; images are 32-64 px)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        stack, size = [start], 0
        labels[start] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def object_mask(image: np.ndarray) -> np.ndarray:
    """The object's pixels in an (H, W, 3) uint8 or [0, 1] float image."""
    return _object_mask(_as_uint8_scale(image))


def _object_mask(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    return _largest_component(distance > FOREGROUND_DISTANCE)


def _as_uint8_scale(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float64) * 255.0
    return image.astype(np.float64)


def _coverage(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per pixel, how much of it the object covers (0-1): its colour's distance from the background
    over the object's own; recovers the anti-aliased edges a thresholded mask cuts off."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    full = np.linalg.norm(np.median(pixels[mask], axis=0) - background)
    return np.clip(np.linalg.norm(pixels - background, axis=-1) / max(full, 1.0), 0.0, 1.0)


def _crop_signature(coverage: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The coverage inside the mask's bounding box (plus one pixel), resampled to TEMPLATE_SIDE squared."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    crop = coverage[max(ys.min() - 1, 0): min(ys.max() + 2, height), max(xs.min() - 1, 0): min(xs.max() + 2, width)]
    resized = Image.fromarray(crop.astype(np.float32)).resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64)


def _signature(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return _crop_signature(_coverage(pixels, mask), mask)


#: Sub-pixel offsets (fraction of the side) the templates are rendered at.
_TEMPLATE_OFFSETS = ((0.0, 0.0), (0.01, 0.0), (0.0, 0.01), (0.01, 0.01), (-0.01, 0.005))


@lru_cache(maxsize=1)
def shape_templates() -> dict[str, list[np.ndarray]]:
    """Each shape's signatures: renders at the world's resolution, both sizes, a few sub-pixel offsets,
    sharp and blurred (a sampled image's edges are soft)."""
    templates: dict[str, list[np.ndarray]] = {}
    for shape in shapes.ALL_SHAPES:
        for size in shapes.SIZES:
            for offset in _TEMPLATE_OFFSETS:
                image = shapes.render(shapes.Scene("blue", shape, "on the left", size, 0, offset))
                for kind in ("clean", "blur"):
                    pixels = _as_uint8_scale(degrade(image, kind, 0, TEMPLATE_BLUR))
                    templates.setdefault(shape, []).append(_signature(pixels, _object_mask(pixels)))
    return templates


def _nearest(value: np.ndarray, table: dict[str, tuple]) -> str:
    names = list(table)
    distances = [np.linalg.norm(np.asarray(table[name], dtype=np.float64) - value) for name in names]
    return names[int(np.argmin(distances))]


def read_image(image: np.ndarray) -> Reading:
    """Colour, shape, position and size of the object in ``image`` ((H, W, 3), uint8 or float in [0, 1])."""
    pixels = _as_uint8_scale(image)
    mask = _object_mask(pixels)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(NONE, NONE, NONE, NONE, mask)
    side = mask.shape[0]
    colour = _nearest(np.median(pixels[mask], axis=0), shapes.COLOURS)
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / side
    position = _nearest(centre, shapes.POSITIONS)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    small, large = (2 * shapes.SIZES[name] * side for name in ("small", "large"))
    size = "small" if extent < (small + large) / 2 else "large"
    signature = _signature(pixels, mask)
    templates = shape_templates()
    shape = min(templates, key=lambda name: min(float(np.abs(t - signature).mean()) for t in templates[name]))
    return Reading(colour, shape, position, size, mask)


def score(reading: Reading, scene: shapes.Scene) -> dict[str, bool]:
    """Per attribute, whether the reading shows what ``scene`` asks for (size only where the caption names it)."""
    correct = {name: getattr(reading, name) == getattr(scene, name) for name in ("colour", "shape", "position")}
    if scene.names_size:
        correct["size"] = reading.size == scene.size
    return correct


def reads_model(model_dir) -> bool:
    """Whether the evaluator can read the images of the model in ``model_dir``: a model trained on the
    shapes world by ``python -m nullcov.shapes.train`` (its ``training.json`` says so), such as
    ``builtin:shapes`` or a variant of it trained with other settings."""
    import json
    from pathlib import Path

    record = Path(model_dir) / "training.json"
    if not record.is_file():
        return False
    command = str(json.loads(record.read_text()).get("command", ""))
    return command.startswith(("python -m nullcov.shapes.train", "python -m nullcov.train_shapes"))  # its old name


def accuracy(scores: list[dict[str, bool]], attribute: str | None = None) -> float:
    """Share of the prompts read correctly, from their :func:`score` (one per prompt): ``attribute``
    over the prompts that ask for it (size: those whose caption names one), or with None every
    attribute each prompt asks for (all correct). NaN when no prompt counts (``{}``: not read)."""
    values = [all(correct.values()) if attribute is None else correct[attribute]
              for correct in scores if correct and (attribute is None or attribute in correct)]
    return float(np.mean(values)) if values else math.nan


#: Gaussian blur radius (px) of the templates' soft copies, and of the ``blur`` degradation the
#: accuracy is measured under (different on purpose: the test is not the templates' own blur).
TEMPLATE_BLUR = 0.7
TEST_BLUR = 1.0


def degrade(image: np.ndarray, kind: str, seed: int, blur: float = TEST_BLUR) -> np.ndarray:
    """A held-out render made harder: ``clean``, ``noise`` (Gaussian, sigma 12 of 255) or ``blur``
    (Gaussian, radius ``blur`` px)."""
    from PIL import Image, ImageFilter

    if kind == "clean":
        return image
    if kind == "noise":
        noisy = image.astype(np.float64) + np.random.default_rng(seed).normal(0.0, 12.0, image.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    raise ValueError(f"unknown degradation {kind!r}: clean, noise or blur")


DEGRADATIONS = ("clean", "noise", "blur")


def render_accuracy(count: int = 400, seed: int = 12345, kinds: tuple[str, ...] = DEGRADATIONS) -> dict:
    """The evaluator's accuracy per attribute on ``count`` held-out renders (a seed the training never
    uses, every shape including the unseen ones, every template) for each degradation:
    ``{kind: {attribute: fraction correct}}``."""
    results = {}
    for kind in kinds:
        hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
        for index in range(count):
            scene = shapes.sample_scene(seed, index, shapes.ALL_SHAPES)
            image = degrade(shapes.render(scene, noise_seed=seed + index), kind, seed + index)
            reading = read_image(image)
            for name in ATTRIBUTES:
                hits[name].append(getattr(reading, name) == getattr(scene, name))
        results[kind] = {name: float(np.mean(values)) for name, values in hits.items()}
    return results
