"""Evaluate a ranker against the baselines (FOLK's RCom filter, a supervised selector, ...): four
measures at several keep ratios with bootstrap intervals, a Markdown report and PNGs, tracked in MLflow.

    python -m jobs.evaluate --model models:/ltrp-ranker@candidate --mae runs/mae.pth \\
        --scores runs/scores-test --train-source data/train --test-source data/test --output runs/eval
    python -m jobs.evaluate --config pipeline.yaml --model runs/train/run1/checkpoint_000009/state.pt

--model is a registered version (models:/NAME/VERSION or models:/NAME@ALIAS), whose tags then receive
the ranker's figures (what `python -m jobs.promote` compares), or a training checkpoint file. The
score table must hold the central square of each held-out image (score --test-source with --crop
center): it gives the pseudo-scores of measure 1 and the oracle. MLFLOW_TRACKING_URI as for every job.
"""

from __future__ import annotations

import mlflow

from jobs._cli import parse_job_values, tracking_uri
from ltrp.evaluation.measures import metric_key
from ltrp.evaluation.protocol import EvaluationResult
from ltrp.pipeline.evaluate_job import EvaluateConfig, run_evaluation

HELP = {
    "model": "models:/NAME/VERSION, models:/NAME@ALIAS, or a ranker training checkpoint (state.pt)",
    "mae": "the MAE checkpoint that scored the table",
    "scores": "score table(s) holding the held-out images' central squares (local or s3://)",
    "train_source": "labelled images that train the classifiers and the supervised selector",
    "test_source": "labelled held-out images (the ones scored into --scores)",
    "output": "folder or s3:// prefix for report.md, the PNGs and estimates.json",
    "keep_ratios": "fractions of patches kept",
    "seen_classes": "classes the supervised selector is trained on (default: the first half)",
    "max_train": "training images used (an even spread by id hash)",
    "max_test": "held-out images measured (an even spread by id hash)",
    "classifier_dim": "width of the kept-token classifiers",
    "classifier_depth": "blocks of the kept-token classifiers",
    "classifier_epochs": "epochs of each classifier",
    "resamples": "bootstrap resamples of each interval",
    "seed": "seed of the classifiers, the random scorer and the bootstrap",
}


def parse_config(argv: list[str] | None = None) -> EvaluateConfig:
    required = ("model", "mae", "scores", "train_source", "test_source")
    _, values = parse_job_values(EvaluateConfig, HELP, "evaluate", __doc__, argv, required)
    return EvaluateConfig(**values)


def main(argv: list[str] | None = None) -> EvaluationResult:
    cfg = parse_config(argv)
    mlflow.set_tracking_uri(tracking_uri())
    result, run_id = run_evaluation(cfg)
    r = result.figure_ratio
    figures = []
    for measure in ("reconstruction_error", "accuracy"):
        key = metric_key(measure, r)
        ltrp, rand = result.estimates["ltrp"][key].mean, result.estimates["random"][key].mean
        figures.append(f"{measure} {ltrp:.4f} (random {rand:.4f})")
    print(
        f"evaluated {cfg.model} on {result.test_images} held-out images, {round(100 * r)}% of patches "
        f"kept: {'; '.join(figures)}. Report: {cfg.output.rstrip('/')}/report.md; MLflow run {run_id}"
    )
    return result


if __name__ == "__main__":
    main()
