"""The evaluation's measures: their names, which way is better, and how a model version carries them.

An evaluated model version holds, for each measure (and keep ratio, for the measures that have one),
the mean over the held-out images and its 95% bootstrap interval, as three tags:

    eval.reconstruction_error.keep25.mean = "0.0412"
    eval.reconstruction_error.keep25.lo   = "0.0398"
    eval.reconstruction_error.keep25.hi   = "0.0427"

plus `eval.run_id` (the MLflow run of the evaluation) and `eval.dataset` (a digest of the held-out and
training images, the pseudo-scores, the MAE and the settings: two versions are comparable only when it
is the same).
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


def to_tags(estimates: Mapping[str, Estimate]) -> dict[str, str]:
    """{metric key: Estimate} -> model version tags (see the module docstring)."""
    tags = {}
    for key, e in estimates.items():
        for part in ("mean", "lo", "hi"):
            tags[f"{TAG_PREFIX}{key}.{part}"] = f"{getattr(e, part):.6g}"
    return tags


def from_tags(tags: Mapping[str, str]) -> dict[str, Estimate]:
    """Model version tags -> {metric key: Estimate}, for the keys that have all three parts."""
    keys = {
        k[len(TAG_PREFIX) : -len(".mean")] for k in tags if k.startswith(TAG_PREFIX) and k.endswith(".mean")
    }
    found = {}
    for key in keys:
        parts = [tags.get(f"{TAG_PREFIX}{key}.{p}") for p in ("mean", "lo", "hi")]
        if None not in parts:
            found[key] = Estimate(*(float(p) for p in parts))
    return found
