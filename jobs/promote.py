"""Promote an evaluated model version to the `champion` alias if it beats the champion, or roll back.

    python -m jobs.promote --model models:/ltrp-ranker --candidate 7          # champion moves if it passes
    python -m jobs.promote --model models:/ltrp-ranker --candidate candidate  # the version an alias names
    python -m jobs.promote --model models:/ltrp-ranker --candidate 7 --dry-run  # compare, record, no move
    python -m jobs.promote --model models:/ltrp-ranker --candidate 7 --policy my-policy.yaml
    python -m jobs.promote --model models:/ltrp-ranker --rollback  # champion back to its predecessor

The candidate and the champion are compared on the metrics that python -m jobs.evaluate logs on a
version's logged model (ltrp.evaluation.measures; the version's `eval.*` tags are a summary, not read),
under the policy of ltrp.evaluation.promotion. Its defaults: the
floor first (the candidate's paired difference from random on the primary measure must exclude 0 on
the good side, or it never becomes champion, the first one included); then better than the champion's
95% interval on the primary measure at keep 0.25 and no worse on the guarded ones at any keep ratio,
on the same evaluation dataset. The measures follow the evaluation data: object recall (primary) and
background share where it has object masks (scenes); else reconstruction error (primary) and accuracy.
A --policy YAML overrides some of its fields:

    primary: accuracy
    primary_ratio: 0.5
    guarded: [accuracy, kendall_tau]
    beat_random: false

The decision, its reason, the compared numbers, the policy and the champion it was compared with are
tagged on the candidate (promotion.*), in a dry run too. MLFLOW_TRACKING_URI names the registry
(default sqlite:///mlflow.db).

Exit codes, for CI to branch on:
    0  promoted; or a dry run that would promote; or already champion; or rolled back
    1  error: unknown model, version or alias, unreadable policy, nothing to roll back to, a candidate
       or champion without evaluation metrics (evaluate it first)
    2  usage error
    3  refused (or a dry run that would refuse): champion unchanged
"""

from __future__ import annotations

import sys

from jobs._cli import parse
from ltrp.pipeline.configs import PromoteConfig


def main(argv: list[str] | None = None) -> int:
    cfg = parse(PromoteConfig, "promote", argv, prog="python -m jobs.promote")
    # Imported after parsing, so that --help and usage errors answer without loading MLflow.
    from mlflow.exceptions import MlflowException

    from ltrp.pipeline import promote_job
    from ltrp.pipeline.registry import PromotionError

    try:
        summary = promote_job.run(cfg)
    except (PromotionError, MlflowException, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(promote_job.describe(summary))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
