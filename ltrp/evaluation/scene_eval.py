"""Does the ranker keep the objects, without category bias? The evaluation on scenes with object masks.

Primary measures, fixed before any result was seen (docs/evaluation.md), on held-out scenes at keep 10,
25 and 50%; the primary results are object recall and the bias gap at 25%:
- object recall: the fraction of each object's pixels inside kept patches (higher is better);
- bias gap: recall on seen classes minus recall on unseen classes, as a difference in differences
  against random (whose gap is ~0 by construction), paired per scene (closer to 0 is better; positive:
  the selector favours the seen classes); every scene of the bias test set holds both groups;
- background share: the fraction of kept patches with no object pixel (lower is better).
Secondary: multi-label mAP of a probe fine-tuned from the MAE's encoder on each selector's kept tokens
(several seeds; intervals over seeds and scenes); agreement with the full-coverage oracle over all L
positions (Kendall tau, NDCG@k); reconstruction error (a diagnostic only: the MAE was trained on
uniform random visible sets, so random keep sets are in its training distribution and ranked ones not).

Pure torch, numpy and scipy; `ltrp.pipeline.evaluate_job` loads the models and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ltrp.core.baselines import (
    CenterScorer,
    FolkRComScorer,
    GradientEnergyScorer,
    RandomScorer,
    RankerScorer,
    StratifiedRandomScorer,
    VarianceScorer,
)
from ltrp.core.mae import MAE
from ltrp.core.probe import KeepSets, ProbeSettings, fit_probe, mean_average_precision, predict_probe
from ltrp.core.ranker import Ranker, keep_top
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k
from ltrp.data.datasets import FASHION_MNIST_CLASSES
from ltrp.data.images import center_crop, to_model_input
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, unpack_mask
from ltrp.data.sources import read_many
from ltrp.evaluation.measures import Estimate, metric_key
from ltrp.evaluation.objects import ImageObjects, ObjectMeasures, difference_in_differences, measure
from ltrp.evaluation.protocol import interval, reconstruction_error, score_all

Scorer = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) -> (B, L), higher = keep
PRIMARY_RATIO = 0.25


@dataclass
class SceneEvalSettings:
    keep_ratios: tuple[float, ...] = (0.10, 0.25, 0.50)
    seen: tuple[str, ...] = SEEN_CLASSES
    unseen: tuple[str, ...] = UNSEEN_CLASSES
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    probe_seeds: int = 3
    supervised: ProbeSettings = field(default_factory=lambda: ProbeSettings(epochs=20, patience=3))
    resamples: int = 1000
    examples: int = 6
    seed: int = 0


@dataclass
class SceneSet:
    """Scenes at the models' size: pixels (N, S, S, 3) uint8, multi-hot labels (N, C) over `classes`,
    and, where the manifest has them, each scene's objects (masks per patch) and background kind."""

    pixels: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    classes: tuple[str, ...]
    objects: list[ImageObjects] | None
    backgrounds: list[str]
    masks: list[list[np.ndarray]] | None = None  # per scene, its objects' (H, W) masks (for figures)

    def inputs(self) -> torch.Tensor:
        return to_model_input(self.pixels)

    def subset(self, index: Sequence[int]) -> SceneSet:
        index = list(index)
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return SceneSet(
            self.pixels[index], self.labels[index], pick(self.image_ids), self.classes, pick(self.objects),
            pick(self.backgrounds), pick(self.masks),
        )  # fmt: skip


def load_scene_set(manifest: str, size: int, patch_size: int, limit: int | None = None) -> SceneSet:
    """A scene manifest (docs/scenes.md) at `size` px: the first `limit` rows. Object masks are read
    when the manifest has an `objects` column (and must then match the image size)."""
    table = pq.read_table(manifest)
    if limit is not None:
        table = table.slice(0, limit)
    base = str(Path(manifest).parent)
    uris = [u if "://" in u or u.startswith("/") else f"{base}/{u}" for u in table.column("uri").to_pylist()]
    pixels = np.stack([center_crop(data, size) for data in read_many(uris)])
    classes = FASHION_MNIST_CLASSES
    names = table.column("labels").to_pylist() if "labels" in table.column_names else None
    if names is None:
        names = [label.split("+") for label in table.column("label").to_pylist()]
    labels = np.array([[c in row for c in classes] for row in names], dtype=np.float32)
    objects = masks = None
    if "objects" in table.column_names:
        masks, objects = [], []
        for height, width, row in zip(
            *(table.column(c).to_pylist() for c in ("height", "width", "objects")), strict=True
        ):
            if (height, width) != (size, size):
                raise ValueError(
                    f"{manifest}: object masks are {height}x{width}, the models see {size}x{size}"
                )
            scene = [(o["label"], unpack_mask(o["mask"], height, width)) for o in row]
            masks.append([m for _, m in scene])
            objects.append(ImageObjects.from_masks(scene, patch_size))
    backgrounds = (
        table.column("background").to_pylist() if "background" in table.column_names else ["?"] * len(uris)
    )
    return SceneSet(
        pixels, labels, table.column("image_id").to_pylist(), classes, objects, backgrounds, masks
    )


@dataclass
class SceneEvaluation:
    selectors: list[str]
    estimates: dict[str, dict[str, Estimate]]  # selector -> metric key -> mean [95% interval]
    paired: dict[str, dict[str, Estimate]]  # selector -> metric key -> ltrp minus selector, per scene
    bias_did: dict[str, dict[float, Estimate]]  # selector -> keep ratio -> its gap minus random's
    class_recall: dict[str, dict[str, Estimate]]  # selector -> class -> recall at the primary ratio
    background_recall: dict[str, dict[str, Estimate]]  # selector -> background kind -> recall (primary)
    probe_map: dict[str, list[float]]  # selector -> the probe's test mAP per seed (primary ratio)
    supervised_val_map: list[float]  # the supervised selector's validation mAP after each epoch
    keep_ratios: tuple[float, ...]
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    test_images: int
    train_images: int
    dataset: str  # digest of the scenes, oracle, MAE and settings: equal digests, comparable figures
    examples: np.ndarray  # (G, S, S, 3) scenes for the figure
    example_masks: list[list[np.ndarray]]
    example_keep: dict[str, np.ndarray]  # selector -> (G, k) kept at the primary ratio
    patch_size: int


def evaluate_scenes(
    ranker: Ranker,
    mae: MAE,
    train: SceneSet,
    test: SceneSet,
    oracle: np.ndarray | None,
    settings: SceneEvalSettings,
    progress: Callable[[str], None] = print,
) -> SceneEvaluation:
    """Every selector on the held-out scenes `test` (with masks; each holds a seen and an unseen object).

    Args:
        ranker: the LTRP ranker under test (the MAE's image size and grid).
        mae: the MAE that scored its training data; the probes start from its encoder.
        train: labelled training scenes: the probe and the supervised selector learn on them.
        test: the bias test scenes, with object masks.
        oracle: (N_test, L) the full-coverage oracle's position scores of `test`, or None.
        settings: keep ratios, class groups, probe settings, seeds.
    """
    if test.objects is None:
        raise ValueError("the scene evaluation needs object masks in the test manifest")
    p, seed = mae.cfg.patch_size, settings.seed
    x_train, x_test = train.inputs(), test.inputs()
    seen_idx = [train.classes.index(c) for c in settings.seen]

    progress(f"supervised selector: fine-tuning the MAE encoder on the {len(seen_idx)} seen classes")
    supervised, val_history = _supervised_selector(mae, train, seen_idx, settings)
    scorers: dict[str, Scorer] = {
        "ltrp": RankerScorer(ranker),
        "random": RandomScorer(p, seed),
        "stratified_random": StratifiedRandomScorer(p, seed),
        "center": CenterScorer(p),
        "variance": VarianceScorer(p),
        "gradient": GradientEnergyScorer(p),
        "folk_rcom": FolkRComScorer(p),
        "mae_attention": mae.cls_attention,
        "supervised": supervised.cls_attention,
    }
    test_scores = {name: score_all(s, x_test) for name, s in scorers.items()}
    if oracle is not None:
        test_scores["oracle"] = torch.as_tensor(oracle, dtype=torch.float32)
    names = list(test_scores)
    figure_ratio = primary_ratio(settings.keep_ratios)
    estimates_probe: dict[str, dict[str, Estimate]] = {}

    per_image: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    objects: dict[str, dict[float, ObjectMeasures]] = {n: {} for n in names}
    for name in names:
        progress(f"measuring {name}")
        for r in settings.keep_ratios:
            keep = keep_top(test_scores[name], r)
            m = measure(test.objects, keep.numpy(), settings.seen, settings.unseen)
            objects[name][r] = m
            per_image[name][metric_key("object_recall", r)] = m.recall
            per_image[name][metric_key("background_share", r)] = m.background_share
            per_image[name][metric_key("recall_seen", r)] = m.seen_recall
            per_image[name][metric_key("recall_unseen", r)] = m.unseen_recall
            per_image[name][metric_key("bias_gap", r)] = m.bias_gap
            per_image[name][metric_key("reconstruction_error", r)] = reconstruction_error(
                mae, x_test, keep
            ).numpy()
            if oracle is not None and name != "oracle":
                k = max(1, round(r * oracle.shape[1]))
                gains = torch.as_tensor(oracle, dtype=torch.float32)
                per_image[name][metric_key("oracle_ndcg", r)] = ndcg_at_k(test_scores[name], gains, k).numpy()
        if oracle is not None and name != "oracle":
            per_image[name]["oracle_tau"] = kendall_tau(
                test_scores[name].double(), torch.as_tensor(oracle, dtype=torch.float64)
            ).numpy()

    progress(f"probes: from the MAE encoder, on each selector's kept tokens, {settings.probe_seeds} seeds")
    probe_map: dict[str, list[float]] = {}
    for n in names:
        if n == "oracle":  # the oracle has no scores for the training scenes
            continue
        predictions = _probe_predictions(n, scorers[n], mae, train, x_train, x_test, test_scores[n], settings)
        probe_map[n] = [mean_average_precision(pred, test.labels) for pred in predictions]
        per_seed_key = metric_key("probe_map", figure_ratio)
        estimates_probe[n] = {per_seed_key: _map_interval(predictions, test.labels, settings)}

    progress("bootstrap intervals")
    estimates = {
        n: {k: interval(v[~np.isnan(v)], settings.resamples, seed) for k, v in per_image[n].items()}
        | estimates_probe.get(n, {})
        for n in names
    }
    paired = {
        n: {
            k: interval(_paired(per_image["ltrp"][k], v), settings.resamples, seed)
            for k, v in per_image[n].items()
            if k in per_image["ltrp"]
        }
        for n in names
        if n != "ltrp"
    }
    bias_did = {
        n: {
            r: interval(
                difference_in_differences(objects[n][r], objects["random"][r]), settings.resamples, seed
            )
            for r in settings.keep_ratios
        }
        for n in names
    }
    primary = {n: objects[n][figure_ratio] for n in names}
    class_recall = {
        n: {
            c: interval(np.asarray(v), settings.resamples, seed)
            for c, v in sorted(primary[n].class_recalls.items())
        }
        for n in names
    }
    kinds = np.asarray(test.backgrounds)
    background_recall = {
        n: {
            str(b): interval(primary[n].recall[kinds == b], settings.resamples, seed)
            for b in sorted(set(kinds))
        }
        for n in names
    }
    shown = list(range(min(settings.examples, len(test.pixels))))
    return SceneEvaluation(
        selectors=names,
        estimates=estimates,
        paired=paired,
        bias_did=bias_did,
        class_recall=class_recall,
        background_recall=background_recall,
        probe_map=probe_map,
        supervised_val_map=val_history,
        keep_ratios=tuple(settings.keep_ratios),
        seen=tuple(settings.seen),
        unseen=tuple(settings.unseen),
        test_images=len(test.pixels),
        train_images=len(train.pixels),
        dataset=_digest(train, test, oracle, mae, settings),
        examples=test.pixels[shown],
        example_masks=[test.masks[i] for i in shown] if test.masks else [[] for _ in shown],
        example_keep={n: keep_top(test_scores[n][shown], figure_ratio).numpy() for n in names},
        patch_size=p,
    )


def primary_ratio(keep_ratios: Sequence[float]) -> float:
    """The keep ratio of the primary results: 25% when evaluated, else the first one."""
    return PRIMARY_RATIO if PRIMARY_RATIO in keep_ratios else keep_ratios[0]


def _paired(ltrp_values: np.ndarray, other: np.ndarray) -> np.ndarray:
    diff = ltrp_values - other
    return diff[~np.isnan(diff)]


def _supervised_selector(
    mae: MAE, train: SceneSet, seen: list[int], settings: SceneEvalSettings
) -> tuple[torch.nn.Module, list[float]]:
    """Fine-tuned from the MAE encoder with the seen classes' labels (every patch visible), until the
    validation mAP (a tenth of the training scenes) stops improving."""
    n_val = max(1, len(train.pixels) // 10)
    x, y = train.inputs(), torch.as_tensor(train.labels[:, seen])
    val = (x[:n_val], y[:n_val], None)
    return fit_probe(mae, x[n_val:], y[n_val:], None, settings.supervised, settings.seed, val=val)


def _probe_predictions(
    name: str,
    scorer: Scorer,
    mae: MAE,
    train: SceneSet,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    test_scores: torch.Tensor,
    settings: SceneEvalSettings,
) -> list[np.ndarray]:
    """The probe's (N_test, C) test scores per seed, trained and tested on the selector's kept tokens
    at the primary ratio. Random draws a fresh keep set every training step (as the authors' random
    baseline does); the others keep their fixed set per training scene."""
    ratio = primary_ratio(settings.keep_ratios)
    test_keep = keep_top(test_scores, ratio)
    k, num_patches = test_keep.shape[1], test_scores.shape[1]
    fixed = None if name == "random" else keep_top(score_all(scorer, x_train), ratio)
    predictions = []
    for s in range(settings.probe_seeds):
        g = torch.Generator().manual_seed(settings.seed * 1000 + s)

        def fresh(idx: torch.Tensor, g: torch.Generator = g) -> torch.Tensor:
            return torch.rand(len(idx), num_patches, generator=g).topk(k, dim=1).indices.sort(dim=1).values

        keep: KeepSets = fresh if fixed is None else fixed
        probe, _ = fit_probe(
            mae, x_train, torch.as_tensor(train.labels), keep, settings.probe, settings.seed + s
        )
        predictions.append(predict_probe(probe, x_test, test_keep).numpy())
    return predictions


def _map_interval(predictions: list[np.ndarray], labels: np.ndarray, settings: SceneEvalSettings) -> Estimate:
    """Mean over seeds of the test mAP, and its 95% interval over seeds and scenes: each resample draws
    scenes with replacement and a seed per draw of the seed list."""
    rng = np.random.default_rng(settings.seed)
    mean = float(np.mean([mean_average_precision(p, labels) for p in predictions]))
    draws = []
    for _ in range(max(100, settings.resamples // 5)):  # each draw costs C sorts per seed
        idx = rng.integers(len(labels), size=len(labels))
        seeds = rng.integers(len(predictions), size=len(predictions))
        draws.append(np.mean([mean_average_precision(predictions[s][idx], labels[idx]) for s in seeds]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Estimate(mean, float(lo), float(hi))


def _digest(
    train: SceneSet, test: SceneSet, oracle: np.ndarray | None, mae: MAE, settings: SceneEvalSettings
) -> str:
    spec = {
        "train": hashlib.sha256(train.pixels.tobytes()).hexdigest(),
        "test": hashlib.sha256(test.pixels.tobytes()).hexdigest(),
        "oracle": None
        if oracle is None
        else hashlib.sha256(np.asarray(oracle, np.float64).tobytes()).hexdigest(),
        "mae_sha256": getattr(getattr(mae, "checkpoint", None), "sha256", None),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
