"""The promotion job: move a registered model's `champion` alias to an evaluated candidate if it beats
the champion under `ltrp.evaluation.promotion`'s policy, or roll the alias back."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from ltrp.evaluation.promotion import Decision, Policy
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import PromoteConfig, registered_name
from ltrp.pipeline.registry import Promotion, promote, rollback

#: The launcher's exit code for a refused candidate (0: promoted, unchanged or rolled back).
REFUSED = 3


@dataclass(frozen=True)
class PromoteSummary:
    """What the job did: a decision about `candidate`, or a rollback from `from_version` to `to_version`."""

    name: str
    candidate: str | None = None  # the version compared (an alias resolved)
    promotion: Promotion | None = None
    from_version: str | None = None
    to_version: str | None = None

    @property
    def exit_code(self) -> int:
        refused = self.promotion is not None and self.promotion.outcome != "unchanged"
        return REFUSED if refused and not self.promotion.decision.promote else 0


def run(cfg: PromoteConfig) -> PromoteSummary:
    """Promotes `cfg.candidate` (a version number or an alias) or rolls back, in the registry that
    MLFLOW_TRACKING_URI names.

    Raises:
        ltrp.pipeline.registry.PromotionError: nothing to roll back to.
        mlflow.exceptions.MlflowException: an unknown model, version or alias.
        OSError, ValueError: an unreadable policy file.
    """
    client, name = MlflowClient(runtime.tracking_uri()), registered_name(cfg.model)
    if cfg.rollback:
        before, after = rollback(name, client)
        return PromoteSummary(name, from_version=before, to_version=after)
    policy = Policy.from_yaml(cfg.policy) if cfg.policy else Policy()
    candidate = cfg.candidate
    if not candidate.isdigit():
        candidate = str(client.get_model_version_by_alias(name, candidate).version)
    return PromoteSummary(
        name, candidate, promote(name, candidate, policy, dry_run=cfg.dry_run, client=client)
    )


def describe(summary: PromoteSummary) -> str:
    """The outcome in a few lines: the verdict, the policy's reason, and the compared numbers."""
    if summary.promotion is None:
        before, after = summary.from_version, summary.to_version
        return f"{summary.name}: champion rolled back from version {before} to version {after}"
    result = summary.promotion
    against = f"champion version {result.champion}" if result.champion else "no champion"
    verdict = {
        "promoted": "PROMOTED",
        "refused": "REFUSED",
        "unchanged": "UNCHANGED",
        "dry-run": "DRY RUN, would " + ("promote" if result.decision.promote else "refuse"),
    }[result.outcome]
    lines = [
        f"{summary.name}: candidate version {summary.candidate} vs {against}: {verdict}",
        f"  {result.decision.reason}",
    ]
    if result.decision.evidence:
        lines.append(evidence_table(result.decision))
    return "\n".join(lines)


def evidence_table(decision: Decision) -> str:
    """The compared numbers, one metric a line: mean [lo, hi] of each side, and whether it passes."""

    def cell(triple: list[float] | None) -> str:
        return "-" if triple is None else f"{triple[0]:.4g} [{triple[1]:.4g}, {triple[2]:.4g}]"

    ok = {True: "yes", False: "NO", None: "-"}
    rows = [("metric", "role", "candidate mean [95% CI]", "champion mean [95% CI]", "passes")]
    rows += [
        (key, row["role"], cell(row["candidate"]), cell(row["champion"]), ok[row["ok"]])
        for key, row in decision.evidence.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
