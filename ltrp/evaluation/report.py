"""The evaluation as people read it: a Markdown report and two PNGs, written to a local folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes and CI
import matplotlib.pyplot as plt
import numpy as np

from ltrp.evaluation.measures import MEASURES, RATIO_FREE, Estimate, measure_of, metric_key
from ltrp.evaluation.protocol import EvaluationResult

REPORT, CURVES, KEPT = "report.md", "measures_vs_keep_ratio.png", "kept_patches.png"
_TITLES = {
    "kendall_tau": "Kendall tau with held-out pseudo-scores",
    "spearman": "Spearman with held-out pseudo-scores",
    "ndcg": "NDCG@k with held-out pseudo-scores (k = keep ratio x scored patches)",
    "topk_overlap": "top-k overlap with held-out pseudo-scores",
    "reconstruction_error": "MAE reconstruction error on the dropped patches (lower is better)",
    "accuracy": "accuracy of a classifier on the kept patches only",
    "accuracy_seen": "accuracy on the classes the supervised selector was trained on",
    "accuracy_unseen": "accuracy on the classes the supervised selector never saw",
}


def _cell(e: Estimate | None) -> str:
    return "n/a" if e is None else f"{e.mean:.4f} [{e.lo:.4f}, {e.hi:.4f}]"


def _pct(ratio: float) -> str:
    return f"{round(ratio * 100)}%"


def markdown(result: EvaluationResult, title: str) -> str:
    """The report: one table per measure (scorers x keep ratios), then ltrp's paired differences."""
    est = result.estimates
    unseen = [c for c in result.classes if c not in result.seen_classes]
    free = [m for m in RATIO_FREE if any(m in per for per in est.values())]
    lines = [
        f"# {title}",
        "",
        f"{result.test_images} held-out images, {result.train_images} labelled training images for the "
        f"classifiers; classes {', '.join(result.classes)}; the supervised selector saw "
        f"{', '.join(result.seen_classes)} and never {', '.join(unseen)}. Each cell: mean over images "
        f"[95% bootstrap interval]. Evaluation set digest `{result.dataset}`.",
        "",
        "The oracle ranks the table's scored patches by their pseudo-scores and the rest at random below "
        "them; it has no pseudo-scores for the training images, so no classifier figures.",
        "",
        "## " + ", ".join(_TITLES[m] for m in free),
        "",
        "| scorer | " + " | ".join(free) + " |",
        "| --- |" + " --- |" * len(free),
    ]
    lines += [f"| {s} | " + " | ".join(_cell(est[s].get(m)) for m in free) + " |" for s in result.scorers]
    ratios = result.keep_ratios
    for measure in _measures(result):
        lines += [
            "",
            f"## {_TITLES[measure]}",
            "",
            "| scorer | " + " | ".join(f"keep {_pct(r)}" for r in ratios) + " |",
        ]
        lines.append("| --- |" + " --- |" * len(ratios))
        for s in result.scorers:
            cells = [_cell(est[s].get(metric_key(measure, r))) for r in ratios]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## ltrp minus each scorer, paired on the same images (keep {_pct(result.figure_ratio)})",
        "",
        "Intervals that exclude 0 are differences the evaluation can tell apart.",
        "",
    ]
    compared = ["reconstruction_error", "accuracy", "accuracy_seen", "accuracy_unseen"]
    lines += ["| scorer | " + " | ".join(compared) + " |", "| --- |" + " --- |" * len(compared)]
    for s, diffs in result.paired.items():
        cells = [_cell(diffs.get(metric_key(m, result.figure_ratio))) for m in compared]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"![measures]({CURVES})", "", f"![kept patches]({KEPT})", ""]
    return "\n".join(lines)


def _measures(result: EvaluationResult) -> list[str]:
    """The keep-ratio measures this evaluation has figures for, in MEASURES order."""
    keys = {measure_of(k) for per in result.estimates.values() for k in per}
    return [m for m in MEASURES if m not in RATIO_FREE and m in keys]


def plot_curves(result: EvaluationResult, path: Path) -> None:
    """Each ratio-dependent measure against the keep ratio, one line per scorer, 95% intervals as bars."""
    measures = _measures(result)
    fig, axes = plt.subplots(2, (len(measures) + 1) // 2, figsize=(4.2 * ((len(measures) + 1) // 2), 7.5))
    x = [100 * r for r in result.keep_ratios]
    colors = dict(zip(result.scorers, plt.get_cmap("tab10").colors, strict=False))  # same in every panel
    for ax, measure in zip(axes.flat, measures, strict=False):
        for s in result.scorers:
            points = [result.estimates[s].get(metric_key(measure, r)) for r in result.keep_ratios]
            if None in points:
                continue
            mean = np.array([e.mean for e in points])
            err = np.array([[e.mean - e.lo for e in points], [e.hi - e.mean for e in points]])
            ax.errorbar(
                x,
                mean,
                yerr=err,
                marker="o",
                ms=3,
                capsize=2,
                label=s,
                color=colors[s],
                lw=2.2 if s == "ltrp" else 1,
            )
        ax.set_title(measure.replace("_", " "), fontsize=10)
        ax.set_xlabel("patches kept (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: The tint of dropped patches in the kept-patches figures (also their legend's colour).
DROPPED_TINT = np.array([0.05, 0.1, 0.35])


def dim_dropped(image: np.ndarray, keep: np.ndarray, patch: int) -> np.ndarray:
    """image (S, S, 3) floats in [0, 1], keep (k,) kept patch indices -> the image with the dropped
    patches dimmed under a blue tint (so kept dark background stays visible)."""
    grid = image.shape[0] // patch
    kept = np.zeros(grid * grid, dtype=bool)
    kept[keep] = True
    kept = np.kron(kept.reshape(grid, grid), np.ones((patch, patch), dtype=bool))
    return np.where(kept[..., None], image, 0.3 * image + DROPPED_TINT)


def plot_kept(result: EvaluationResult, path: Path) -> None:
    """A grid: one row per example image, one column per scorer; kept patches as they are, dropped tinted."""
    p, examples = result.patch_size, result.examples
    cols = ["image", *result.scorers]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(1.3 * len(cols), 1.4 * len(examples)))
    axes = np.atleast_2d(axes)
    for row, image in enumerate(examples):
        for col, name in enumerate(cols):
            shown = image.astype(np.float32) / 255
            if name != "image":
                shown = dim_dropped(shown, result.example_keep[name][row], p)
            axes[row, col].imshow(shown, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
    fig.suptitle(f"top {round(100 * result.figure_ratio)}% of patches kept by each scorer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: EvaluationResult, folder: Path, title: str) -> list[Path]:
    """Writes report.md and the two PNGs into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT).write_text(markdown(result, title))
    plot_curves(result, folder / CURVES)
    plot_kept(result, folder / KEPT)
    return [folder / REPORT, folder / CURVES, folder / KEPT]
