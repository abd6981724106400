"""The evaluation's measures: their names, which way is better, and how a model version carries them.

An evaluated model version's logged model holds, for each measure (and keep ratio, for the measures
that have one), the mean over the held-out images and its 95% bootstrap interval, as three metrics on
the held-out dataset (`to_metrics`; its digest says which images, MAE and settings: two versions are
comparable only when it is the same):

    reconstruction_error.keep25.mean = 0.0412
    reconstruction_error.keep25.lo   = 0.0398
    reconstruction_error.keep25.hi   = 0.0427

which is what promotion compares (`from_metrics`). The version's tags repeat them for people
(`to_tags`: `eval.reconstruction_error.keep25.mean` = "0.0412", ...), beside `eval.run_id` (the MLflow
run of the evaluation) and `eval.dataset` (that digest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: measure name -> True if higher is better, False if lower is, None if closer to 0 is
MEASURES: dict[str, bool | None] = {
    "kendall_tau": True,  # agreement with held-out pseudo-scores (no keep ratio)
    "spearman": True,  # (no keep ratio)
    "ndcg": True,  # NDCG@k, k = keep ratio x scored patches
    "topk_overlap": True,  # top-k overlap with the pseudo-scores, same k
    "reconstruction_error": False,  # MAE error on the dropped patches, from the kept ones alone
    "accuracy": True,  # classifier trained and tested on the kept tokens only
    "accuracy_seen": True,  # the same, on the classes the supervised selector was trained on
    "accuracy_unseen": True,  # ... and on the classes it never saw
    # On scenes with object masks (ltrp.evaluation.scene_eval):
    "object_recall": True,  # fraction of each object's pixels inside kept patches
    "recall_seen": True,  # the same, over objects of the seen classes
    "recall_unseen": True,  # ... and of the unseen classes
    "bias_gap": None,  # recall on seen classes minus recall on unseen classes (0: no category bias)
    "background_share": False,  # fraction of kept patches without an object pixel
    "oracle_tau": True,  # Kendall tau with the full-coverage oracle over all positions (no keep ratio)
    "oracle_ndcg": True,  # NDCG@k against the oracle's position scores, k = keep ratio x L
    "probe_map": True,  # multi-label mAP of a probe trained and tested on the kept tokens
}
#: Measures that do not depend on the keep ratio.
RATIO_FREE = ("kendall_tau", "spearman", "oracle_tau")
KEEP_RATIOS: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75)
TAG_PREFIX = "eval."
#: The three figures of an Estimate, each a metric `KEY.PART` (`to_metrics`).
PARTS = ("mean", "lo", "hi")
#: Prefix of a metric key for the paired difference ranker minus random (the promotion floor).
VS_RANDOM = "vs_random."


@dataclass(frozen=True)
class Estimate:
    """A mean over images and its 95% bootstrap interval."""

    mean: float
    lo: float
    hi: float


def metric_key(measure: str, ratio: float | None = None) -> str:
    """("reconstruction_error", 0.25) -> "reconstruction_error.keep25"; ratio-free ones: the name."""
    if measure not in MEASURES:
        raise KeyError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")
    return measure if ratio is None else f"{measure}.keep{round(ratio * 100):02d}"


def vs_random(key: str) -> str:
    """ "object_recall.keep25" -> "vs_random.object_recall.keep25": the ranker minus random, per image."""
    return VS_RANDOM + key


def measure_of(key: str) -> str:
    """ "reconstruction_error.keep25" -> "reconstruction_error"."""
    return key.split(".keep")[0]


def higher_is_better(key: str) -> bool:
    """Raises ValueError for a measure whose best value is 0 (a promotion policy cannot rank by it)."""
    direction = MEASURES[measure_of(key)]
    if direction is None:
        raise ValueError(f"{key}: closer to 0 is better, neither higher nor lower")
    return direction


def direction(key: str) -> str:
    """How to read a measure, for tables and plots."""
    return {True: "higher is better", False: "lower is better", None: "closer to 0 is better"}[
        MEASURES[measure_of(key)]
    ]


def to_metrics(estimates: Mapping[str, Estimate]) -> dict[str, float]:
    """{metric key: Estimate} -> {"KEY.mean": mean, "KEY.lo": lo, "KEY.hi": hi}: a logged model's metrics
    (see the module docstring)."""
    return {f"{key}.{part}": getattr(e, part) for key, e in estimates.items() for part in PARTS}


def from_metrics(metrics: Mapping[str, float]) -> dict[str, Estimate]:
    """`to_metrics`' inverse: {metric key: Estimate} for the keys that have all three parts (other
    metrics, such as a training run's loss, are left out)."""
    keys = {k.removesuffix(".mean") for k in metrics if k.endswith(".mean")}
    found = {}
    for key in keys:
        parts = [metrics.get(f"{key}.{part}") for part in PARTS]
        if None not in parts:
            found[key] = Estimate(*parts)
    return found


def to_tags(estimates: Mapping[str, Estimate]) -> dict[str, str]:
    """{metric key: Estimate} -> model version tags, a summary for people: `to_metrics`' names with
    TAG_PREFIX, their values to 6 significant digits."""
    return {TAG_PREFIX + name: f"{value:.6g}" for name, value in to_metrics(estimates).items()}
