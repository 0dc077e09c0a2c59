"""The cross-attention figure (rule ``attention_maps``, drawn by :mod:`nullcov.report.attention`): one
mosaic per (prompt, step), layers x prompt tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nullcov.report.figures_layers import layer_order, short_layer
from nullcov.report.plotting import pyplot, save

DPI = 100
MARGIN_LEFT, MARGIN_TOP, MARGIN = 95, 120, 10  # pixels around the mosaic: row labels, title, the rest


@dataclass(frozen=True)
class _Mosaic:
    """Pixel positions of the mosaic: square cells, a gap between them and a band under each row
    for the shares; column 0 holds the final image when ``offset`` is 1."""

    cell: int
    gap: int
    offset: int
    label_band: int = 14

    @property
    def pitch_x(self) -> int:
        return self.cell + self.gap

    @property
    def pitch_y(self) -> int:
        return self.cell + self.gap + self.label_band

    def top(self, row: int) -> int:
        return row * self.pitch_y

    def left(self, position: int) -> int:
        """Left edge of the token at ``position``."""
        return (position + self.offset) * self.pitch_x


def attention_figure(path, panels: list[tuple[str, np.ndarray]], tokens: list[str], image, *, prompt: str,
                     prompt_index: int, seed: int, step: dict, cell: int = 72, gap: int = 6) -> None:
    """One row per layer, one column per prompt token (BOS..EOS); the final image first when given.

    Each map is scaled to its own range (bright = the image positions attending most to that
    text token); the percentage under it is the token's share of the attention mass. Drawn as
    one mosaic image (one Axes), which keeps large grids fast.
    """
    plt = pyplot()
    panels = sorted(panels, key=lambda panel: layer_order(panel[0]))
    mosaic = _Mosaic(cell, gap, 1 if image is not None else 0)
    canvas = _canvas(mosaic, panels, len(tokens), image)
    width, height = canvas.shape[1] + MARGIN_LEFT + MARGIN, canvas.shape[0] + MARGIN_TOP + MARGIN
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((MARGIN_LEFT / width, MARGIN / height, canvas.shape[1] / width, canvas.shape[0] / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    _label_columns(ax, mosaic, tokens, image is not None)
    _label_rows(ax, mosaic, panels, len(tokens))
    fig.text(MARGIN / width, 1 - 8 / height, _title(prompt, prompt_index, seed, step), ha="left", va="top",
             fontsize=8.5)
    save(fig, path, dpi=DPI, tight=False)


def _canvas(mosaic: _Mosaic, panels: list[tuple[str, np.ndarray]], num_tokens: int, image) -> np.ndarray:
    """The RGB mosaic on white: per row the final image (if any), then each token's map in inferno."""
    import matplotlib

    cmap = matplotlib.colormaps["inferno"]
    columns, rows, cell = num_tokens + mosaic.offset, len(panels), mosaic.cell
    canvas = np.ones((rows * mosaic.pitch_y, columns * mosaic.pitch_x - mosaic.gap, 3))
    for row, (_layer, maps) in enumerate(panels):
        top = mosaic.top(row)
        if image is not None:
            canvas[top : top + cell, 0:cell] = _resize_nearest(np.clip(np.asarray(image, dtype=float), 0, 1), cell)
        for position in range(num_tokens):
            left = mosaic.left(position)
            scaled = _resize_nearest(_own_range(maps[position]), cell)
            canvas[top : top + cell, left : left + cell] = cmap(scaled)[..., :3]
    return canvas


def _own_range(values: np.ndarray) -> np.ndarray:
    """``values`` scaled to [0, 1] by their own minimum and maximum (all zero when constant)."""
    values = values.astype(float)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _resize_nearest(values: np.ndarray, size: int) -> np.ndarray:
    rows = (np.arange(size) * values.shape[0] // size).astype(int)
    columns = (np.arange(size) * values.shape[1] // size).astype(int)
    return values[rows][:, columns]


def _label_columns(ax, mosaic: _Mosaic, tokens: list[str], has_image: bool) -> None:
    """The tokens above their columns, and "final image" above the image column."""
    for position, token in enumerate(tokens):
        ax.text(mosaic.left(position) + mosaic.cell / 2, -4, _clip(token, 10), ha="center", va="bottom",
                fontsize=7.5, rotation=0)
    if has_image:
        ax.text(mosaic.cell / 2, -4, "final image", ha="center", va="bottom", fontsize=7.5, style="italic")


def _label_rows(ax, mosaic: _Mosaic, panels: list[tuple[str, np.ndarray]], num_tokens: int) -> None:
    """Each row's layer and attention grid on the left, and each token's share of the attention under its map."""
    cell = mosaic.cell
    for row, (layer, maps) in enumerate(panels):
        top = mosaic.top(row)
        ax.text(-8, top + cell / 2, f"{short_layer(layer)}\n{maps.shape[1]}×{maps.shape[2]}", ha="right",
                va="center", fontsize=8)
        for position in range(num_tokens):
            share = float(maps[position].mean())
            ax.text(mosaic.left(position) + cell / 2, top + cell + 2, f"{share:.1%}", ha="center", va="top",
                    fontsize=7, color="dimgray")


def _title(prompt: str, prompt_index: int, seed: int, step: dict) -> str:
    return (f"Cross-attention maps: prompt {prompt_index} (seed {seed}) at {step['name']} "
            f"(t={step['timestep']:.0f})\n"
            f"“{_clip(prompt, 120)}”\n"
            "rows: layers (attention grid); columns: prompt tokens; each map on its own colour scale "
            "(bright = attends most);\nnumber under a map: the token's share of the attention")


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"
