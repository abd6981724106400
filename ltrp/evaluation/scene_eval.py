"""Does the ranker keep the objects, without category bias? The evaluation on scenes with object masks.

Primary measures, fixed before any result was seen (docs/evaluation.md), on held-out scenes at keep 10,
25 and 50%; the primary results are object recall and the bias gap at 25%:
- object recall: the fraction of each object's pixels inside kept patches (higher is better);
- bias gap: recall on seen classes minus recall on unseen classes, as a difference in differences
  against random (whose gap is ~0 by construction), paired per scene (closer to 0 is better; positive:
  the selector favours the seen classes); every scene of the bias test set holds both groups;
- background share: the fraction of kept patches with no object pixel (lower is better).
Beside them, at the primary ratio: the ranker minus each edge baseline per background kind, paired
per scene (edges mislead on some kinds and single out the objects on black); the ranker's share of the
oracle's gain over random; the oracle's split-half reliability; and, for rankers of the same recipe
trained with other seeds, their object recall and its spread over seeds.
Secondary: multi-label mAP of a probe fine-tuned from the MAE's encoder on each selector's kept tokens
(several seeds; intervals over seeds and scenes); agreement with the full-coverage oracle over all L
positions (Kendall tau, NDCG@k); reconstruction error (a diagnostic only: the MAE was trained on
uniform random visible sets, so random keep sets are in its training distribution and ranked ones not).

Pure torch, numpy and scipy; `ltrp.pipeline.evaluate_job` loads the models and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from ltrp.core.options import ROUNDS
from ltrp.core.probe import KeepSets, ProbeSettings, fit_probe, mean_average_precision, predict_probe
from ltrp.core.ranker import Ranker, keep_top
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k
from ltrp.data.datasets import FASHION_MNIST_CLASSES
from ltrp.data.images import center_crop, to_model_input
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, unpack_mask
from ltrp.data.sources import read_many
from ltrp.evaluation import fidelity
from ltrp.evaluation.measures import Estimate, metric_key
from ltrp.evaluation.objects import ImageObjects, ObjectMeasures, difference_in_differences, measure
from ltrp.evaluation.protocol import interval, reconstruction_error, score_all

Scorer = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) -> (B, L), higher = keep
PRIMARY_RATIO = 0.25
#: The row of the per-kind tables that holds every scene.
POOLED = "pooled"
#: Background kinds in report order: first those whose edges mislead an edge detector, black (where
#: edges single out the objects, so edge baselines win by construction) last as a floor.
KIND_ORDER = ("shapes", "clutter", "faint", "photo", "texture", "black")
#: Selectors the ranker is paired with per background kind, on object recall at the primary ratio.
KIND_COMPARED = ("variance", "gradient", "folk_rcom", "center", "random", "oracle")
#: The edge baselines of the goal: the seed-mean ranker is paired with them too.
EDGE_BASELINES = ("variance", "gradient", "folk_rcom")
#: The ranker averaged over its training seeds (the main one and `seed_rankers`), per scene.
SEED_MEAN = "ltrp_seed_mean"


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
    rounds: int = ROUNDS  # the ranker's set-inference rounds (0: one pass seeing every patch)


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


@dataclass(frozen=True)
class SplitHalf:
    """How well the oracle agrees with itself: oracles from the first and second half of its rounds."""

    tau: Estimate  # Kendall tau between the halves' oracles over all L positions, mean over scenes
    corrected: float  # Spearman-Brown prediction of tau.mean at all the rounds (indicative for a tau)
    rounds: int  # rounds of the full oracle: the halves hold rounds // 2 and the rest


@dataclass(frozen=True)
class SeedSpread:
    """The ranker's object recall at the primary ratio over its training seeds."""

    per_seed: dict[str, float]  # ranker (ltrp, ltrp_seed1, ...) -> its mean over scenes
    mean: Estimate  # per scene the seeds' average, then mean over scenes [95% interval over scenes]
    low: float  # the lowest seed's mean
    high: float  # the highest seed's mean
    std: float  # standard deviation of the seeds' means (ddof 1)


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
    # ranker (ltrp, and ltrp_seed_mean with seeds) -> kind (report order, then POOLED) -> selector ->
    # ranker minus selector on object recall at the primary ratio, paired per scene
    kind_paired: dict[str, dict[str, dict[str, Estimate]]] = field(default_factory=dict)
    kind_scenes: dict[str, int] = field(default_factory=dict)  # kind (report order) -> test scenes
    gain_share: dict[str, Estimate] = field(default_factory=dict)  # kind or POOLED -> (see gain_share)
    split_half: SplitHalf | None = None  # None: no oracle, or one of a single round
    seed_selectors: list[str] = field(default_factory=list)  # ltrp_seed1, ... (object recall only)
    seed_spread: SeedSpread | None = None  # None: no seed rankers


def evaluate_scenes(
    ranker: Ranker,
    mae: MAE,
    train: SceneSet,
    test: SceneSet,
    oracle: np.ndarray | None,
    settings: SceneEvalSettings,
    progress: Callable[[str], None] = print,
    seed_rankers: Sequence[Ranker] = (),
    split_half: SplitHalf | None = None,
) -> SceneEvaluation:
    """Every selector on the held-out scenes `test` (with masks; each holds a seen and an unseen object).

    Args:
        ranker: the LTRP ranker under test (the MAE's image size and grid).
        mae: the MAE that scored its training data; the probes start from its encoder.
        train: labelled training scenes: the probe and the supervised selector learn on them.
        test: the bias test scenes, with object masks.
        oracle: (N_test, L) the full-coverage oracle's position scores of `test`, or None.
        settings: keep ratios, class groups, probe settings, seeds.
        seed_rankers: rankers of the same recipe trained with other seeds, measured on object recall
            only (as ltrp_seed1, ...; probes for each would cost as much as the rest together).
        split_half: the oracle's split-half reliability (`split_half_reliability`), reported as given.
    """
    if test.objects is None:
        raise ValueError("the scene evaluation needs object masks in the test manifest")
    x_train, x_test = train.inputs(), test.inputs()
    scorers, val_history = _selectors(ranker, mae, train, settings, progress)
    test_scores = {name: score_all(s, x_test) for name, s in scorers.items()}
    if oracle is not None:
        test_scores["oracle"] = torch.as_tensor(oracle, dtype=torch.float32)
    names = list(test_scores)

    per_image: dict[str, dict[str, np.ndarray]] = {}
    objects: dict[str, dict[float, ObjectMeasures]] = {}
    for name, scores in test_scores.items():
        progress(f"measuring {name}")
        against = None if name == "oracle" else oracle  # the oracle's agreement with itself says nothing
        per_image[name], objects[name] = _measure_selector(scores, against, mae, x_test, test, settings)
    main_recall = {r: objects["ltrp"][r].recall for r in settings.keep_ratios}
    seed_recall = _seed_recalls(seed_rankers, main_recall, x_test, test, settings, progress)
    for name in [n for n in seed_recall if n != "ltrp"]:
        per_image[name] = {metric_key("object_recall", r): v for r, v in seed_recall[name].items()}

    progress(f"probes: from the MAE encoder, on each selector's kept tokens, {settings.probe_seeds} seeds")
    probe_map, probe_estimates = _probes(scorers, mae, train, test, x_train, x_test, test_scores, settings)

    progress("bootstrap intervals")
    ratio = primary_ratio(settings.keep_ratios)
    primary = {n: objects[n][ratio] for n in names}
    recall = {n: primary[n].recall for n in names} | {n: v[ratio] for n, v in seed_recall.items()}
    kinds = np.asarray(test.backgrounds)
    seeds = {n: v[ratio] for n, v in seed_recall.items() if n != SEED_MEAN}
    shown = list(range(min(settings.examples, len(test.pixels))))
    return SceneEvaluation(
        selectors=names,
        estimates=_estimates(per_image, probe_estimates, settings),
        paired=_paired_with_ranker(per_image, names, settings),
        bias_did=_bias_did(objects, settings),
        class_recall=_class_recall(primary, settings),
        background_recall=_background_recall(recall, kinds, settings),
        kind_paired=_kind_paired(recall, kinds, settings),
        gain_share=_gain_shares(recall, kinds, settings),
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
        example_keep={n: keep_top(test_scores[n][shown], ratio).numpy() for n in names},
        patch_size=mae.cfg.patch_size,
        kind_scenes={k: int(np.sum(kinds == k)) for k in kind_order(kinds)},
        split_half=split_half,
        seed_selectors=[n for n in seed_recall if n not in ("ltrp", SEED_MEAN)],
        seed_spread=seed_spread(seeds, settings.resamples, settings.seed) if seeds else None,
    )


def primary_ratio(keep_ratios: Sequence[float]) -> float:
    """The keep ratio of the primary results: 25% when evaluated, else the first one."""
    return PRIMARY_RATIO if PRIMARY_RATIO in keep_ratios else keep_ratios[0]


def _selectors(
    ranker: Ranker, mae: MAE, train: SceneSet, settings: SceneEvalSettings, progress: Callable[[str], None]
) -> tuple[dict[str, Scorer], list[float]]:
    """Every selector but the oracle, by name in report order, and the supervised selector's validation
    mAP after each epoch (it is fine-tuned here, from the MAE's encoder on the seen classes' labels)."""
    p, seed = mae.cfg.patch_size, settings.seed
    seen = [train.classes.index(c) for c in settings.seen]
    progress(f"supervised selector: fine-tuning the MAE encoder on the {len(seen)} seen classes")
    supervised, val_history = supervised_selector(mae, train, seen, settings)
    scorers: dict[str, Scorer] = {
        "ltrp": RankerScorer(ranker, settings.rounds),
        "random": RandomScorer(p, seed),
        "stratified_random": StratifiedRandomScorer(p, seed),
        "center": CenterScorer(p),
        "variance": VarianceScorer(p),
        "gradient": GradientEnergyScorer(p),
        "folk_rcom": FolkRComScorer(p),
        "mae_attention": mae.cls_attention,
        "supervised": supervised.cls_attention,
    }
    return scorers, val_history


def _measure_selector(
    scores: torch.Tensor,
    oracle: np.ndarray | None,
    mae: MAE,
    x_test: torch.Tensor,
    test: SceneSet,
    settings: SceneEvalSettings,
) -> tuple[dict[str, np.ndarray], dict[float, ObjectMeasures]]:
    """One selector's measures on every test scene, at every keep ratio.

    Args:
        scores: (N, L) the selector's position scores of the test scenes.
        oracle: (N, L) the oracle's scores to measure agreement with, or None (no agreement figures).
        mae: the MAE whose reconstruction error from the kept patches is measured.
        x_test: (N, 3, S, S) the test scenes as model inputs.
        test: the test scenes, with their objects.
        settings: the keep ratios and the class groups.

    Returns:
        (values, objects): metric key -> (N,) per-scene values, and keep ratio -> the object measures.
    """
    values: dict[str, np.ndarray] = {}
    objects: dict[float, ObjectMeasures] = {}
    for r in settings.keep_ratios:
        keep = keep_top(scores, r)
        m = objects[r] = measure(test.objects, keep.numpy(), settings.seen, settings.unseen)
        values[metric_key("object_recall", r)] = m.recall
        values[metric_key("background_share", r)] = m.background_share
        values[metric_key("recall_seen", r)] = m.seen_recall
        values[metric_key("recall_unseen", r)] = m.unseen_recall
        values[metric_key("bias_gap", r)] = m.bias_gap
        values[metric_key("reconstruction_error", r)] = reconstruction_error(mae, x_test, keep).numpy()
        if oracle is not None:
            k = max(1, round(r * oracle.shape[1]))
            gains = torch.as_tensor(oracle, dtype=torch.float32)
            values[metric_key("oracle_ndcg", r)] = ndcg_at_k(scores, gains, k).numpy()
    if oracle is not None:
        values["oracle_tau"] = kendall_tau(
            scores.double(), torch.as_tensor(oracle, dtype=torch.float64)
        ).numpy()
    return values, objects


def _seed_recalls(
    seed_rankers: Sequence[Ranker],
    main: dict[float, np.ndarray],
    x_test: torch.Tensor,
    test: SceneSet,
    settings: SceneEvalSettings,
    progress: Callable[[str], None],
) -> dict[str, dict[float, np.ndarray]]:
    """Per-scene object recall at every keep ratio of the ranker ("ltrp", `main`), each seed ranker
    (ltrp_seed1, ...) and the seed mean (SEED_MEAN, per scene); empty without seed rankers."""
    if not seed_rankers:
        return {}
    recalls = {"ltrp": main}
    for i, model in enumerate(seed_rankers, start=1):
        progress(f"measuring ltrp_seed{i}")
        scores = score_all(RankerScorer(model, settings.rounds), x_test)
        recalls[f"ltrp_seed{i}"] = {
            r: measure(test.objects, keep_top(scores, r).numpy(), settings.seen, settings.unseen).recall
            for r in settings.keep_ratios
        }
    mean = {r: seed_average([v[r] for v in recalls.values()]) for r in settings.keep_ratios}
    return recalls | {SEED_MEAN: mean}


def _probes(
    scorers: Mapping[str, Scorer],
    mae: MAE,
    train: SceneSet,
    test: SceneSet,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    test_scores: Mapping[str, torch.Tensor],
    settings: SceneEvalSettings,
) -> tuple[dict[str, list[float]], dict[str, dict[str, Estimate]]]:
    """The probe of every selector but the oracle (it has no scores for the training scenes).

    Returns:
        (probe_map, estimates): selector -> the probe's test mAP per seed, and selector -> {the
        primary ratio's probe_map key: mean over seeds [95% interval over seeds and scenes]}.
    """
    key = metric_key("probe_map", primary_ratio(settings.keep_ratios))
    probe_map: dict[str, list[float]] = {}
    estimates: dict[str, dict[str, Estimate]] = {}
    for name, scorer in scorers.items():
        predictions = _probe_predictions(
            name, scorer, mae, train, x_train, x_test, test_scores[name], settings
        )
        probe_map[name] = [mean_average_precision(pred, test.labels) for pred in predictions]
        estimates[name] = {key: _map_interval(predictions, test.labels, settings)}
    return probe_map, estimates


def _estimates(
    per_image: Mapping[str, Mapping[str, np.ndarray]],
    probe: Mapping[str, dict[str, Estimate]],
    settings: SceneEvalSettings,
) -> dict[str, dict[str, Estimate]]:
    """Selector -> metric key -> mean over scenes [95% interval]: of each (N,) per-scene measure in
    `per_image` (NaN scenes left out: a measure a scene has no figure for), then the probe's `probe`."""
    return {
        n: {k: interval(v[~np.isnan(v)], settings.resamples, settings.seed) for k, v in values.items()}
        | probe.get(n, {})
        for n, values in per_image.items()
    }


def _paired_with_ranker(
    per_image: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str], settings: SceneEvalSettings
) -> dict[str, dict[str, Estimate]]:
    """Selector (of `names`, but the ranker) -> metric key -> the ranker minus the selector, paired per
    scene on the (N,) per-scene measures in `per_image`, for every key the ranker has too."""
    ours = per_image["ltrp"]
    return {
        n: {
            k: interval(_paired(ours[k], v), settings.resamples, settings.seed)
            for k, v in per_image[n].items()
            if k in ours
        }
        for n in names
        if n != "ltrp"
    }


def _paired(ltrp_values: np.ndarray, other: np.ndarray) -> np.ndarray:
    diff = ltrp_values - other
    return diff[~np.isnan(diff)]


def _bias_did(
    objects: Mapping[str, Mapping[float, ObjectMeasures]], settings: SceneEvalSettings
) -> dict[str, dict[float, Estimate]]:
    """Selector -> keep ratio -> its bias gap minus random's, a difference in differences per scene."""
    return {
        n: {
            r: interval(
                difference_in_differences(per_ratio[r], objects["random"][r]),
                settings.resamples,
                settings.seed,
            )
            for r in settings.keep_ratios
        }
        for n, per_ratio in objects.items()
    }


def _class_recall(
    primary: Mapping[str, ObjectMeasures], settings: SceneEvalSettings
) -> dict[str, dict[str, Estimate]]:
    """Selector -> class (alphabetical) -> its objects' recall, from the measures at the primary ratio."""
    return {
        n: {
            c: interval(np.asarray(v), settings.resamples, settings.seed)
            for c, v in sorted(m.class_recalls.items())
        }
        for n, m in primary.items()
    }


def _background_recall(
    recall: Mapping[str, np.ndarray], kinds: np.ndarray, settings: SceneEvalSettings
) -> dict[str, dict[str, Estimate]]:
    """Selector -> background kind (alphabetical) -> object recall over the kind's scenes, from each
    selector's (N,) per-scene `recall` and the scenes' (N,) `kinds`."""
    return {
        n: {str(b): interval(v[kinds == b], settings.resamples, settings.seed) for b in sorted(set(kinds))}
        for n, v in recall.items()
    }


def _kind_paired(
    recall: Mapping[str, np.ndarray], kinds: np.ndarray, settings: SceneEvalSettings
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """`paired_by_kind` of the ranker against `KIND_COMPARED`, and of the seed mean (where `recall` has
    it) against the edge baselines, from each selector's (N,) per-scene `recall` at the primary ratio."""
    rankers = {"ltrp": KIND_COMPARED} | ({SEED_MEAN: EDGE_BASELINES} if SEED_MEAN in recall else {})
    return {
        ours: paired_by_kind(
            recall[ours],
            {n: recall[n] for n in compared if n in recall},
            kinds,
            settings.resamples,
            settings.seed,
        )
        for ours, compared in rankers.items()
    }


def _gain_shares(
    recall: Mapping[str, np.ndarray], kinds: np.ndarray, settings: SceneEvalSettings
) -> dict[str, Estimate]:
    """`oracle_gain_share` of the ranker from each selector's (N,) per-scene `recall` at the primary
    ratio; empty without an oracle."""
    if "oracle" not in recall:
        return {}
    return oracle_gain_share(
        recall["ltrp"], recall["random"], recall["oracle"], kinds, settings.resamples, settings.seed
    )


def kind_order(kinds: Iterable[str]) -> list[str]:
    """The background kinds present, in report order: those of `KIND_ORDER` in its order, then any
    other alphabetically (a generator may add kinds this module does not know)."""
    present = set(kinds)
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def _kind_rows(kinds: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
    """Each background kind (in `kind_order`), then POOLED -> (N,) bool: the scenes it holds."""
    kinds = np.asarray(kinds)
    return {k: kinds == k for k in kind_order(kinds)} | {POOLED: np.ones(len(kinds), dtype=bool)}


def paired_by_kind(
    ours: np.ndarray, others: Mapping[str, np.ndarray], kinds: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, Estimate]]:
    """Per background kind and pooled, `ours` minus each of `others`, paired per scene.

    Args:
        ours: (N,) a per-scene measure of the ranker (NaN: not measured on that scene).
        others: selector -> (N,) the same measure on the same scenes.
        kinds: (N,) each scene's background kind.
        resamples: bootstrap resamples of each interval.
        seed: the bootstrap's seed.

    Returns:
        kind (in `kind_order`, then POOLED) -> selector -> mean difference [95% bootstrap interval].
    """
    return {
        kind: {n: interval(_paired(ours[rows], v[rows]), resamples, seed) for n, v in others.items()}
        for kind, rows in _kind_rows(kinds).items()
    }


def gain_share(
    ours: np.ndarray, random: np.ndarray, oracle: np.ndarray, resamples: int, seed: int
) -> Estimate:
    """The ranker's share of the oracle's gain over random, (ours - random) / (oracle - random) on the
    means over scenes, and its 95% percentile-bootstrap interval (scenes resampled, ratio of means: a
    ratio per scene would explode where the oracle barely beats random). Scenes with a NaN are left out.

    Args:
        ours, random, oracle: (N,) a per-scene measure of the ranker, random and the oracle.
    """
    values = np.stack([ours, random, oracle]).astype(np.float64)
    values = values[:, ~np.isnan(values).any(axis=0)]

    def share(means: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (means[0] - means[1]) / (means[2] - means[1])

    point = float(share(values.mean(axis=1)))
    n = values.shape[1]
    if n < 2:
        return Estimate(point, point, point)
    draws = share(values[:, np.random.default_rng(seed).integers(n, size=(resamples, n))].mean(axis=2))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return Estimate(point, float(lo), float(hi))


def oracle_gain_share(
    ours: np.ndarray, random: np.ndarray, oracle: np.ndarray, kinds: np.ndarray, resamples: int, seed: int
) -> dict[str, Estimate]:
    """`gain_share` per background kind (in `kind_order`) and POOLED over all scenes."""
    return {
        kind: gain_share(ours[rows], random[rows], oracle[rows], resamples, seed)
        for kind, rows in _kind_rows(kinds).items()
    }


def seed_average(recalls: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) per scene, the mean over the seeds' (N,) values: what the seed-mean ranker is paired on."""
    return np.mean(np.stack(recalls), axis=0)


def seed_spread(recalls: Mapping[str, np.ndarray], resamples: int, seed: int) -> SeedSpread:
    """Each seed's mean over scenes, their spread, and the seed-mean ranker's mean and interval.

    Args:
        recalls: ranker -> (N,) its per-scene object recall at the primary ratio, at least 2 rankers.
    """
    per_seed = {n: float(np.nanmean(v)) for n, v in recalls.items()}
    mean = seed_average(list(recalls.values()))
    values = np.array(list(per_seed.values()))
    return SeedSpread(
        per_seed=per_seed,
        mean=interval(mean[~np.isnan(mean)], resamples, seed),
        low=float(values.min()),
        high=float(values.max()),
        std=float(values.std(ddof=1)),
    )


def split_half_reliability(
    first: np.ndarray, second: np.ndarray, rounds: int, resamples: int, seed: int
) -> SplitHalf:
    """The oracle's split-half reliability from the (N, L) oracles of the two halves of its rounds
    (`fidelity.split_half_oracles`): their Kendall tau per scene over all positions, and its
    Spearman-Brown prediction at all the rounds."""
    tau = interval(fidelity.tau(first, second), resamples, seed)
    return SplitHalf(tau=tau, corrected=fidelity.spearman_brown(tau.mean), rounds=rounds)


def supervised_selector(
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
