"""What the fine-tune proof writes: the variants table, its figure, the image grid and each variant's weights.

- ``variants.tsv``: one row per run (:data:`COLUMNS`), measured on every preserved prompt at its end;
- ``curves.tsv``, ``matched.tsv``: the runs' checkpoints and the variants at matched concept
  fidelity (:mod:`nullcov.proof.curves`);
- ``frontier.png``: the learning-vs-forgetting frontier (:func:`write_frontier`);
- ``grid.png`` and ``grid.npz``: the same prompts and seeds (preserved, then concept prompts)
  under the base model and each variant; the npz holds the float images, so the saved weights can
  be checked to regenerate them bit for bit;
- ``<run>/step_NNNN/unet_attn2.safetensors``: the attn2 weights at each checkpoint (and for
  ``custom-diffusion`` its ``identifier.safetensors``: the identifier's token id and trained
  embedding row, to write into the text encoder's token embedding);
- ``<run>/unet_attn2.safetensors``: the run's final attn2 weights under their
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
    "variant", "group", "kind", "seed", "learning_rate", "scope", "threshold", "statistic", "branches", "steps",
    "seconds", "concept_fidelity",
    "reached_target", "final_loss", "weight_update_norm", "update_outside_null_space",
    *(f"accuracy_{when}_{attribute}" for attribute in evaluator.ATTRIBUTES for when in ("before", "after")),
    *(f"accuracy_drop_points_{attribute}" for attribute in evaluator.ATTRIBUTES),
    *(f"{measure}_{group}" for measure in ("accuracy_drop_points", "pixel_change", "attn2_change")
      for group in GROUP_KEYS),
)
WEIGHTS_FILE = layout.FINETUNE_WEIGHTS
#: A Custom Diffusion run's identifier beside its attn2 weights: ``token_id`` and its trained ``embedding`` row.
IDENTIFIER_FILE = "identifier.safetensors"


def checkpoint_folder(step: int) -> str:
    """The subfolder of a run's folder that holds the weights of its checkpoint at ``step``."""
    return f"step_{step:04d}"


def write_table(path, rows: list[dict]) -> None:
    write_tsv(path, [{column: row.get(column, math.nan) for column in COLUMNS} for row in rows], COLUMNS)


def save_weights(folder: Path, state: dict, name: str = WEIGHTS_FILE) -> Path:
    """``folder/<name>`` (default ``unet_attn2.safetensors``; atomically)."""
    from safetensors.torch import save_file

    path = Path(folder) / name
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


def write_frontier(path, curves: list[dict], matched: list[dict]) -> None:
    """The learning-vs-forgetting frontier: concept fidelity on x; the preserved prompts' accuracy drop
    (left) and pixel change (right) on y. Each run's curve over its checkpoints is a thin line, one
    colour per variant (dashed: a learning rate other than the variant's first run's); the
    matched-fidelity points (:mod:`nullcov.proof.curves`) of each variant at its first run's rate are
    the mean over its seeds, bars from min to max. Without an evaluator (NaN fidelity) x is the step."""
    from nullcov.proof.curves import runs_of
    from nullcov.report.plotting import pyplot, save

    evaluated = any(math.isfinite(row["concept_fidelity"]) for row in curves)
    x_key = "concept_fidelity" if evaluated else "step"
    variants = list(dict.fromkeys(row["variant"] for row in curves))
    colours = {variant: f"C{index % 10}" for index, variant in enumerate(variants)}
    own_rate = {row["variant"]: row["learning_rate"] for row in curves if row["run"] == row["variant"]}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    measures = (("accuracy_drop_points", "preserved accuracy drop (points, all attributes; 48 prompts)"),
                ("pixel_change", "preserved prompts' mean pixel change (48 prompts)"))
    for curve in runs_of(curves).values():
        variant, rate = curve[0]["variant"], curve[0]["learning_rate"]
        for ax, (key, _) in zip(axes, measures):
            ax.plot([point[x_key] for point in curve], [point[key] for point in curve], color=colours[variant],
                    linestyle="-" if rate == own_rate.get(variant, rate) else "--", linewidth=0.9, alpha=0.5)
    for row in matched:
        if row["measure"] != "at_fidelity" or not row["reached_runs"] or \
                row["learning_rate"] != own_rate.get(row["variant"], row["learning_rate"]):
            continue
        for ax, (key, _) in zip(axes, measures):
            mean = row[f"{key}_mean"]
            ax.errorbar(row["level"], mean, yerr=[[mean - row[f"{key}_min"]], [row[f"{key}_max"] - mean]],
                        fmt="o", color=colours[row["variant"]], markersize=4, capsize=2)
    for ax, (_, label) in zip(axes, measures):
        for variant in variants:
            ax.plot([], [], color=colours[variant], label=variant)
        ax.set(xlabel="concept fidelity (evaluator)" if evaluated else "step", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="k", linestyle=":", linewidth=0.8)
    axes[0].set_title("forgetting at matched learning (points: mean over seeds, bars min-max)", fontsize=9)
    axes[1].set_title("dashed: other learning rates", fontsize=9)
    if variants:  # an SD3/FLUX proof measures no checkpoints: no curve
        axes[1].legend(fontsize=6, loc="upper left")
    save(fig, path)
