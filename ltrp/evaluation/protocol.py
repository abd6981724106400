"""Does a ranker keep what matters better than the alternatives? Four measures, paired, with intervals.

Every scorer ranks the patches of the same held-out images; each measure gives one number per image
(and keep ratio), so scorers are compared on the same images, and every figure comes with a 95%
percentile-bootstrap interval over images (paired differences for the comparisons):

1. agreement with held-out pseudo-scores (the score table's visible patches): Kendall tau, Spearman,
   NDCG@k and top-k overlap, k = keep ratio x scored patches;
2. reconstruction: the MAE sees only a scorer's top patches; mean squared error on the dropped ones;
3. classification on kept tokens: a small ViT trained and tested on each scorer's kept patches only;
4. bias: that accuracy on the classes the supervised selector was trained on, and on the others.

Pure torch, numpy and scipy: the launcher (jobs/evaluate.py) loads the models and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import bootstrap
from scipy.stats import t as student_t

from ltrp.core.baselines import (
    CenterScorer,
    FolkRComScorer,
    GradientEnergyScorer,
    RandomScorer,
    RankerScorer,
    VarianceScorer,
)
from ltrp.core.classifier import ClassifierConfig, PatchClassifier, fit_classifier, predict
from ltrp.core.mae import MAE
from ltrp.core.options import ROUNDS
from ltrp.core.ranker import Ranker, keep_top
from ltrp.core.ranking_metrics import kendall_tau, ndcg_at_k, spearman, topk_overlap
from ltrp.data.images import ImageDecodeError, center_crop, center_view, displayed_size, to_model_input
from ltrp.data.sources import plan_corpus, read_shard
from ltrp.data.tables import read_scores
from ltrp.evaluation.measures import KEEP_RATIOS, Estimate, metric_key

Scorer = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) -> (B, L), higher = keep


@dataclass
class EvalSettings:
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    seen_classes: tuple[str, ...] | None = None  # the supervised selector's classes; None: first half
    max_train: int = 4000  # labelled images that train the classifiers (spread over the source by hash)
    max_test: int = 1000  # held-out images measured
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    resamples: int = 1000  # bootstrap resamples
    examples: int = 8  # images in the kept-patches figure, one per class first
    seed: int = 0
    rounds: int = ROUNDS  # the ranker's set-inference rounds (0: one pass seeing every patch)


@dataclass
class LabelledImages:
    """A labelled image set at one size: pixels (N, S, S, 3) uint8, labels (N,) class indices."""

    pixels: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    uris: list[str]
    boxes: list[tuple[float, ...]]  # each image's central-square crop box, in displayed pixels

    def inputs(self) -> torch.Tensor:
        """(N, 3, S, S) normalised model inputs."""
        return to_model_input(self.pixels)

    def subset(self, index: Sequence[int]) -> LabelledImages:
        index = list(index)
        return LabelledImages(
            self.pixels[index],
            self.labels[index],
            [self.image_ids[i] for i in index],
            [self.uris[i] for i in index],
            [self.boxes[i] for i in index],
        )


@dataclass
class EvaluationResult:
    scorers: list[str]
    estimates: dict[str, dict[str, Estimate]]  # scorer -> metric key -> mean and interval
    paired: dict[str, dict[str, Estimate]]  # baseline -> metric key -> ltrp minus baseline
    classes: list[str]
    seen_classes: list[str]
    test_images: int
    train_images: int
    dataset: str  # digest of the held-out set and settings: equal digests give comparable numbers
    keep_ratios: tuple[float, ...]
    examples: np.ndarray  # (G, S, S, 3) uint8, for the kept-patches figure
    example_keep: dict[str, np.ndarray]  # scorer -> (G, k) kept patches at the figure's keep ratio
    figure_ratio: float
    patch_size: int


def spread(ids: Sequence[str], limit: int) -> list[int]:
    """Indices of up to `limit` ids chosen by a hash of the id: an even spread over a sorted listing
    (whose first images are often all one class), the same on every run."""
    rank = sorted(range(len(ids)), key=lambda i: hashlib.shake_256(ids[i].encode()).digest(8))
    return sorted(rank[:limit])


def load_labelled(
    source: str, size: int, classes: list[str] | None = None, limit: int | None = None
) -> tuple[LabelledImages, list[str], list[tuple[str, str]]]:
    """A labelled source's central squares at `size`: (images, class names, [(uri, reason)] skipped).

    `classes` fixes the label order (from the training source); images of other labels are an error.
    """
    items = [img for shard in plan_corpus(source, 1 << 30).shards for img in read_shard(shard)]
    if any(img.label is None for img in items):
        raise ValueError(f"{source}: the evaluation needs labels (ImageFolder layout, tar cls or manifest)")
    chosen = [items[i] for i in spread([img.image_id for img in items], limit or len(items))]
    classes = classes or sorted({img.label for img in chosen})
    index = {c: i for i, c in enumerate(classes)}
    pixels, labels, ids, uris, boxes, skipped = [], [], [], [], [], []
    for img in chosen:
        if img.label not in index:
            raise ValueError(f"{img.uri}: label {img.label!r} is not one of the training classes {classes}")
        try:
            if img.error:
                raise ImageDecodeError(img.error)
            pixels.append(center_crop(img.data, size))
            boxes.append(center_view(*displayed_size(img.data)).box)
        except ImageDecodeError as err:
            skipped.append((img.uri, str(err)))
            continue
        labels.append(index[img.label])
        ids.append(img.image_id)
        uris.append(img.uri)
    data = LabelledImages(np.stack(pixels), np.asarray(labels, dtype=np.int64), ids, uris, boxes)
    return data, classes, skipped


def pseudo_scores(
    tables: Sequence[str], images: LabelledImages
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The score tables' rows for these images' central squares (unflipped; matched by uri).

    Returns:
        (covered, visible, scores): `covered` the indices of the images that have a row; visible (M, n)
        and scores (M, n) of those images, in that order.
    """
    rows = {}
    for uri in tables:
        t = read_scores(uri, columns=["uri", "crop_box", "flip", "visible", "scores"])
        for u, box, flip, vis, sc in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            rows.setdefault((u, tuple(box), flip), (vis, sc))
    covered, visible, scores = [], [], []
    for i, (uri, box) in enumerate(zip(images.uris, images.boxes, strict=True)):
        row = rows.get((uri, tuple(np.float32(box).tolist()), False))
        if row:
            covered.append(i)
            visible.append(row[0])
            scores.append(row[1])
    if not covered:
        raise ValueError(
            f"no held-out image has an unflipped central-square row in {', '.join(tables)}: score the "
            "test source with --crop center (same source path, so that the uris match)"
        )
    return np.asarray(covered), torch.tensor(visible), torch.tensor(scores)


def oracle_scores(visible: torch.Tensor, scores: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The pseudo-scores as a full ranking: scored patches first, in their order; then the rest.

    visible, scores: (N, n) -> (N, L). Unscored patches rank below every scored one (by a random draw
    of their own, so that keeping more than n patches keeps an unbiased sample of the rest).
    """
    g = torch.Generator().manual_seed(0)
    out = torch.rand(len(visible), num_patches, generator=g) - 2.0
    order = scores.argsort(dim=1).argsort(dim=1).float() / scores.shape[1]  # ranks in [0, 1)
    return out.scatter(1, visible.long(), order)


def baseline_scorers(patch_size: int, seed: int) -> dict[str, Scorer]:
    return {
        "random": RandomScorer(patch_size, seed),
        "center": CenterScorer(patch_size),
        "variance": VarianceScorer(patch_size),
        "gradient": GradientEnergyScorer(patch_size),
        "folk_rcom": FolkRComScorer(patch_size),
    }


def score_all(scorer: Scorer, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """images (N, 3, S, S) -> (N, L), in batches."""
    return torch.cat([scorer(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def agreement(
    scores: torch.Tensor, visible: torch.Tensor, pseudo: torch.Tensor, ratios: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Measure 1, per image: scores (N, L) at the scored positions visible (N, n) against pseudo (N, n)."""
    s = scores.gather(1, visible.long())
    out = {metric_key("kendall_tau"): kendall_tau(s, pseudo), metric_key("spearman"): spearman(s, pseudo)}
    for r in ratios:
        k = max(1, round(r * pseudo.shape[1]))
        out[metric_key("ndcg", r)] = ndcg_at_k(s, pseudo - pseudo.min(dim=1, keepdim=True).values, k)
        out[metric_key("topk_overlap", r)] = topk_overlap(s, pseudo, k)
    return out


@torch.inference_mode()
def reconstruction_error(
    mae: MAE, images: torch.Tensor, keep: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Measure 2, per image: images (N, 3, S, S), keep (N, k) -> (N,) mean squared error of the MAE's
    reconstruction from the kept patches alone, over the dropped patches, in the MAE's target space."""
    errors = []
    for i in range(0, len(images), batch_size):
        x, vis = images[i : i + batch_size], keep[i : i + batch_size]
        errors.append(mae.masked_error(x, mae(x, vis), vis))
    return torch.cat(errors)


def kept_accuracy(
    train: LabelledImages,
    train_keep: torch.Tensor,
    test: LabelledImages,
    test_keep: torch.Tensor,
    num_classes: int,
    cfg: ClassifierConfig,
    seed: int,
) -> torch.Tensor:
    """Measure 3, per test image: 1.0 where a classifier trained on the kept patches of the training
    images (train_keep (N, k)) classifies the test image from its kept patches (test_keep (M, k))."""
    model = fit_classifier(
        train.inputs(), torch.as_tensor(train.labels), num_classes, cfg, visible=train_keep, seed=seed
    )
    return (predict(model, test.inputs(), test_keep) == torch.as_tensor(test.labels)).float()


def supervised_selector(
    train: LabelledImages, seen: Sequence[int], num_classes: int, cfg: ClassifierConfig, seed: int
) -> Scorer:
    """A classifier trained with labels on the `seen` classes' images, every patch visible; its CLS
    attention is the score."""
    mask = np.isin(train.labels, seen)
    images, labels = train.inputs()[torch.as_tensor(mask)], torch.as_tensor(train.labels[mask])
    model: PatchClassifier = fit_classifier(images, labels, num_classes, cfg, seed=seed)
    return model.cls_attention


def interval(values: np.ndarray, resamples: int, seed: int) -> Estimate:
    """Mean of per-image values and its 95% percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return Estimate(float(values.mean()), float(values.mean()), float(values.mean()))
    ci = bootstrap(
        (values,),
        np.mean,
        n_resamples=resamples,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return Estimate(float(values.mean()), float(ci.low), float(ci.high))


def t_interval(values: list[float]) -> dict[str, float]:
    """Mean and its 95% Student-t interval over seeds (the mean alone for one seed)."""
    v = np.asarray(values, dtype=np.float64)
    half = float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "low": float(v.mean()) - half, "high": float(v.mean()) + half}


def format_interval(e: dict[str, float], sign: str = "") -> str:
    """A `t_interval` as "mean [low, high]", to 3 decimals; sign "+" signs them (a difference)."""
    return f"{e['mean']:{sign}.3f} [{e['low']:{sign}.3f}, {e['high']:{sign}.3f}]"


def dataset_digest(
    test: LabelledImages,
    mae: MAE,
    settings: EvalSettings,
    train: LabelledImages,
    visible: torch.Tensor,
    pseudo: torch.Tensor,
) -> str:
    """What makes two evaluations comparable: the held-out images, the MAE, the settings, the images
    that train the classifiers (accuracy depends on them) and the pseudo-scores (agreement does)."""
    table = hashlib.sha256(visible.long().numpy().tobytes() + pseudo.float().numpy().tobytes())
    spec = {
        "test": sorted(test.uris),
        "train": sorted(train.uris),
        "pseudo_scores": table.hexdigest(),
        "mae_sha256": getattr(getattr(mae, "checkpoint", None), "sha256", None),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate(
    ranker: Ranker,
    mae: MAE,
    train: LabelledImages,
    test: LabelledImages,
    visible: torch.Tensor,
    pseudo: torch.Tensor,
    classes: list[str],
    settings: EvalSettings,
    progress: Callable[[str], None] = print,
) -> EvaluationResult:
    """Runs the four measures for the ranker, the oracle and the baselines.

    Args:
        ranker: the LTRP ranker under test; its grid must match the MAE's.
        mae: the MAE whose pseudo-scores the ranker learned (reconstruction uses it too).
        train: labelled images that train the classifiers and the supervised selector.
        test: the held-out images, all covered by the score table.
        visible, pseudo: (N_test, n) the table's scored patches and pseudo-scores for `test`.
        classes: class names, index = label.
        settings: keep ratios, sizes, seeds.
        progress: called with a line per step.
    """
    _check_geometry(ranker, mae)
    cls_cfg = _classifier_geometry(settings.classifier, mae)
    ratios, seed, p = settings.keep_ratios, settings.seed, mae.cfg.patch_size
    seen_names = list(settings.seen_classes or classes[: len(classes) // 2])
    seen = [classes.index(c) for c in seen_names]
    x_train, x_test = train.inputs(), test.inputs()

    progress(f"supervised selector: training on {len(seen)} of {len(classes)} classes")
    scorers: dict[str, Scorer] = {
        "ltrp": RankerScorer(ranker, settings.rounds),
        **baseline_scorers(p, seed),
        "supervised": supervised_selector(train, seen, len(classes), cls_cfg, seed),
    }
    test_scores = {name: score_all(s, x_test) for name, s in scorers.items()}
    train_scores = {name: score_all(s, x_train) for name, s in scorers.items()}
    test_scores["oracle"] = oracle_scores(visible, pseudo, mae.cfg.num_patches)
    names = ["ltrp", "oracle", *[n for n in scorers if n != "ltrp"]]

    per_image: dict[str, dict[str, np.ndarray]] = {}
    seen_mask = np.isin(test.labels, seen)
    for name in names:
        progress(f"measuring {name}")
        values = agreement(test_scores[name], visible, pseudo, ratios)
        for r in ratios:
            keep = keep_top(test_scores[name], r)
            values[metric_key("reconstruction_error", r)] = reconstruction_error(mae, x_test, keep)
            if name in train_scores:  # the oracle has no pseudo-scores for the training images
                train_keep = keep_top(train_scores[name], r)
                correct = kept_accuracy(train, train_keep, test, keep, len(classes), cls_cfg, seed)
                values |= _accuracies(correct.numpy(), seen_mask, r)
        per_image[name] = {k: np.asarray(v) for k, v in values.items()}

    progress("bootstrap intervals")
    figure_ratio = 0.25 if 0.25 in ratios else ratios[0]
    shown = _examples(test.labels, settings.examples)
    return EvaluationResult(
        scorers=names,
        estimates=_estimates(per_image, settings),
        paired=_paired_with_ranker(per_image, settings),
        classes=classes,
        seen_classes=seen_names,
        test_images=len(test.pixels),
        train_images=len(train.pixels),
        dataset=dataset_digest(test, mae, settings, train, visible, pseudo),
        keep_ratios=tuple(ratios),
        examples=test.pixels[shown],
        example_keep={n: keep_top(test_scores[n][shown], figure_ratio).numpy() for n in names},
        figure_ratio=figure_ratio,
        patch_size=p,
    )


def _check_geometry(ranker: Ranker, mae: MAE) -> None:
    """Raises ValueError unless the ranker and the MAE share the image size and the patch grid."""
    if ranker.cfg.grid != mae.cfg.grid or ranker.cfg.img_size != mae.cfg.img_size:
        raise ValueError(
            f"ranker ({ranker.cfg.img_size} px, {ranker.cfg.grid}x{ranker.cfg.grid}) and MAE "
            f"({mae.cfg.img_size} px, {mae.cfg.grid}x{mae.cfg.grid}) must share the image size and grid"
        )


def _accuracies(correct: np.ndarray, seen: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
    """Measures 3 and 4 at `ratio` from correct (N,) (1.0 where a test image is classified right) and
    seen (N,) bool (its class is one the supervised selector was trained on): metric key -> the images'
    values, on every image, then on the seen and the unseen classes' images."""
    out = {metric_key("accuracy", ratio): correct}
    for measure, mask in (("accuracy_seen", seen), ("accuracy_unseen", ~seen)):
        if mask.any():  # a held-out set without unseen (or seen) classes has no such figure
            out[metric_key(measure, ratio)] = correct[mask]
    return out


def _estimates(
    per_image: Mapping[str, Mapping[str, np.ndarray]], settings: EvalSettings
) -> dict[str, dict[str, Estimate]]:
    """Scorer -> metric key -> mean over images [95% bootstrap interval] of its (N,) per-image values."""
    return {
        n: {k: interval(v, settings.resamples, settings.seed) for k, v in values.items()}
        for n, values in per_image.items()
    }


def _paired_with_ranker(
    per_image: Mapping[str, Mapping[str, np.ndarray]], settings: EvalSettings
) -> dict[str, dict[str, Estimate]]:
    """Scorer (but the ranker) -> metric key -> the ranker minus the scorer, paired per image on their
    (N,) per-image values, for every key the ranker has too."""
    ours = per_image["ltrp"]
    return {
        n: {
            k: interval(ours[k] - v, settings.resamples, settings.seed)
            for k, v in values.items()
            if k in ours
        }
        for n, values in per_image.items()
        if n != "ltrp"
    }


def _examples(labels: np.ndarray, count: int) -> list[int]:
    """Indices of up to `count` images for the figure: the first of each class, then the next ones."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    taken = set(firsts)
    return (firsts + [i for i in range(len(labels)) if i not in taken])[:count]


def _classifier_geometry(cfg: ClassifierConfig, mae: MAE) -> ClassifierConfig:
    """The classifier's patches are the MAE's (and the ranker's), so that "kept" means the same."""
    return ClassifierConfig(**{**asdict(cfg), "img_size": mae.cfg.img_size, "patch_size": mae.cfg.patch_size})
