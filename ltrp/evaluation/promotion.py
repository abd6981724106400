"""Whether a candidate model version may replace the champion: a declared policy and a pure decision.

The policy compares the two versions' evaluations (see ltrp.evaluation.measures: a mean and a 95% bootstrap
interval per metric key) and promotes the candidate only if

* both were evaluated on the same held-out set and settings (the same dataset digest);
* on the primary metric, the candidate's mean is better than the champion's whole interval
  (lower-is-better: candidate mean < champion lo; higher-is-better: candidate mean > champion hi);
* on every guarded metric, the candidate's mean is not worse than the champion's whole interval
  (lower-is-better: candidate mean <= champion hi; higher-is-better: candidate mean >= champion lo).

Before any of that, the floor: the candidate's paired difference from random on the primary metric
(`vs_random.<key>`, ranker minus random per image) must exclude 0 on the good side; so a version that
does not beat random never becomes champion, the first one included. With no champion yet, a candidate
above the floor that carries every metric the policy names is promoted. The default policy's measures
depend on the evaluation data ("auto"): object recall at 25% keep where it has object masks (scenes),
else reconstruction error at 25%. Missing
metrics on either side refuse: a champion evaluated before a metric existed must be re-evaluated
(`python -m jobs.evaluate`) on the candidate's dataset before anything can replace it. Nothing here
talks to MLflow; ltrp.pipeline.registry reads each version's figures from its logged model's metrics
(`evaluation_of`), calls `decide` and records the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ltrp.evaluation.measures import (
    KEEP_RATIOS,
    MEASURES,
    RATIO_FREE,
    Estimate,
    higher_is_better,
    measure_of,
    metric_key,
    vs_random,
)

#: `Policy.primary` / `guarded` value that picks by the evaluation data: with object masks (scenes),
#: object recall; without, the MAE's reconstruction error and the kept-token classifier's accuracy.
AUTO = "auto"
MASK_PRIMARY, MASK_GUARDED = "object_recall", ("object_recall", "background_share")
FALLBACK_PRIMARY, FALLBACK_GUARDED = "reconstruction_error", ("reconstruction_error", "accuracy")


@dataclass(frozen=True)
class Policy:
    """What a candidate must show to become champion.

    Attributes:
        primary: measure the candidate must improve, beyond the champion's 95% interval; "auto": object
            recall where the evaluation data has object masks, else reconstruction error.
        primary_ratio: its keep ratio (None for the ratio-free measures, e.g. kendall_tau).
        guarded: measures on which the candidate must be no worse than the champion's interval;
            "auto": object recall and background share with masks, else reconstruction error and
            accuracy.
        guard_ratios: the keep ratios checked for each guarded measure that has one; "auto": those the
            candidate was evaluated at.
        beat_random: the floor: no version becomes champion, the first one included, unless its paired
            difference from random on the primary measure excludes 0 on the good side.
    """

    primary: str = AUTO
    primary_ratio: float | None = 0.25
    guarded: tuple[str, ...] | str = AUTO
    guard_ratios: tuple[float, ...] | str = AUTO
    beat_random: bool = True

    def __post_init__(self) -> None:
        # YAML gives lists; a frozen dataclass should hold tuples so that it stays hashable.
        if self.guarded != AUTO:
            object.__setattr__(self, "guarded", tuple(self.guarded))
        if self.guard_ratios != AUTO:
            object.__setattr__(self, "guard_ratios", tuple(float(r) for r in self.guard_ratios))
        named = [m for m in (self.primary, *(() if self.guarded == AUTO else self.guarded)) if m != AUTO]
        for measure in named:
            if measure not in MEASURES:
                raise ValueError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")
            if MEASURES[measure] is None:
                raise ValueError(
                    f"{measure!r} is best at 0, neither higher nor lower: a policy cannot rank by it"
                )
        free = self.primary in RATIO_FREE  # (both of auto's measures have a keep ratio)
        if free != (self.primary_ratio is None):
            raise ValueError(
                f"primary {self.primary!r}: primary_ratio must be "
                + ("null (it has no keep ratio)" if free else "a keep ratio")
            )

    def resolved(self, candidate: Mapping[str, Estimate]) -> Policy:
        """The policy with "auto" replaced by what the candidate's evaluation data allows."""
        masks = any(measure_of(k) == MASK_PRIMARY for k in candidate)
        primary = (MASK_PRIMARY if masks else FALLBACK_PRIMARY) if self.primary == AUTO else self.primary
        guarded = (MASK_GUARDED if masks else FALLBACK_GUARDED) if self.guarded == AUTO else self.guarded
        ratios = self.guard_ratios
        if ratios == AUTO:  # the keep ratios the candidate was evaluated at, for its primary measure
            ratios = tuple(
                sorted({float(k.split(".keep")[1]) / 100 for k in candidate if measure_of(k) == primary})
            )
        return replace(self, primary=primary, guarded=guarded, guard_ratios=ratios or KEEP_RATIOS)

    @property
    def primary_key(self) -> str:
        """The primary metric key, e.g. "reconstruction_error.keep25" (of a resolved policy)."""
        if self.primary == AUTO:
            raise ValueError("an 'auto' policy names its measures once resolved against a candidate")
        return metric_key(self.primary, self.primary_ratio)

    @property
    def guarded_keys(self) -> list[str]:
        """Every guarded metric key, e.g. "accuracy.keep10", ..., in declaration order."""
        keys = []
        for measure in self.guarded:
            if measure in RATIO_FREE:
                keys.append(metric_key(measure))
            else:
                keys.extend(metric_key(measure, r) for r in self.guard_ratios)
        return keys

    @property
    def required_keys(self) -> list[str]:
        """The keys both versions must carry: the primary, then the guarded ones."""
        return list(dict.fromkeys([self.primary_key, *self.guarded_keys]))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), as recorded with a decision and accepted by from_dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Policy:
        """A policy from a mapping of some of its fields; the rest keep their defaults."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Policy:
        """A policy from a YAML file of some of its fields (an empty file: the defaults)."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


@dataclass(frozen=True)
class Decision:
    """The outcome of comparing a candidate with the champion.

    Attributes:
        promote: whether the candidate may become champion.
        reason: one line a person can act on.
        evidence: metric key -> {"role": "primary" | "guard", "higher_is_better", "candidate": [mean,
            lo, hi], "champion": [mean, lo, hi] or None, "ok": bool}, for the keys the policy names
            that both sides (or, with no champion, the candidate) carry.
    """

    promote: bool
    reason: str
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)


def _triple(e: Estimate | None) -> list[float] | None:
    return None if e is None else [e.mean, e.lo, e.hi]


def _beats(key: str, candidate: Estimate, champion: Estimate) -> bool:
    """Candidate's mean beyond the champion's interval, on the good side."""
    return candidate.mean > champion.hi if higher_is_better(key) else candidate.mean < champion.lo


def _no_worse(key: str, candidate: Estimate, champion: Estimate) -> bool:
    """Candidate's mean not beyond the champion's interval on the bad side."""
    return candidate.mean >= champion.lo if higher_is_better(key) else candidate.mean <= champion.hi


def decide(
    candidate: Mapping[str, Estimate],
    champion: Mapping[str, Estimate] | None,
    policy: Policy,
    *,
    candidate_dataset: str | None,
    champion_dataset: str | None,
) -> Decision:
    """Whether `candidate` may replace `champion` under `policy`.

    Args:
        candidate: the candidate's metrics, {metric key: Estimate} (ltrp.evaluation.measures.from_metrics).
        champion: the champion's metrics, or None when there is no champion yet.
        policy: what the candidate must show.
        candidate_dataset: the digest of the dataset the candidate's metrics were computed on (None if
            unknown).
        champion_dataset: the champion's (ignored when there is no champion).

    Returns:
        The decision; refusals name the metrics or datasets that caused them.
    """
    policy = policy.resolved(candidate)
    required, primary = policy.required_keys, policy.primary_key
    evidence = _evidence(candidate, champion, required, primary)
    if refused := _candidate_refusal(candidate, policy):
        return Decision(False, refused, evidence)
    if champion is None:
        return Decision(True, "first model: there is no champion yet", evidence)
    if refused := _champion_refusal(champion, required, candidate_dataset, champion_dataset):
        return Decision(False, refused, evidence)
    return _verdict(evidence, required, primary)


def _candidate_refusal(candidate: Mapping[str, Estimate], policy: Policy) -> str | None:
    """Why the candidate cannot become champion whatever the champion's figures, or None: it lacks a
    metric the (resolved) policy names, or it is below the floor."""
    missing = [k for k in policy.required_keys if k not in candidate]
    if missing:
        return f"candidate lacks metrics {', '.join(missing)}: evaluate it (python -m jobs.evaluate) first"
    if policy.beat_random:
        return _below_the_floor(candidate, policy.primary_key)
    return None


def _champion_refusal(
    champion: Mapping[str, Estimate],
    required: list[str],
    candidate_dataset: str | None,
    champion_dataset: str | None,
) -> str | None:
    """Why the two versions cannot be compared, or None: other datasets, or a champion that lacks one
    of the `required` keys."""
    if not candidate_dataset or candidate_dataset != champion_dataset:
        return (
            f"not comparable: candidate evaluated on dataset {candidate_dataset or '(none)'}, champion on "
            f"{champion_dataset or '(none)'}; re-evaluate the champion on the candidate's dataset"
        )
    missing = [k for k in required if k not in champion]
    if missing:
        return (
            f"champion lacks metrics {', '.join(missing)}: re-evaluate the champion (python -m "
            "jobs.evaluate) on the candidate's dataset before promoting"
        )
    return None


def _verdict(evidence: dict[str, dict[str, Any]], required: list[str], primary: str) -> Decision:
    """The decision between two comparable versions, from the `_evidence` of every `required` key:
    promote only if the primary key beats the champion and no guarded key is worse."""
    failures = []
    if not evidence[primary]["ok"]:
        failures.append(f"not better than the champion's 95% interval on {primary}")
    worse = [k for k in required if k != primary and not evidence[k]["ok"]]
    if worse:
        failures.append(f"worse than the champion's 95% interval on {', '.join(worse)}")
    if failures:
        return Decision(False, "; ".join(failures), evidence)
    return Decision(True, f"better on {primary} and no worse on any guarded metric", evidence)


def _below_the_floor(candidate: Mapping[str, Estimate], primary: str) -> str | None:
    """Why the candidate does not beat random on the primary key, or None if it does."""
    diff = candidate.get(vs_random(primary))
    if diff is None:
        return (
            f"candidate lacks {vs_random(primary)} (ranker minus random): re-evaluate it with python -m "
            "jobs.evaluate; the policy's floor needs it"
        )
    better = diff.lo > 0 if higher_is_better(primary) else diff.hi < 0
    if not better:
        return (
            f"does not beat random on {primary}: ranker minus random is {diff.mean:.4g} [{diff.lo:.4g}, "
            f"{diff.hi:.4g}] (95%), which does not exclude 0 on the good side: no version becomes champion "
            "below that floor"
        )
    return None


def _evidence(
    candidate: Mapping[str, Estimate],
    champion: Mapping[str, Estimate] | None,
    keys: list[str],
    primary: str,
) -> dict[str, dict[str, Any]]:
    """The compared numbers for each of `keys` the candidate carries; "ok" is whether that key passes
    (None where the champion lacks it or there is no champion)."""
    rows = {}
    for key in keys:
        if key not in candidate:
            continue
        theirs = None if champion is None else champion.get(key)
        ok = None
        if theirs is not None:
            # The primary key passes only by beating the champion, so its guard check is implied.
            ok = (_beats if key == primary else _no_worse)(key, candidate[key], theirs)
        rows[key] = {
            "role": "primary" if key == primary else "guard",
            "higher_is_better": higher_is_better(key),
            "candidate": _triple(candidate[key]),
            "champion": _triple(theirs),
            "ok": ok,
        }
    floor = candidate.get(vs_random(primary))
    if floor is not None:
        rows[vs_random(primary)] = {
            "role": "floor",
            "higher_is_better": higher_is_better(primary),
            "candidate": _triple(floor),
            "champion": None,
            "ok": _below_the_floor(candidate, primary) is None,
        }
    return rows
