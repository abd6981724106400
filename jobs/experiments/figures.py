"""What the experiments' figures share: pyplot without a display, and one way to finish and save a figure."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # experiments run headless: on cluster nodes, over ssh, in CI
import matplotlib.pyplot as plt

__all__ = ["plt", "save", "write_result"]


def save(fig: plt.Figure, axes: Iterable[plt.Axes], path: Path, legend_columns: int = 1) -> None:
    """Grids and legends on `axes`, then writes `fig` to `path` (120 dpi) and frees it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_result(result: dict, folder: str, name: str, draw: Callable[[dict, Path], None]) -> None:
    """An experiment's outputs: FOLDER/NAME.json (`result`) and FOLDER/NAME.png (`draw(result, path)`)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    draw(result, out / f"{name}.png")
