"""Promote an evaluated model version to the `champion` alias if it beats the champion, or roll back.

    python -m jobs.promote --model ltrp-ranker --candidate 7              # move champion if it passes
    python -m jobs.promote --model ltrp-ranker --candidate 7 --dry-run    # compare and record, move nothing
    python -m jobs.promote --model ltrp-ranker --candidate 7 --policy configs/promotion.yaml
    python -m jobs.promote --model ltrp-ranker --rollback                 # champion back to its predecessor

The candidate and the champion are compared on the `eval.*` tags that python -m jobs.evaluate puts on
a version (ltrp.evaluation.measures), under the policy of ltrp.evaluation.promotion (defaults: better than the champion's 95%
interval on reconstruction_error at keep 0.25, no worse on reconstruction_error and accuracy at any
keep ratio, same evaluation dataset). A --policy YAML overrides some of its fields, e.g.

    primary: accuracy
    primary_ratio: 0.5
    guarded: [accuracy, kendall_tau]

Without a champion, the first evaluated candidate becomes champion. The decision, its reason, the
compared numbers, the policy and the champion it was compared with are tagged on the candidate
(promotion.*), in a dry run too. MLFLOW_TRACKING_URI names the registry (default sqlite:///mlflow.db).

Exit codes, for CI to branch on:
    0  promoted; or a dry run that would promote; or already champion; or rolled back
    1  error: unknown model or version, unreadable policy, nothing to roll back to
    2  usage error
    3  refused (or a dry run that would refuse): champion unchanged
"""

from __future__ import annotations

import argparse
import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs._cli import tracking_uri
from ltrp.evaluation.promotion import Decision, Policy
from ltrp.pipeline.registry import PromotionError, promote, rollback

REFUSED = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--candidate", help="version to compare with the champion (not with --rollback)")
    parser.add_argument("--dry-run", action="store_true", help="decide and record, but move no alias")
    parser.add_argument("--rollback", action="store_true", help="move champion back to the one it replaced")
    parser.add_argument(
        "--policy", help="YAML file of ltrp.evaluation.promotion.Policy fields (default: its defaults)"
    )
    args = parser.parse_args(argv)
    if args.rollback == (args.candidate is not None):
        parser.error("give either --candidate VERSION or --rollback")
    if args.rollback and (args.dry_run or args.policy):
        parser.error("--dry-run and --policy apply to --candidate, not to --rollback")
    return args


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = MlflowClient(tracking_uri())
    try:
        if args.rollback:
            before, after = rollback(args.model, client)
            print(f"{args.model}: champion rolled back from version {before} to version {after}")
            return 0
        policy = Policy.from_yaml(args.policy) if args.policy else Policy()
        result = promote(args.model, args.candidate, policy, dry_run=args.dry_run, client=client)
    except (PromotionError, MlflowException, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    against = f"champion version {result.champion}" if result.champion else "no champion"
    verdict = {
        "promoted": "PROMOTED",
        "refused": "REFUSED",
        "unchanged": "UNCHANGED",
        "dry-run": "DRY RUN, would " + ("promote" if result.decision.promote else "refuse"),
    }[result.outcome]
    print(f"{args.model}: candidate version {args.candidate} vs {against}: {verdict}")
    print(f"  {result.decision.reason}")
    if result.decision.evidence:
        print(evidence_table(result.decision))
    if result.outcome == "unchanged":
        return 0
    return 0 if result.decision.promote else REFUSED


if __name__ == "__main__":
    sys.exit(main())
