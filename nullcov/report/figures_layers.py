"""How the figures name and order things: short layer labels in UNet data-flow order, step and
linear labels, and the axes of a layers x timesteps heatmap (``null_dim`` and leakage)."""

from __future__ import annotations

import math
import re

from nullcov.models.family import CROSS_ATTENTION

#: The label of the text states' statistic (the text linears' input), next to the per-step linears' names.
TEXT_LABEL = f"text ({CROSS_ATTENTION.text_label})"
MANY_LAYERS = 24  # above this (SDXL: 70 layers) layer x timestep heatmaps get thinner rows and smaller labels
_LAYER = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_BLOCK_SHORT = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def short_layer(name: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` -> ``up1.0``; other names unchanged."""
    match = _LAYER.match(name)
    if not match:
        return name
    block, block_index, attention, transformer = match.groups()
    label = f"{_BLOCK_SHORT[block]}{block_index}.{attention}"
    return label if transformer == "0" else f"{label}.t{transformer}"


def layer_order(name: str):
    """Sort key: UNet data-flow order (down, mid, up), then block and attention indices."""
    match = _LAYER.match(name)
    if not match:
        return (3, 0, 0, 0, name)
    block, block_index, attention, transformer = match.groups()
    return (_BLOCK_ORDER[block], int(block_index or 0), int(attention), int(transformer), name)


def step_label(step: dict) -> str:
    return f"t={step['timestep']:.0f}"


def layers_height(num_layers: int) -> float:
    """Inches one heatmap spends on ``num_layers`` rows."""
    return (0.42 if num_layers <= MANY_LAYERS else 0.24) * num_layers


def layer_step_axes(fig, ax, image, title: str, layers: list[str], steps: list[dict], columns: int) -> None:
    """Colour bar, title and labelled axes of a layers x timesteps heatmap."""
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title)
    ax.set_yticks(range(len(layers)), [short_layer(layer) for layer in layers])
    if len(layers) > MANY_LAYERS:
        ax.tick_params(axis="y", labelsize=6)
    ticks = list(range(columns)) if columns <= 25 else list(range(0, columns, math.ceil(columns / 20)))
    ax.set_xticks(ticks, [f"{steps[i]['timestep']:.0f}" for i in ticks], rotation=90 if columns > 12 else 0)
    ax.set_xlabel("timestep (sampling order: noisy → clean)")
