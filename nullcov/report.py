"""Figures and tables of the report: spectra, null-space dimensions, attention maps, leakage, run summary.

Every figure is a plain PNG (matplotlib, Agg backend) that the Snakemake report also embeds.
Importing this module is cheap (no torch, no matplotlib: both are imported where used). The
parse-time selections of steps and prompts live in nullcov.config.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from pathlib import Path

import numpy as np

from nullcov import store
from nullcov.docs import OUTPUTS
from nullcov.measurement import human_bytes
from nullcov.store import TEXT_KEY, atomic_path

STEP_LINEARS = ("to_q", "to_out")
TEXT_LABEL = "text (to_k/to_v)"
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


# -- reading ----------------------------------------------------------------------------------
def read_spectra(path) -> dict[str, dict]:
    """``{key: {"eigenvalues", "null_dim", "threshold", "d"}}`` of a projection file (``P`` not read)."""
    return store.read_spectra(path)


def split_key(key: str) -> tuple[str, str]:
    layer, _, linear = key.rpartition("/")
    return layer, linear


# -- figure helpers ---------------------------------------------------------------------------
MATPLOTLIB_CACHE = "resources/cache/matplotlib"


def keep_matplotlib_cache_in_workdir() -> None:
    """Jobs write nothing to $HOME: matplotlib's font cache goes to resources/cache/matplotlib of
    the working directory unless MPLCONFIGDIR is set. Call before matplotlib is imported."""
    import os

    if "MPLCONFIGDIR" not in os.environ:
        path = Path(MATPLOTLIB_CACHE).resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
                         "figure.dpi": 110, "savefig.dpi": 110})
    return plt


def _save(fig, path) -> None:
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _step_colors(count: int):
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    return [cmap(0.85 * i / max(count - 1, 1)) for i in range(count)]


def _positive_floor(values: np.ndarray) -> float:
    top = float(np.max(values)) if values.size else 1.0
    return max(top, 1e-300) * 1e-12


# -- spectra ----------------------------------------------------------------------------------
def training_curve_figure(path, record: dict) -> None:
    """The shipped model's training losses (``training.json`` of :mod:`nullcov.train_shapes`): the
    VAE's reconstruction loss and the UNet's noise-prediction loss, per logged window."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.0))
    titles = {"vae": "VAE (reconstruction MSE + KL)", "unet_text": "UNet + text encoder (noise MSE)"}
    for ax, (stage, title) in zip(axes, titles.items()):
        steps, losses = zip(*record["loss"][stage])
        ax.plot(steps, losses, color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss per logged window")
        ax.set_title(f"{title}, {record['seconds'][stage]:.0f} s")
        ax.grid(alpha=0.3)
    settings = record["settings"]
    fig.suptitle(f"builtin:shapes training: seed {settings['seed']}, batch {settings['batch_size']}, "
                 f"{record['seconds']['total'] / 60:.1f} min on {record['machine']['torch_threads']} CPU threads")
    _save(fig, path)


def spectra_figure(path, linear: str, steps: list[dict], spectra: list[dict[str, dict]]) -> None:
    """Eigenvalue spectra of every layer's ``linear`` statistic, one curve per selected step.

    ``steps[i]`` is the schedule entry whose projection file gave ``spectra[i]``.
    """
    plt = _pyplot()
    layers = sorted({split_key(key)[0] for spectrum in spectra for key in spectrum if split_key(key)[1] == linear},
                    key=layer_order)
    rows, columns = spectra_grid(len(layers))
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.7 * rows), squeeze=False)
    colors = _step_colors(len(steps))
    for ax, layer in zip(axes.flat, layers):
        entries = [spectrum[f"{layer}/{linear}"] for spectrum in spectra]
        _spectrum_panel(ax, entries, [step_label(step) for step in steps], colors)
        ax.set_title(f"{short_layer(layer)}  (d={entries[0]['d']})")
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("eigenvalue rank (1 = largest)")
    for ax in axes[:, 0]:
        ax.set_ylabel("eigenvalue (log)")
    fig.suptitle(f"Spectra of the {linear} input statistic per layer; shaded: below the threshold = null space",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    _save(fig, path)


def spectra_grid(num_layers: int) -> tuple[int, int]:
    """(rows, columns) of the spectra panels: 4 columns up to 16 layers, then about square (SDXL's 70: 8 x 9)."""
    columns = min(num_layers, 4 if num_layers <= 16 else math.ceil(math.sqrt(num_layers)))
    return math.ceil(num_layers / columns), columns


def _spectrum_panel(ax, entries: list[dict], labels: list[str], colors) -> None:
    values = np.concatenate([entry["eigenvalues"] for entry in entries])
    positive = values[values > 0]
    floor = float(positive.min()) / 3 if positive.size else 1e-12  # eigenvalues <= 0 are drawn here
    floor = max(floor, _positive_floor(values))
    thresholds = sorted({entry["threshold"] for entry in entries})
    for entry, label, color in zip(entries, labels, colors):
        values = np.maximum(entry["eigenvalues"][::-1], floor)
        ranks = np.arange(1, values.size + 1)
        ax.plot(ranks, values, color=color, lw=1.4, label=f"{label}: null {entry['null_dim']}/{entry['d']}")
        if len(thresholds) > 1:
            ax.axhline(entry["threshold"], color=color, ls="--", lw=0.9)
    ax.set_yscale("log")
    bottom = floor
    if len(thresholds) == 1 and thresholds[0] > 0:
        ax.axhline(thresholds[0], color="crimson", ls="--", lw=1.1, label=f"threshold {thresholds[0]:.3g}")
        ax.axhspan(bottom, thresholds[0], color="crimson", alpha=0.07, lw=0)
    ax.set_ylim(bottom=bottom * 0.7)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.85, handlelength=1.5)


def text_spectrum_figure(path, entry: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    _spectrum_panel(ax, [entry], ["text"], ["tab:blue"])
    ax.set_xlabel("eigenvalue rank (1 = largest)")
    ax.set_ylabel("eigenvalue (log)")
    ax.set_title(f"Spectrum of the text-encoder states (to_k/to_v input), d={entry['d']}\n"
                 "shaded: below the threshold = null space")
    fig.tight_layout()
    _save(fig, path)


# -- null-space dimension -----------------------------------------------------------------------
MANY_LAYERS = 24  # above this (SDXL: 70 layers) layer x timestep heatmaps get thinner rows and smaller labels


def layers_height(num_layers: int) -> float:
    """Inches one heatmap spends on ``num_layers`` rows."""
    return (0.42 if num_layers <= MANY_LAYERS else 0.24) * num_layers


def _layer_step_axes(fig, ax, image, title: str, layers: list[str], steps: list[dict], columns: int) -> None:
    """Colour bar, title and labelled axes of a layers x timesteps heatmap."""
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title)
    ax.set_yticks(range(len(layers)), [short_layer(layer) for layer in layers])
    if len(layers) > MANY_LAYERS:
        ax.tick_params(axis="y", labelsize=6)
    ticks = list(range(columns)) if columns <= 25 else list(range(0, columns, math.ceil(columns / 20)))
    ax.set_xticks(ticks, [f"{steps[i]['timestep']:.0f}" for i in ticks], rotation=90 if columns > 12 else 0)
    ax.set_xlabel("timestep (sampling order: noisy → clean)")


def null_dim_figure(path, steps: list[dict], spectra: list[dict[str, dict]], text: dict | None) -> None:
    """Heatmaps layers x timesteps of ``null_dim`` (top) and ``null_dim / d`` (bottom), per linear."""
    plt = _pyplot()
    linears = [linear for linear in STEP_LINEARS if any(split_key(key)[1] == linear for key in spectra[0])]
    layers = sorted({split_key(key)[0] for key in spectra[0]}, key=layer_order)
    columns = len(steps)
    annotate = columns <= 25
    width = max(4.5, 0.42 * columns + 2.2)
    fig, axes = plt.subplots(2, len(linears), figsize=(width * len(linears), layers_height(len(layers)) * 2 + 2.4),
                             squeeze=False)
    for column, linear in enumerate(linears):
        counts = np.array([[spectrum[f"{layer}/{linear}"]["null_dim"] for spectrum in spectra] for layer in layers])
        dims = np.array([[spectrum[f"{layer}/{linear}"]["d"] for spectrum in spectra] for layer in layers])
        for row, (values, title, fmt, vmax) in enumerate([
            (counts, f"{linear}: null_dim", "{:.0f}", None),
            (counts / dims, f"{linear}: null_dim / d", "{:.0%}", 1.0),
        ]):
            ax = axes[row, column]
            image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            _layer_step_axes(fig, ax, image, title, layers, steps, columns)
            if annotate:
                for (y, x), value in np.ndenumerate(values):
                    shade = image.norm(value)
                    ax.text(x, y, fmt.format(value), ha="center", va="center",
                            fontsize=7 if len(layers) <= MANY_LAYERS else 5,
                            color="black" if shade > 0.6 else "white")
    title = "Null-space dimension per layer and timestep"
    if text is not None:
        title += (f"   |   text projection (to_k/to_v, all timesteps): null_dim {text['null_dim']} of "
                  f"d={text['d']} ({text['null_dim'] / text['d']:.0%})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    _save(fig, path)


# -- attention maps -----------------------------------------------------------------------------
def _resize_nearest(values: np.ndarray, size: int) -> np.ndarray:
    rows = (np.arange(size) * values.shape[0] // size).astype(int)
    columns = (np.arange(size) * values.shape[1] // size).astype(int)
    return values[rows][:, columns]


def attention_figure(path, panels: list[tuple[str, np.ndarray]], tokens: list[str], image, *, prompt: str,
                     prompt_index: int, seed: int, step: dict, cell: int = 72, gap: int = 6) -> None:
    """One row per layer, one column per prompt token (BOS..EOS); the final image first when given.

    Each map is scaled to its own range (bright = the image positions attending most to that
    text token); the percentage under it is the token's share of the attention mass. Drawn as
    one mosaic image (one Axes), which keeps large grids fast.
    """
    import matplotlib

    plt = _pyplot()
    panels = sorted(panels, key=lambda panel: layer_order(panel[0]))
    cmap = matplotlib.colormaps["inferno"]
    offset = 1 if image is not None else 0
    columns, rows = len(tokens) + offset, len(panels)
    label_band = 14  # pixels under each row for the shares
    pitch_x, pitch_y = cell + gap, cell + gap + label_band
    canvas = np.ones((rows * pitch_y, columns * pitch_x - gap, 3))
    for row, (_layer, maps) in enumerate(panels):
        top = row * pitch_y
        if image is not None:
            canvas[top : top + cell, 0:cell] = _resize_nearest(np.clip(np.asarray(image, dtype=float), 0, 1), cell)
        for position in range(len(tokens)):
            values = maps[position].astype(float)
            span = values.max() - values.min()
            scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
            left = (position + offset) * pitch_x
            canvas[top : top + cell, left : left + cell] = cmap(_resize_nearest(scaled, cell))[..., :3]
    dpi = 100
    margin_left, margin_top = 95, 120
    width, height = canvas.shape[1] + margin_left + 10, canvas.shape[0] + margin_top + 10
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((margin_left / width, 10 / height, canvas.shape[1] / width, canvas.shape[0] / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for position, token in enumerate(tokens):
        x = (position + offset) * pitch_x + cell / 2
        ax.text(x, -4, _clip(token, 10), ha="center", va="bottom", fontsize=7.5, rotation=0)
    if image is not None:
        ax.text(cell / 2, -4, "final image", ha="center", va="bottom", fontsize=7.5, style="italic")
    for row, (layer, maps) in enumerate(panels):
        top = row * pitch_y
        ax.text(-8, top + cell / 2, f"{short_layer(layer)}\n{maps.shape[1]}×{maps.shape[2]}", ha="right",
                va="center", fontsize=8)
        for position in range(len(tokens)):
            share = float(maps[position].mean())
            ax.text((position + offset) * pitch_x + cell / 2, top + cell + 2,
                    f"{share:.1%}", ha="center", va="top", fontsize=7,
                    color="dimgray")
    fig.text(10 / width, 1 - 8 / height,
             f"Cross-attention maps: prompt {prompt_index} (seed {seed}) at {step['name']} (t={step['timestep']:.0f})\n"
             f"“{_clip(prompt, 120)}”\n"
             "rows: layers (attention grid); columns: prompt tokens; each map on its own colour scale "
             "(bright = attends most);\nnumber under a map: the token's share of the attention",
             ha="left", va="top", fontsize=8.5)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# -- validation ---------------------------------------------------------------------------------
def _linear_label(row) -> str:
    return TEXT_LABEL if row["layer"] == "text" else row["linear"]


def leakage_tradeoff_figure(path, rows: list[dict]) -> None:
    """Leakage against null_dim/d as the threshold sweeps, per linear (median and 10–90 % band)."""
    plt = _pyplot()
    linears = [label for label in (*STEP_LINEARS, TEXT_LABEL) if any(_linear_label(row) == label for row in rows)]
    fig, axes = plt.subplots(1, len(linears), figsize=(4.6 * len(linears), 4.2), squeeze=False)
    for ax, linear in zip(axes[0], linears):
        selected = [row for row in rows if _linear_label(row) == linear]
        sweep = sorted({row["threshold"] for row in selected if not row["configured"]})
        series = {name: [] for name in ("x", "validation", "training", "bound")}
        for threshold in sweep:
            group = [row for row in selected if not row["configured"] and row["threshold"] == threshold]
            series["x"].append(np.median([row["null_dim"] / row["d"] for row in group]))
            for name, column in (("validation", "leakage_validation"), ("training", "leakage_training"),
                                 ("bound", "training_bound")):
                values = np.array([row[column] for row in group])
                series[name].append(np.percentile(values, [10, 50, 90]))
        x = np.array(series["x"])
        medians = np.concatenate([np.array(series[name])[:, 1] for name in ("validation", "training")])
        positive = medians[medians > 0]
        bottom = float(positive.min()) / 3 if positive.size else 1e-6
        for name, style in (("validation", dict(color="tab:blue", ls="-", marker="o")),
                            ("training", dict(color="tab:orange", ls="--", marker="s")),
                            ("bound", dict(color="gray", ls=":", marker=None))):
            values = np.array(series[name])
            shown = values[:, 1] > 0
            label = {"validation": "validation prompts (unseen)", "training": "training prompts",
                     "bound": "bound on training (math)"}[name]
            ax.plot(x[shown], values[shown, 1], lw=1.6 if name != "bound" else 1.2, ms=4, label=label, **style)
            if name != "bound":
                ax.fill_between(x[shown], np.maximum(values[shown, 0], bottom), np.maximum(values[shown, 2], bottom),
                                color=style["color"], alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_xlim(-0.02, 1.02)
        top = max(1.0, float(np.nanmax(np.array(series["validation"])[:, 2])) * 1.5) if sweep else 1.0
        ax.set_ylim(bottom, top)
        validation = np.array(series["validation"])[:, 1]
        placed = []
        for index, threshold in enumerate(sweep):
            if validation[index] <= 0:
                continue
            where = ax.transData.transform((x[index], validation[index]))
            if any(np.hypot(*(where - other)) < 26 for other in placed):
                continue  # would overprint a neighbouring label
            placed.append(where)
            near_left = x[index] < 0.12  # keep the label inside the axes
            ax.annotate(f"{threshold:g}", (x[index], validation[index]), textcoords="offset points",
                        xytext=(5, 3) if near_left else (-4, 6), fontsize=6.5, color="tab:blue",
                        ha="left" if near_left else "right")
        configured = [row for row in selected if row["configured"]]
        if configured:
            cx = np.median([row["null_dim"] / row["d"] for row in configured])
            thresholds = sorted({row["threshold"] for row in configured})
            what = f"τ={thresholds[0]:.3g}" if len(thresholds) == 1 else "per-matrix τ"
            for column, color in (("leakage_validation", "tab:blue"), ("leakage_training", "tab:orange")):
                cy = np.median([row[column] for row in configured])
                if cy > 0:
                    ax.plot([cx], [cy], marker="*", ms=13, color=color, mec="black", mew=0.6, ls="none",
                            label=f"configured ({what})" if column == "leakage_validation" else None)
        ax.set_xlabel("null-space dimension / d   (freedom to edit →)")
        ax.set_ylabel("leakage ‖ΔW P Xᵀ‖ / ‖ΔW Xᵀ‖   (lower = preserved)")
        ax.set_title(f"{linear}: median over layers, timesteps, ΔW")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    fig.suptitle("Freedom to edit vs. preservation as the threshold sweeps (blue labels: threshold τ)\n"
                 "band: 10–90 % over layers, timesteps and random updates ΔW", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def leakage_heatmap_figure(path, rows: list[dict], steps: list[dict]) -> None:
    """Leakage of the configured projection, layers x timesteps, validation (top) and training (bottom)."""
    import matplotlib.colors

    plt = _pyplot()
    configured = [row for row in rows if row["configured"]]
    linears = [linear for linear in STEP_LINEARS if any(row["linear"] == linear and row["layer"] != "text"
                                                          for row in configured)]
    text_rows = [row for row in configured if row["layer"] == "text"]
    names = [step["name"] for step in steps]
    layers = sorted({row["layer"] for row in configured if row["layer"] != "text"}, key=layer_order)
    if not linears:  # only the text inputs were collected (collect_features q and out false)
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no per-timestep inputs collected (collect_features: q and out are false);\n"
                "the text projection's leakage is in the trade-off figure", ha="center", va="center")
        _save(fig, path)
        return
    columns = len(names)
    annotate = columns <= 16
    width = max(4.5, 0.5 * columns + 2.2)
    fig, axes = plt.subplots(2, max(len(linears), 1), figsize=(width * max(len(linears), 1),
                                                                layers_height(len(layers)) * 2 + 2.4), squeeze=False)
    values_all = np.array([row[column] for row in configured if row["layer"] != "text"
                           for column in ("leakage_validation", "leakage_training")] or [1.0])
    positive = values_all[values_all > 0]
    low = float(positive.min()) if positive.size else 1e-6
    norm = matplotlib.colors.LogNorm(vmin=low, vmax=max(float(values_all.max()), low * 10))  # shared by all panels
    for row_index, (column_name, what) in enumerate((("leakage_validation", "validation prompts"),
                                                     ("leakage_training", "training prompts"))):
        for column, linear in enumerate(linears):
            cells: dict[tuple[int, int], list[float]] = {}
            for row in configured:
                if row["linear"] == linear and row["layer"] in layers and row["step"] in names:
                    cell = (layers.index(row["layer"]), names.index(row["step"]))
                    cells.setdefault(cell, []).append(row[column_name])
            grid = np.full((len(layers), columns), np.nan)
            for (y, x), values in cells.items():
                grid[y, x] = np.mean(values)
            ax = axes[row_index, column]
            image = ax.imshow(np.maximum(grid, low), aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
            _layer_step_axes(fig, ax, image, f"{linear}: leakage on {what}", layers, steps, columns)
            if annotate:
                for (y, x), value in np.ndenumerate(grid):
                    if np.isfinite(value):
                        shade = norm(max(value, low))
                        ax.text(x, y, f"{value:.2g}", ha="center", va="center", fontsize=7,
                                color="white" if shade > 0.55 else "black")
    thresholds = sorted({row["threshold"] for row in configured})
    title = ("Leakage ‖ΔW P Xᵀ‖ / ‖ΔW Xᵀ‖ of the configured projections "
             f"({'τ=' + format(thresholds[0], '.3g') if len(thresholds) == 1 else 'per-matrix τ'}), mean over ΔW")
    if text_rows:
        validation = np.mean([row["leakage_validation"] for row in text_rows])
        training = np.mean([row["leakage_training"] for row in text_rows])
        title += f"\ntext projection (to_k/to_v): validation {validation:.3g}, training {training:.3g}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# -- run summary --------------------------------------------------------------------------------
def read_benchmark(path, column: str = "s") -> float | None:
    """The mean of ``column`` (``s``: wall seconds; ``max_rss``: MB) over a Snakemake benchmark
    file's rows; None when the file is absent or the column empty (``NA``, ``-``)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        values = [row[column] for row in csv.DictReader(handle, delimiter="\t")]
    numbers = [float(value) for value in values if value not in ("", "-", "NA")]
    return sum(numbers) / len(numbers) if numbers else None


def folder_bytes(path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def summary_rows(*, config: dict, schedule: dict, provenance: dict, num_prompts: int, prompt_sha256: str,
                 num_shards: int, num_validation: int, benchmarks: dict[str, list[str]], folders: dict[str, str],
                 projection_stats: dict | None = None, validation_file: str | None = None
                 ) -> list[tuple[str, str, str]]:
    """(section, item, value) rows of the run summary.

    ``provenance`` is a shard file's (it records the device the feature jobs resolved);
    ``benchmarks`` maps a stage to its jobs' benchmark files; ``folders`` a label to a path.
    """
    model = provenance.get("model", {})
    steps = schedule["steps"]
    rows = [
        ("model", "model", f"{config['model']}"),
        ("model", "path", str(model.get("path", ""))),
        ("model", "fingerprint", str(model.get("fingerprint", ""))[:16]),
        ("prompts", "prompt file", f"{config['prompts']} ({num_prompts} prompts, sha256 {prompt_sha256[:12]})"),
        ("prompts", "shards", f"{num_shards} of up to {config['prompts_per_shard']} prompts"),
        ("prompts", "validation prompts",
         f"{validation_file or config.get('validation_prompts')} ({num_validation} prompts, seeds from seed + "
         f"{config.get('validation_seed_offset')})" if num_validation else "none"),
        ("schedule", "sampler", f"{config['sampler_strategy']} ({schedule['scheduler']['class']}), "
                                f"{len(steps)} UNet calls, collection {config['collection']}, "
                                f"guidance {config['guidance_scale']}"
                                + (" (both CFG branches collected)" if config["unconditional_branch"] else "")),
        ("schedule", "timesteps", ", ".join(f"{step['timestep']:.0f}" for step in steps[:30])
         + (" …" if len(steps) > 30 else "")),
        ("statistic", "statistic", config["statistic"]),
        ("statistic", "threshold", f"percentile {config['threshold_percent']} of each spectrum"
         if config.get("threshold_percent") is not None else f"{config['nullspace_threshold']:g} (absolute)"),
        ("statistic", "features", ", ".join(key for key, wanted in config["collect_features"].items() if wanted)
         + f"; layers: {config['cross_attention_layers']}; text tokens: {config['text_tokens']}"),
    ]
    for label, value in (projection_stats or {}).items():
        rows.append(("statistic", label, value))
    run = provenance.get("run", {})
    rows.append(("run", "device / dtype", f"{run.get('device', config['device'])} (device: {config['device']}) / "
                                          f"{config['dtype']}; batch {config['batch_size']}; seed {config['seed']}"))
    for stage, paths in benchmarks.items():
        times = [t for t in (read_benchmark(path) for path in paths) if t is not None]
        if not paths:
            continue
        value = (f"{sum(times):.1f} s total over {len(times)} job(s), longest {max(times):.1f} s"
                 if times else "no benchmark recorded")
        if times and len(times) < len(paths):
            value += f" ({len(paths) - len(times)} job(s) without a benchmark)"
        rows.append(("wall time", stage, value))
    for label, path in folders.items():
        size = folder_bytes(path)
        rows.append(("disk", label, f"{human_bytes(size)} ({size} bytes) in {path}"))
    return rows


def write_summary(rows: list[tuple[str, str, str]], tsv_path, html_path) -> None:
    """The rows as TSV and HTML, both ending with a row naming the page that explains them."""
    rows = [*rows, ("about", "this summary", f"what each row means: {OUTPUTS}")]
    with atomic_path(tsv_path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(("section", "item", "value"))
            writer.writerows(rows)
    body = []
    section = None
    for row_section, item, value in rows:
        if row_section != section:
            body.append(f'<tr class="section"><th colspan="2">{html.escape(row_section)}</th></tr>')
            section = row_section
        body.append(f"<tr><td>{html.escape(item)}</td><td>{html.escape(value)}</td></tr>")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>nullcov run summary</title><style>"
        "body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "tr.section th{background:#eef;font-size:15px}td:first-child{white-space:nowrap;color:#333}"
        "</style></head><body><h2>nullcov run summary</h2><table>\n" + "\n".join(body) + "\n</table></body></html>\n"
    )
    with atomic_path(html_path) as temporary:
        temporary.write_text(page, encoding="utf-8")


def projection_statistics(spectra_by_name: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Mean null-space fraction per linear over every layer and step."""
    fractions: dict[str, list[float]] = {}
    for spectra in spectra_by_name.values():
        for key, entry in spectra.items():
            linear = TEXT_LABEL if key == TEXT_KEY else split_key(key)[1]
            fractions.setdefault(linear, []).append(entry["null_dim"] / entry["d"])
    order = [*STEP_LINEARS, TEXT_LABEL]
    return {f"null_dim / d, {linear}": f"mean {np.mean(values):.1%}, range {min(values):.1%}–{max(values):.1%} "
            f"over {len(values)} matri{'x' if len(values) == 1 else 'ces'}"
            for linear, values in sorted(fractions.items(), key=lambda item: order.index(item[0]))}


def read_provenance(path) -> dict:
    """The ``provenance`` attribute of a nullcov HDF5 file."""
    import h5py

    with h5py.File(Path(path), "r") as handle:
        return json.loads(handle.attrs["provenance"])
