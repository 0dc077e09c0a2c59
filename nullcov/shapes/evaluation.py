"""What a shapes-world model draws, read by :mod:`nullcov.shapes.evaluator`: accuracy per attribute and where
its words' cross-attention lands.

:func:`evaluate` samples each prompt with the workflow's one image sampler
(:func:`nullcov.models.sampling.sample_images`: the schedule's scheduler, CFG, prompt ``i`` seeded
``seed + i``), through :func:`nullcov.report.attention.collect_attention_maps`, which records the
attention on the way; it reads each final image (accuracy per attribute:
:func:`nullcov.shapes.evaluator.accuracy`) and, for every cross-attention layer, measures how
much of the colour word's and the shape word's attention (averaged over the sampler's steps)
falls inside the object the image shows, against the object's share of the image:
``ratio = share inside / mask fraction`` (1 = no better than uniform).
"""

from __future__ import annotations

import numpy as np

from nullcov.shapes import evaluator
from nullcov.shapes import grammar as shapes

#: The words whose attention is measured, per attribute of the scene.
ATTENDED = ("colour", "shape")


def evaluation_scenes(shape_names: tuple[str, ...] = shapes.SHAPES) -> list[shapes.Scene]:
    """Every (colour, shape, position) in every template (both sizes in the sized one): 240 prompts
    for the trained shapes."""
    return shapes.grammar_scenes(shape_names, tuple(range(len(shapes.TEMPLATES))))


def grid_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A pixel mask averaged down to a layer's ``height x width`` token grid (fraction covered)."""
    rows, cols = mask.shape
    return mask.astype(np.float64).reshape(height, rows // height, width, cols // width).mean(axis=(1, 3))


def attention_on_object(word_map: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Share of one token's attention map ``[h, w]`` inside ``mask`` (image pixels), the mask's
    share of the grid, and their ratio."""
    covered = grid_mask(mask, *word_map.shape)
    share = float((word_map * covered).sum() / word_map.sum())
    fraction = float(covered.mean())
    return {"share": share, "mask_fraction": fraction, "ratio": share / fraction}


def _word_position(tokens: list[str], word: str, prompt: str) -> int:
    if word not in tokens:
        raise ValueError(f"prompt {prompt!r}: the tokenizer splits {word!r} ({tokens}); "
                         "expected one token per grammar word")
    return tokens.index(word)


def evaluate(pipe, scenes: list[shapes.Scene], schedule: dict, config: dict) -> dict:
    """Sample every scene's caption and read it; returns per-prompt rows and summaries:
    ``{"rows": [...], "accuracy": {attribute: fraction}, "attention": {layer: {word: {...}}}}``."""
    from nullcov.models.model import cross_attention_modules
    from nullcov.report.attention import collect_attention_maps

    layers = [name for name, _ in cross_attention_modules(pipe.unet)]
    steps = list(range(len(schedule["steps"])))
    prompts = [scene.caption for scene in scenes]
    found = collect_attention_maps(pipe, prompts, list(range(len(prompts))), schedule, config, layers, steps)
    rows, scores, attention = [], [], {layer: {word: [] for word in ATTENDED} for layer in layers}
    for position, scene in enumerate(scenes):
        reading = evaluator.read_image(found["images"][position])
        scores.append(evaluator.score(reading, scene))
        rows.append({"prompt": scene.caption, "seed": config["seed"] + position,
                     **{f"read_{name}": getattr(reading, name) for name in evaluator.ATTRIBUTES},
                     **{f"correct_{name}": ok for name, ok in scores[-1].items()}})
        if not reading.found:
            continue
        tokens = found["tokens"][position]
        for word_kind in ATTENDED:
            token = _word_position(tokens, getattr(scene, word_kind), scene.caption)
            for layer in layers:
                word_map = np.mean([found["maps"][(position, step, layer)][token] for step in steps], axis=0)
                attention[layer][word_kind].append(attention_on_object(word_map, reading.mask))
    accuracy = {name: evaluator.accuracy(scores, name) for name in evaluator.ATTRIBUTES}
    return {"rows": rows, "images": found["images"], "accuracy": accuracy | {"all": evaluator.accuracy(scores)},
            "attention": summarise_attention(attention)}


def summarise_attention(attention: dict) -> dict:
    """Per layer and word kind: the mean share, mask fraction and ratio over the prompts read."""
    return {
        layer: {
            word: {key: float(np.mean([entry[key] for entry in entries]))
                   for key in ("share", "mask_fraction", "ratio")}
            | {"prompts": len(entries)}
            for word, entries in words.items() if entries
        }
        for layer, words in attention.items()
    }
