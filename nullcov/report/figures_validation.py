"""Figures of the leakage check (rule ``validation_report``): leakage against the null space's
size as the threshold sweeps, and the configured projection's leakage layers x timesteps.

``rows`` are the leakage table's rows (:data:`nullcov.report.validation.COLUMNS`, as
:func:`nullcov.report.validation.gather_tables` returns them).
"""

from __future__ import annotations

import numpy as np

from nullcov.models.family import CROSS_ATTENTION
from nullcov.report.figures_layers import TEXT_LABEL, layer_order, layer_step_axes, layers_height
from nullcov.report.plotting import pyplot, save
from nullcov.report.validation import TEXT_LAYER

#: The trade-off figure's curves: name, table column, legend label, line style.
_SERIES = (
    ("validation", "leakage_validation", "validation prompts (unseen)", dict(color="tab:blue", ls="-", marker="o")),
    ("training", "leakage_training", "training prompts", dict(color="tab:orange", ls="--", marker="s")),
    ("bound", "training_bound", "bound on training (math)", dict(color="gray", ls=":", marker=None)),
)
#: The heatmap figure's rows: table column, which prompts.
_HEATMAP_ROWS = (("leakage_validation", "validation prompts"), ("leakage_training", "training prompts"))


def _linear_label(row) -> str:
    return TEXT_LABEL if row["layer"] == TEXT_LAYER else row["linear"]


def _tau_label(configured: list[dict]) -> str:
    """The configured threshold, or "per-matrix τ" when the configured rows have several."""
    thresholds = sorted({row["threshold"] for row in configured})
    return f"τ={thresholds[0]:.3g}" if len(thresholds) == 1 else "per-matrix τ"


# -- trade-off ----------------------------------------------------------------------------------
def leakage_tradeoff_figure(path, rows: list[dict]) -> None:
    """Leakage against null_dim/d as the threshold sweeps, per linear (median and 10–90 % band)."""
    plt = pyplot()
    linears = [label for label in (*CROSS_ATTENTION.per_step, TEXT_LABEL)
               if any(_linear_label(row) == label for row in rows)]
    fig, axes = plt.subplots(1, len(linears), figsize=(4.6 * len(linears), 4.2), squeeze=False)
    for ax, linear in zip(axes[0], linears, strict=True):
        _tradeoff_panel(ax, linear, [row for row in rows if _linear_label(row) == linear])
    fig.suptitle("Freedom to edit vs. preservation as the threshold sweeps (blue labels: threshold τ)\n"
                 "band: 10–90 % over layers, timesteps and random updates ΔW", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def _tradeoff_panel(ax, linear: str, selected: list[dict]) -> None:
    """One linear's curves over the threshold sweep, its threshold labels and the configured projection."""
    sweep = sorted({row["threshold"] for row in selected if not row["configured"]})
    x, series = _sweep_series(selected, sweep)
    medians = np.concatenate([series[name][:, 1] for name in ("validation", "training")])
    positive = medians[medians > 0]
    bottom = float(positive.min()) / 3 if positive.size else 1e-6
    _plot_series(ax, x, series, bottom)
    ax.set_yscale("log")
    ax.set_xlim(-0.02, 1.02)
    top = max(1.0, float(np.nanmax(series["validation"][:, 2])) * 1.5) if sweep else 1.0
    ax.set_ylim(bottom, top)
    _label_thresholds(ax, sweep, x, series["validation"][:, 1])
    _mark_configured(ax, [row for row in selected if row["configured"]])
    ax.set_xlabel("null-space dimension / d   (freedom to edit →)")
    ax.set_ylabel("leakage ‖ΔW P Xᵀ‖ / ‖ΔW Xᵀ‖   (lower = preserved)")
    ax.set_title(f"{linear}: median over layers, timesteps, ΔW")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)


def _sweep_series(selected: list[dict], sweep: list[float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per swept threshold: the median null_dim/d (x), and each series' 10th, 50th and 90th percentile."""
    x, series = [], {name: [] for name, *_ in _SERIES}
    for threshold in sweep:
        group = [row for row in selected if not row["configured"] and row["threshold"] == threshold]
        x.append(np.median([row["null_dim"] / row["d"] for row in group]))
        for name, column, *_ in _SERIES:
            series[name].append(np.percentile(np.array([row[column] for row in group]), [10, 50, 90]))
    return np.array(x), {name: np.array(values) for name, values in series.items()}


def _plot_series(ax, x: np.ndarray, series: dict[str, np.ndarray], bottom: float) -> None:
    """The medians as lines (zeros left out: log axis); for the measured series the 10–90 % band."""
    for name, _column, label, style in _SERIES:
        values = series[name]
        shown = values[:, 1] > 0
        ax.plot(x[shown], values[shown, 1], lw=1.6 if name != "bound" else 1.2, ms=4, label=label, **style)
        if name != "bound":
            ax.fill_between(x[shown], np.maximum(values[shown, 0], bottom), np.maximum(values[shown, 2], bottom),
                            color=style["color"], alpha=0.15, lw=0)


def _label_thresholds(ax, sweep: list[float], x: np.ndarray, validation: np.ndarray) -> None:
    """Each swept threshold next to its validation point, skipping labels that would overprint a neighbour."""
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


def _mark_configured(ax, configured: list[dict]) -> None:
    """Stars at the configured projection's median null_dim/d and leakage (validation, training)."""
    if not configured:
        return
    cx = np.median([row["null_dim"] / row["d"] for row in configured])
    what = _tau_label(configured)
    for column, color in (("leakage_validation", "tab:blue"), ("leakage_training", "tab:orange")):
        cy = np.median([row[column] for row in configured])
        if cy > 0:
            ax.plot([cx], [cy], marker="*", ms=13, color=color, mec="black", mew=0.6, ls="none",
                    label=f"configured ({what})" if column == "leakage_validation" else None)


# -- heatmap ------------------------------------------------------------------------------------
def leakage_heatmap_figure(path, rows: list[dict], steps: list[dict]) -> None:
    """Leakage of the configured projection, layers x timesteps, validation (top) and training (bottom)."""
    plt = pyplot()
    configured = [row for row in rows if row["configured"]]
    step_rows = [row for row in configured if row["layer"] != TEXT_LAYER]
    linears = [linear for linear in CROSS_ATTENTION.per_step if any(row["linear"] == linear for row in step_rows)]
    if not linears:  # only the text inputs were collected (collect_features q and out false)
        _no_step_inputs_figure(plt, path)
        return
    names = [step["name"] for step in steps]
    layers = sorted({row["layer"] for row in step_rows}, key=layer_order)
    width = max(4.5, 0.5 * len(names) + 2.2)
    fig, axes = plt.subplots(2, len(linears), figsize=(width * len(linears), layers_height(len(layers)) * 2 + 2.4),
                             squeeze=False)
    norm, low = _shared_norm(step_rows)
    for row_index, (column_name, what) in enumerate(_HEATMAP_ROWS):
        for column, linear in enumerate(linears):
            grid = _leakage_grid(configured, linear, column_name, layers, names)
            ax = axes[row_index, column]
            image = ax.imshow(np.maximum(grid, low), aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
            layer_step_axes(fig, ax, image, f"{linear}: leakage on {what}", layers, steps, len(names))
            if len(names) <= 16:
                _annotate_cells(ax, grid, norm, low)
    fig.suptitle(_heatmap_title(configured), fontsize=10)
    fig.tight_layout()
    save(fig, path)


def _no_step_inputs_figure(plt, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.set_axis_off()
    ax.text(0.5, 0.5, "no per-timestep inputs collected (collect_features: q and out are false);\n"
            "the text projection's leakage is in the trade-off figure", ha="center", va="center")
    save(fig, path)


def _shared_norm(step_rows: list[dict]):
    """The log colour scale every panel shares, and its lower end (smallest positive leakage)."""
    import matplotlib.colors

    values = np.array([row[column] for row in step_rows for column, _ in _HEATMAP_ROWS] or [1.0])
    positive = values[values > 0]
    low = float(positive.min()) if positive.size else 1e-6
    return matplotlib.colors.LogNorm(vmin=low, vmax=max(float(values.max()), low * 10)), low


def _leakage_grid(configured: list[dict], linear: str, column: str, layers: list[str], names: list[str]) -> np.ndarray:
    """Mean of ``column`` over the updates ΔW, layers x steps (NaN where no row)."""
    cells: dict[tuple[int, int], list[float]] = {}
    for row in configured:
        if row["linear"] == linear and row["layer"] in layers and row["step"] in names:
            cells.setdefault((layers.index(row["layer"]), names.index(row["step"])), []).append(row[column])
    grid = np.full((len(layers), len(names)), np.nan)
    for (y, x), values in cells.items():
        grid[y, x] = np.mean(values)
    return grid


def _annotate_cells(ax, grid: np.ndarray, norm, low: float) -> None:
    for (y, x), value in np.ndenumerate(grid):
        if np.isfinite(value):
            shade = norm(max(value, low))
            ax.text(x, y, f"{value:.2g}", ha="center", va="center", fontsize=7,
                    color="white" if shade > 0.55 else "black")


def _heatmap_title(configured: list[dict]) -> str:
    """The title, with the text projection's mean leakage when it was checked."""
    title = f"Leakage ‖ΔW P Xᵀ‖ / ‖ΔW Xᵀ‖ of the configured projections ({_tau_label(configured)}), mean over ΔW"
    text_rows = [row for row in configured if row["layer"] == TEXT_LAYER]
    if text_rows:
        validation = np.mean([row["leakage_validation"] for row in text_rows])
        training = np.mean([row["leakage_training"] for row in text_rows])
        title += (f"\ntext projection ({CROSS_ATTENTION.text_label}): validation {validation:.3g}, "
                  f"training {training:.3g}")
    return title
