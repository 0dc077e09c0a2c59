"""Figure setup and saving shared by every figure of the package (the report's ``figures_*``
modules, the fine-tune proof's): matplotlib's cache folder, the Agg backend and font sizes, and
the atomic PNG write.

Every figure is a plain PNG that the Snakemake report also embeds. Importing this module, or any
``figures_*`` module, is cheap (no torch, no matplotlib: both are imported where used).
"""

from __future__ import annotations

import os
from pathlib import Path

from nullcov.files import atomic_path

MATPLOTLIB_CACHE = "resources/cache/matplotlib"


def keep_matplotlib_cache_in_workdir() -> None:
    """Jobs write nothing to $HOME: matplotlib's font cache goes to resources/cache/matplotlib of
    the working directory unless MPLCONFIGDIR is set. Call before matplotlib is imported."""
    if "MPLCONFIGDIR" not in os.environ:
        path = Path(MATPLOTLIB_CACHE).resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(path)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with the report's font sizes and resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
                         "figure.dpi": 110, "savefig.dpi": 110})
    return plt


def save(fig, path, *, dpi: float | None = None, tight: bool = True) -> None:
    """Write ``fig`` to ``path`` as a PNG on a white background (atomically), then close it.

    ``tight`` crops to the drawn content; ``dpi`` None is the report's resolution (:func:`pyplot`).
    """
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight" if tight else None, facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
