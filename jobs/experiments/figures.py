"""What the experiments' figures share: pyplot without a display, and one way to finish and save a figure."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # experiments run headless: on cluster nodes, over ssh, in CI
import matplotlib.pyplot as plt

__all__ = ["plt", "save"]


def save(fig: plt.Figure, axes: Iterable[plt.Axes], path: Path, legend_columns: int = 1) -> None:
    """Grids and legends on `axes`, then writes `fig` to `path` (120 dpi) and frees it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
