"""Evaluate a ranker against the baselines (FOLK's RCom filter, a supervised selector, ...): four
measures at several keep ratios with bootstrap intervals, a Markdown report and PNGs, tracked in MLflow.

    python -m jobs.evaluate --model models:/ltrp-ranker@candidate --mae runs/mae.pth \\
        --scores runs/scores-test --train-source data/train --test-source data/test --output runs/eval
    python -m jobs.evaluate --config pipeline.yaml --model runs/train/run1/checkpoint_000009/state.pt ...

--model is a registered version (models:/NAME/VERSION or models:/NAME@ALIAS), whose logged model then
receives the ranker's figures as metrics (what `python -m jobs.promote` compares) and whose tags a
summary of them, or a training checkpoint file. The
score table must hold the central square of each held-out image (score --test-source with --crop
center): it gives the pseudo-scores of measure 1 and the oracle. MLFLOW_TRACKING_URI as for every job.
"""

from __future__ import annotations

from jobs._cli import parse, run_job
from ltrp.pipeline.configs import EvaluateConfig


def main(argv: list[str] | None = None):
    cfg = parse(EvaluateConfig, "evaluate", argv, prog="python -m jobs.evaluate")
    from ltrp.pipeline import evaluate_job  # after parsing: --help and usage errors load no torch or MLflow

    summary = run_job(evaluate_job.run, cfg, "python -m jobs.evaluate")
    print(
        f"evaluated {cfg.model} on {summary.result.test_images} held-out images: "
        f"{evaluate_job.headline(summary.result)}. Report: {cfg.output.rstrip('/')}/report.md; MLflow run "
        f"{summary.run_id}"
    )
    return summary


if __name__ == "__main__":
    main()
