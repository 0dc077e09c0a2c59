"""Figures of the projections (rule ``report_figures``): eigenvalue spectra per layer at the
selected steps, the text states' spectrum, and ``null_dim`` heatmaps layers x timesteps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nullcov.layout import TEXT_NAME
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, split_key, statistic_key
from nullcov.report.figures_layers import (
    MANY_LAYERS,
    layer_order,
    layer_step_axes,
    layers_height,
    short_layer,
    step_label,
)
from nullcov.report.plotting import pyplot, save
from nullcov.statistics import store

#: Figure kinds of rule report_figures that draw one linear's spectra: kind -> linear (``spectra_to_q``: ``to_q``).
SPECTRA_FIGURES = {f"spectra_{linear}": linear for linear in CROSS_ATTENTION.per_step}


def projection_figures(figures: dict, schedule_steps: list[dict], projection_files: list, step_names: list[str],
                       report_steps: list[int]) -> None:
    """Draw rule ``report_figures``' outputs: ``figures`` maps a kind (``spectra_to_q``,
    ``spectra_to_out``, ``spectra_text``, ``null_dim``) to its path.

    ``projection_files`` are the projection files (``<step name>.h5`` and the text file);
    the spectra figures show the steps ``report_steps`` (indices into ``step_names``), the
    ``null_dim`` heatmap every step.
    """
    steps = {step["name"]: step for step in schedule_steps}
    files = {Path(path).stem: path for path in projection_files}  # step name (or text) -> file
    spectra = {name: store.read_spectra(files[name]) for name in step_names}
    shown = [step_names[index] for index in report_steps] if step_names else []
    for kind, path in figures.items():
        if kind in SPECTRA_FIGURES:
            spectra_figure(path, SPECTRA_FIGURES[kind], [steps[n] for n in shown], [spectra[n] for n in shown])
    text = store.read_spectra(files[TEXT_NAME])[TEXT_KEY] if "spectra_text" in figures else None
    if text is not None:
        text_spectrum_figure(figures["spectra_text"], text)
    if "null_dim" in figures:
        null_dim_figure(figures["null_dim"], [steps[n] for n in step_names], [spectra[n] for n in step_names], text)


# -- spectra ----------------------------------------------------------------------------------
def spectra_figure(path, linear: str, steps: list[dict], spectra: list[dict[str, dict]]) -> None:
    """Eigenvalue spectra of every layer's ``linear`` statistic, one curve per selected step.

    ``steps[i]`` is the schedule entry whose projection file gave ``spectra[i]``.
    """
    plt = pyplot()
    layers = sorted({split_key(key)[0] for spectrum in spectra for key in spectrum if split_key(key)[1] == linear},
                    key=layer_order)
    rows, columns = spectra_grid(len(layers))
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.7 * rows), squeeze=False)
    colors = _step_colors(len(steps))
    for ax, layer in zip(axes.flat, layers, strict=False):  # the grid may have more panels than layers
        entries = [spectrum[statistic_key(layer, linear)] for spectrum in spectra]
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
    save(fig, path)


def spectra_grid(num_layers: int) -> tuple[int, int]:
    """(rows, columns) of the spectra panels: 4 columns up to 16 layers, then about square (SDXL's 70: 8 x 9)."""
    columns = min(num_layers, 4 if num_layers <= 16 else math.ceil(math.sqrt(num_layers)))
    return math.ceil(num_layers / columns), columns


def text_spectrum_figure(path, entry: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    _spectrum_panel(ax, [entry], ["text"], ["tab:blue"])
    ax.set_xlabel("eigenvalue rank (1 = largest)")
    ax.set_ylabel("eigenvalue (log)")
    ax.set_title(f"Spectrum of the text-encoder states ({CROSS_ATTENTION.text_label} input), d={entry['d']}\n"
                 "shaded: below the threshold = null space")
    fig.tight_layout()
    save(fig, path)


def _step_colors(count: int):
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    return [cmap(0.85 * i / max(count - 1, 1)) for i in range(count)]


def _positive_floor(values: np.ndarray) -> float:
    top = float(np.max(values)) if values.size else 1.0
    return max(top, 1e-300) * 1e-12


def _spectrum_panel(ax, entries: list[dict], labels: list[str], colors) -> None:
    values = np.concatenate([entry["eigenvalues"] for entry in entries])
    positive = values[values > 0]
    floor = float(positive.min()) / 3 if positive.size else 1e-12  # eigenvalues <= 0 are drawn here
    floor = max(floor, _positive_floor(values))
    thresholds = sorted({entry["threshold"] for entry in entries})
    for entry, label, color in zip(entries, labels, colors, strict=True):
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


# -- null-space dimension -----------------------------------------------------------------------
def null_dim_figure(path, steps: list[dict], spectra: list[dict[str, dict]], text: dict | None) -> None:
    """Heatmaps layers x timesteps of ``null_dim`` (top) and ``null_dim / d`` (bottom), per linear."""
    plt = pyplot()
    linears = [linear for linear in CROSS_ATTENTION.per_step if any(split_key(key)[1] == linear for key in spectra[0])]
    layers = sorted({split_key(key)[0] for key in spectra[0]}, key=layer_order)
    width = max(4.5, 0.42 * len(steps) + 2.2)
    fig, axes = plt.subplots(2, len(linears), figsize=(width * len(linears), layers_height(len(layers)) * 2 + 2.4),
                             squeeze=False)
    for column, linear in enumerate(linears):
        counts = np.array([[spectrum[statistic_key(layer, linear)]["null_dim"] for spectrum in spectra]
                           for layer in layers])
        dims = np.array([[spectrum[statistic_key(layer, linear)]["d"] for spectrum in spectra] for layer in layers])
        for row, (values, title, fmt, vmax) in enumerate([
            (counts, f"{linear}: null_dim", "{:.0f}", None),
            (counts / dims, f"{linear}: null_dim / d", "{:.0%}", 1.0),
        ]):
            _null_dim_panel(fig, axes[row, column], values, title, fmt, vmax, layers, steps)
    fig.suptitle(_null_dim_title(text), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    save(fig, path)


def _null_dim_panel(fig, ax, values: np.ndarray, title: str, fmt: str, vmax: float | None, layers: list[str],
                    steps: list[dict]) -> None:
    """One heatmap, each cell labelled with its value when there are at most 25 timesteps."""
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    layer_step_axes(fig, ax, image, title, layers, steps, len(steps))
    if len(steps) > 25:
        return
    for (y, x), value in np.ndenumerate(values):
        shade = image.norm(value)
        ax.text(x, y, fmt.format(value), ha="center", va="center", fontsize=7 if len(layers) <= MANY_LAYERS else 5,
                color="black" if shade > 0.6 else "white")


def _null_dim_title(text: dict | None) -> str:
    title = "Null-space dimension per layer and timestep"
    if text is not None:
        title += (f"   |   text projection ({CROSS_ATTENTION.text_label}, all timesteps): "
                  f"null_dim {text['null_dim']} of d={text['d']} ({text['null_dim'] / text['d']:.0%})")
    return title
