"""What the fine-tune proof writes: the variants table, its figure, the image grid and each variant's weights.

- ``variants.tsv``: one row per variant (:data:`COLUMNS`);
- ``variants.png``: concept fidelity against how far the preserved prompts moved, per variant;
- ``grid.png`` and ``grid.npz``: the same prompts and seeds (preserved, then concept prompts)
  under the base model and each variant; the npz holds the float images, so the saved weights can
  be checked to regenerate them bit for bit;
- ``<variant>/unet_attn2.safetensors``: the variant's attn2 weights under their
  ``UNet2DConditionModel.state_dict()`` keys (LoRA merged): load them into the base UNet
  (``unet.load_state_dict(weights, strict=False)``) to regenerate any image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nullcov import layout
from nullcov.files import atomic_path, write_tsv
from nullcov.proof import data as proof_data
from nullcov.shapes import evaluator

GROUP_KEYS = ("all", *proof_data.GROUPS)
COLUMNS = (
    "variant", "kind", "scope", "threshold", "statistic", "branches", "steps", "seconds", "concept_fidelity",
    "reached_target", "final_loss", "weight_update_norm", "update_outside_null_space",
    *(f"accuracy_{when}_{attribute}" for attribute in evaluator.ATTRIBUTES for when in ("before", "after")),
    *(f"accuracy_drop_points_{attribute}" for attribute in evaluator.ATTRIBUTES),
    *(f"{measure}_{group}" for measure in ("accuracy_drop_points", "pixel_change", "attn2_change")
      for group in GROUP_KEYS),
)
WEIGHTS_FILE = layout.FINETUNE_WEIGHTS


def write_table(path, rows: list[dict]) -> None:
    write_tsv(path, [{column: row.get(column, math.nan) for column in COLUMNS} for row in rows], COLUMNS)


def save_weights(folder: Path, state: dict) -> Path:
    """``folder/unet_attn2.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS_FILE
    with atomic_path(path) as temporary:
        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(temporary))
    return path


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_grid(png_path, npz_path, images: dict[str, np.ndarray], captions: list[str]) -> None:
    """Rows: ``base`` then each variant; columns: ``captions`` (same seeds in every row)."""
    from nullcov.report.plotting import pyplot, save

    with atomic_path(npz_path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, captions=np.array(captions), **images)
    plt = pyplot()
    rows, columns = len(images), len(captions)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.05, rows * 1.05 + 0.6), squeeze=False)
    for row, (name, row_images) in enumerate(images.items()):
        for column in range(columns):
            ax = axes[row, column]
            ax.imshow(row_images[column])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(captions[column].replace(" there is", "").replace("a photo of ", "photo: "),
                             fontsize=5, rotation=20)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=6)
    save(fig, png_path)


def write_figure(path, rows: list[dict], base_fidelity: float, target: float) -> None:
    """Left: concept fidelity per variant (target dashed; without an evaluator, the final training
    loss). Right: the preserved prompts' pixel change against their all-correct accuracy drop (without
    an evaluator, against their attn2 change), one point per variant."""
    from nullcov.report.plotting import pyplot, save

    evaluated = any(math.isfinite(row["concept_fidelity"]) for row in rows)
    left_key, left_label = ("concept_fidelity", "concept fidelity (evaluator)") if evaluated else \
        ("final_loss", "final training loss (no evaluator for this model)")
    right_key, right_label = ("accuracy_drop_points_all", "preserved accuracy drop (points, all attributes)") \
        if evaluated else ("attn2_change_all", "preserved prompts' attn2 change")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    kinds = {kind: f"C{index}" for index, kind in enumerate(dict.fromkeys(row["kind"] for row in rows))}
    positions = np.arange(len(rows))
    left.bar(positions, [row[left_key] for row in rows], color=[kinds[row["kind"]] for row in rows])
    if evaluated:
        left.axhline(target, color="k", linestyle="--", linewidth=0.8, label=f"target {target:.0%}")
        left.axhline(base_fidelity, color="grey", linestyle=":", linewidth=0.8, label=f"base model {base_fidelity:.0%}")
        left.set_ylim(0, 1.05)
        left.legend(fontsize=7)
    for position, row in zip(positions, rows):
        left.annotate(f"{row['steps']} st", (position, 0), ha="center", va="bottom", fontsize=6, rotation=90)
    left.set_xticks(positions, [row["variant"] for row in rows], rotation=60, ha="right", fontsize=6)
    left.set(ylabel=left_label, title="learning the new shape")
    for row in rows:
        right.scatter(row["pixel_change_all"], row[right_key], color=kinds[row["kind"]], s=18)
        right.annotate(row["variant"].removeprefix("projected-"), (row["pixel_change_all"], row[right_key]), fontsize=5)
    for kind, colour in kinds.items():
        right.scatter([], [], color=colour, label=kind)
    if evaluated:
        right.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    right.set(xlabel="mean pixel change of the preserved prompts' images", ylabel=right_label, title="what else moved")
    if all(row["pixel_change_all"] > 0 for row in rows):
        right.set_xscale("log")
    right.legend(fontsize=7)
    save(fig, path)
