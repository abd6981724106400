"""Experiment: how much of a selector's bias gap is the objects' geometry, not their class?

    python -m jobs.experiments.bias_gap --model models:/ltrp-scenes-benchmark/4 \\
        --test runs/benchmark-v2/data/test/manifest.parquet \\
        --scores runs/benchmark-v2/scores-test-d8f409befc

The bias gap (docs/evaluation.md) is seen-class recall minus unseen-class recall. Our ranker, its judge
and the centre prior never see a label, and the ranker's training scenes draw every class alike; yet
their gaps are not 0. Seen and unseen objects differ in more than class: Fashion-MNIST's clothes are
compact and fill their box, its shoes and bags are thin and elongated; the bias scenes place the seen
object first and shrink the unseen one when room runs out. A selector that keeps large, compact or
central objects better then shows a gap with no knowledge of classes.

Per object of the held-out bias scenes, its recall at 25% keep is regressed (least squares) on a
seen-class indicator, alone (the raw gap, per object) and beside its geometry: log visible pixels, the
mean fill of the patches it touches, its centroid's distance from the image centre (in patches) and the
scene's background kind. The seen coefficient with geometry held fixed is the adjusted gap: what class
adds beyond the shape the selector sees. 95% intervals resample scenes (objects of one scene together).
A class-blind selector (centre, variance) is the placebo: its adjusted gap should be near 0 if the
covariates capture geometry. Prints a table; writes OUTPUT/bias_gap.json and OUTPUT/bias_gap.png.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import tyro

from ltrp.core.baselines import CenterScorer, GradientEnergyScorer, RandomScorer, RankerScorer, VarianceScorer
from ltrp.core.mae import MAE
from ltrp.core.options import ROUNDS
from ltrp.core.probe import ProbeSettings
from ltrp.core.ranker import keep_top
from ltrp.data.checkpoints import load_mae
from ltrp.data.scenes import SEEN_CLASSES, SHIPPED_MAE, UNSEEN_CLASSES
from ltrp.data.tables import read_scores
from ltrp.evaluation import fidelity
from ltrp.evaluation.objects import ImageObjects, object_recalls
from ltrp.evaluation.protocol import Scorer, score_all
from ltrp.evaluation.scene_eval import PRIMARY_RATIO, SceneEvalSettings, load_scene_set, supervised_selector
from ltrp.pipeline.registry import load_ranker_ref

FEATURES = ("log visible pixels", "fill of its patches", "distance from centre (patches)")


@dataclass
class BiasGapConfig:
    """The bias gap of each selector, raw and with the objects' geometry held fixed."""

    model: str  # the ranker: models:/NAME/VERSION, models:/NAME@ALIAS, or a training checkpoint (state.pt)
    test: str  # held-out bias scene manifest with object masks
    scores: tuple[str, ...] = ()  # the test scenes' full-cover score table(s): adds the oracle
    train: str = ""  # labelled training scene manifest: adds the supervised selector, fine-tuned as evaluated
    max_train: int = 800  # training scenes the supervised selector learns from (the benchmark's)
    supervised_epochs: int = 15  # at most (early stopping on validation mAP, the evaluation's)
    mae: str = str(SHIPPED_MAE)  # the judge: its CLS attention is a selector
    rounds: int = ROUNDS  # the ranker's set-inference rounds (0: one pass)
    keep_ratio: float = PRIMARY_RATIO
    resamples: int = 1000  # bootstrap resamples (scenes)
    seed: int = 0
    threads: int = 2  # torch threads
    output: str = "runs/bench/bias-gap"  # folder of bias_gap.json and bias_gap.png


@dataclass(frozen=True)
class Objects:
    """Every object of the test scenes, one row each: its scene, group and geometry."""

    scene: np.ndarray  # (M,) index of its scene
    index: np.ndarray  # (M,) its index among its scene's objects
    seen: np.ndarray  # (M,) bool: of a seen class (rows of neither group are left out)
    geometry: np.ndarray  # (M, len(FEATURES))
    kind: np.ndarray  # (M,) background kind of its scene


def main(argv: list[str] | None = None) -> dict:
    prog = "python -m jobs.experiments.bias_gap"
    cfg = tyro.cli(BiasGapConfig, args=argv, prog=prog, description=__doc__)
    torch.set_num_threads(cfg.threads)
    ranker, _ = load_ranker_ref(cfg.model)
    mae = load_mae(cfg.mae)
    test = load_scene_set(cfg.test, ranker.cfg.img_size, ranker.cfg.patch_size)
    if test.objects is None:
        raise SystemExit(f"--test {cfg.test}: no object masks in the manifest")
    images, p = test.inputs(), ranker.cfg.patch_size
    scorers = {
        "ltrp": RankerScorer(ranker, cfg.rounds), "mae_attention": mae.cls_attention,
        "center": CenterScorer(p), "variance": VarianceScorer(p), "gradient": GradientEnergyScorer(p),
        "random": RandomScorer(p, cfg.seed),
    }  # fmt: skip
    scores = {name: score_all(scorer, images) for name, scorer in scorers.items()}
    if cfg.scores:
        table = pa.concat_tables(
            [read_scores(u, columns=["image_id", "view", "visible", "scores"]) for u in cfg.scores]
        )
        scores["oracle"] = torch.as_tensor(fidelity.oracle(table, ranker.cfg.num_patches, test.image_ids))
    if cfg.train:
        scores["supervised"] = score_all(_supervised(cfg, mae), images)
    objects = object_rows(test.objects, test.backgrounds, ranker.cfg.img_size // p, p)
    draws = scene_draws(objects, cfg.resamples, cfg.seed)
    gaps = {}
    for name, s in scores.items():
        gaps[name] = selector_gaps(
            recalls(test.objects, keep_top(s, cfg.keep_ratio).numpy(), objects), objects, draws
        )
        raw, adjusted = gaps[name]["raw"].mean, gaps[name]["adjusted"].mean
        print(f"[bias_gap] {name}: raw {raw:+.3f}, with geometry held fixed {adjusted:+.3f}", flush=True)
    result = {
        "args": asdict(cfg), "scenes": len(images), "objects": len(objects.scene),
        "geometry": describe(objects),
        "selectors": {name: {k: g.summary() for k, g in row.items()} for name, row in gaps.items()},
        "ltrp_minus": {
            other: {k: (gaps["ltrp"][k] - gaps[other][k]).summary() for k in gaps["ltrp"]}
            for other in ("oracle", "supervised", "mae_attention") if other in gaps
        },
    }  # fmt: skip
    from jobs.experiments.figures import write_result

    write_result(result, cfg.output, "bias_gap", plot)
    print(table_text(result))
    return result


def object_rows(images: list[ImageObjects], kinds: list[str], grid: int, patch_size: int) -> Objects:
    """One row per seen- or unseen-class object of `images` (grid x grid patches of patch_size px)."""
    centre = (grid - 1) / 2
    ys, xs = np.divmod(np.arange(grid * grid), grid)
    scene, index, seen, geometry, kind = [], [], [], [], []
    for i, (objects, background) in enumerate(zip(images, kinds, strict=True)):
        for j, (name, pixels) in enumerate(zip(objects.classes, objects.pixels, strict=True)):
            total = pixels.sum()
            if name not in (*SEEN_CLASSES, *UNSEEN_CLASSES) or total == 0:  # neither group, or covered
                continue
            fill = total / ((pixels > 0).sum() * patch_size**2)  # 1: it fills every patch it touches
            cy, cx = (pixels @ ys) / total, (pixels @ xs) / total
            scene.append(i)
            index.append(j)
            seen.append(name in SEEN_CLASSES)
            geometry.append((np.log(total), fill, np.hypot(cy - centre, cx - centre)))
            kind.append(background)
    return Objects(
        np.asarray(scene),
        np.asarray(index),
        np.asarray(seen),
        np.asarray(geometry, dtype=np.float64),
        np.asarray(kind),
    )


def recalls(images: list[ImageObjects], keeps: np.ndarray, objects: Objects) -> np.ndarray:
    """(M,) the recall of each row of `objects` under the keep sets `keeps` (N, k)."""
    per_scene = [object_recalls(o, keep) for o, keep in zip(images, keeps, strict=True)]
    return np.asarray([per_scene[i][j] for i, j in zip(objects.scene, objects.index, strict=True)])


def design(objects: Objects, rows: np.ndarray, adjusted: bool) -> np.ndarray:
    """(M, D) the regressors of `rows`: intercept and seen, then (adjusted) geometry and kind dummies."""
    columns = [np.ones(len(rows)), objects.seen[rows].astype(np.float64)]
    if adjusted:
        geometry = objects.geometry[rows]
        columns += list((geometry - geometry.mean(axis=0)).T)
        columns += [(objects.kind[rows] == k).astype(np.float64) for k in np.unique(objects.kind)[1:]]
    return np.stack(columns, axis=1)


def seen_coefficient(recall: np.ndarray, objects: Objects, rows: np.ndarray, adjusted: bool) -> float:
    """The least-squares coefficient of the seen indicator: seen minus unseen recall, per object."""
    coefficients, *_ = np.linalg.lstsq(design(objects, rows, adjusted), recall[rows], rcond=None)
    return float(coefficients[1])


def scene_draws(objects: Objects, resamples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap resamples of the object rows: scenes drawn with replacement, each with all its objects."""
    rng = np.random.default_rng(seed)
    scenes = np.unique(objects.scene)
    members = {s: np.flatnonzero(objects.scene == s) for s in scenes}
    return [np.concatenate([members[s] for s in rng.choice(scenes, len(scenes))]) for _ in range(resamples)]


@dataclass(frozen=True)
class Gap:
    """A gap on every object and on each bootstrap draw (shared by all selectors: differences are paired)."""

    mean: float
    draws: np.ndarray  # (resamples,)

    def __sub__(self, other: Gap) -> Gap:
        return Gap(self.mean - other.mean, self.draws - other.draws)

    def summary(self) -> dict[str, float]:
        lo, hi = np.percentile(self.draws, [2.5, 97.5])
        return {"mean": self.mean, "lo": float(lo), "hi": float(hi)}


def selector_gaps(recall: np.ndarray, objects: Objects, draws: list[np.ndarray]) -> dict[str, Gap]:
    """The raw and the geometry-adjusted gap of one selector's per-object `recall`."""
    everything = np.arange(len(recall))
    return {
        label: Gap(
            seen_coefficient(recall, objects, everything, adjusted),
            np.array([seen_coefficient(recall, objects, d, adjusted) for d in draws]),
        )
        for label, adjusted in (("raw", False), ("adjusted", True))
    }


def _supervised(cfg: BiasGapConfig, mae: MAE) -> Scorer:
    """The evaluation's supervised selector: the MAE encoder fine-tuned on the seen classes' labels."""
    train = load_scene_set(cfg.train, mae.cfg.img_size, mae.cfg.patch_size, limit=cfg.max_train)
    seen = [train.classes.index(c) for c in SEEN_CLASSES]
    settings = SceneEvalSettings(
        supervised=ProbeSettings(epochs=cfg.supervised_epochs, patience=3), seed=cfg.seed
    )
    model, _ = supervised_selector(mae, train, seen, settings)
    return model.cls_attention


def describe(objects: Objects) -> dict[str, dict[str, float]]:
    """Each geometry feature's mean over the seen and the unseen objects."""
    return {
        feature: {
            "seen": float(objects.geometry[objects.seen, i].mean()),
            "unseen": float(objects.geometry[~objects.seen, i].mean()),
        }
        for i, feature in enumerate(FEATURES)
    }


def table_text(result: dict) -> str:
    lines = [
        f"Bias gap at {result['args']['keep_ratio']:.0%} keep on {result['scenes']} held-out scenes "
        f"({result['objects']} objects): seen minus unseen recall per object [95% CI, scenes resampled]",
        "| selector | raw gap | gap with geometry held fixed |",
        "|---|---|---|",
    ]
    for name, row in result["selectors"].items():
        lines.append(f"| {name} | {_estimate(row['raw'])} | {_estimate(row['adjusted'])} |")
    for other, row in result["ltrp_minus"].items():
        lines.append(
            f"| ltrp minus {other} (paired) | {_estimate(row['raw'])} | {_estimate(row['adjusted'])} |"
        )
    lines += ["", "| geometry | seen objects | unseen objects |", "|---|---|---|"]
    for feature, means in result["geometry"].items():
        lines.append(f"| {feature} | {means['seen']:.3f} | {means['unseen']:.3f} |")
    return "\n".join(lines)


def _estimate(e: dict) -> str:
    return f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"


def plot(result: dict, path: Path) -> None:
    """Each selector's raw and adjusted gap with its interval."""
    from jobs.experiments.figures import plt, save

    names = list(result["selectors"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for offset, (label, colour) in zip(
        (-0.15, 0.15), (("raw", "tab:grey"), ("adjusted", "tab:blue")), strict=True
    ):
        rows = [result["selectors"][n][label] for n in names]
        error = [[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]]
        x = np.arange(len(names)) + offset
        ax.errorbar(x, [r["mean"] for r in rows], yerr=error, fmt="o", color=colour, capsize=3,
                    label="raw" if label == "raw" else "geometry held fixed")  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set(
        ylabel="seen minus unseen recall (0: no class preference)",
        title=f"{result['scenes']} held-out scenes",
    )
    save(fig, (ax,), path)


if __name__ == "__main__":
    main()
