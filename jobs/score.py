"""Score an image corpus: leave-one-out MAE pseudo-scores of each view's visible patches, on Ray.

    python -m jobs.score                                    # embedded demo: sample photos, small MAE
    python -m jobs.score --source s3://bucket/images/ --mae s3://bucket/mae_visualize_vit_base.pth \\
        --output s3://bucket/scores/run1 --views 4 --crop random --flip --precision fp16
    python -m jobs.score --config score.yaml --seed 1      # YAML keys are the flag names; flags win

Runs on a local Ray, or on the cluster that RAY_ADDRESS names (`ray job submit -- python -m jobs.score`).
Each run is an MLflow run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). Re-running with the same
output resumes: finished shards are kept, the rest are scored.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import mlflow
import ray

from jobs._cli import parse_job_values, tracking_uri
from ltrp.data.datasets import write_demo_mae, write_sample_photos
from ltrp.pipeline.score_job import ScoreJobConfig, ScoreJobSummary, run_score_job

DEMO_ROOT = Path("runs/demo")
HELP = {
    "source": "folder, s3:// prefix, .tar shard or .parquet/.csv manifest (default: demo photos)",
    "mae": "MAE checkpoint with a decoder, local or s3:// (default: a random small demo MAE)",
    "output": "output folder or s3:// prefix (re-using one resumes that job)",
    "views": "views per image; each has its own crop, flip and visible set",
    "crop": "center: the central square; random: RandomResizedCrop geometry (scale 0.2-1)",
    "flip": "mirror half of the views",
    "mask_ratio": "fraction of patches hidden from the MAE (0.9 keeps 19 of 196)",
    "seed": "seed of crops, flips and visible sets",
    "mode": "decoder: cut the patch out of the decoder (the paper); encoder: out of both",
    "metric": "distance between reconstructions: l1 (the paper) or l2",
    "precision": "fp32, or autocast to fp16 / bf16 (GPU; fp16 ranks closer to fp32)",
    "batch_size": "views per scoring call",
    "shard_size": "images per shard, the unit of commit and resume",
    "scorers": "scoring actors (default: one per GPU, or 1)",
    "scorer_cpus": "CPUs reserved by each scoring actor",
    "scorer_threads": "torch threads of a CPU scoring actor (default: the cores of the machine that submits)",
    "min_side": "images with a shorter side below this (px) are recorded as errors",
    "max_pixels": "images with more pixels than this are recorded as errors (decompression bombs)",
}


def parse_config(argv: list[str] | None = None) -> ScoreJobConfig:
    _, values = parse_job_values(ScoreJobConfig, HELP, "score", __doc__, argv)
    if "mae" not in values:
        print(
            f"no --mae given: using a randomly initialised demo MAE ({DEMO_ROOT / 'mae_demo.pth'}); "
            "its scores show the machinery, not meaning"
        )
        values["mae"] = str(write_demo_mae(DEMO_ROOT / "mae_demo.pth"))
    values.setdefault("source", str(write_sample_photos(DEMO_ROOT / "images")))
    values.setdefault("output", str(DEMO_ROOT / "scores"))
    return ScoreJobConfig(**values)


def main(argv: list[str] | None = None) -> ScoreJobSummary:
    cfg = parse_config(argv)
    if not ray.is_initialized():  # the pipeline runs every job in one Ray session
        ray.init(log_to_driver=True)  # RAY_ADDRESS, if set, names the cluster; else a local one starts
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("ltrp-score")
    with mlflow.start_run(run_name=f"score {Path(cfg.source.rstrip('/')).name}"):
        mlflow.log_params({f.name: getattr(cfg, f.name) for f in fields(cfg)})
        summary = run_score_job(cfg)
        log_summary(summary)
    print(
        f"scored {summary.images_scored} images ({summary.rows_written} rows) and skipped "
        f"{summary.shards_skipped} finished shards of {summary.shards}; {summary.errors} errors; "
        f"{summary.seconds:.1f} s, {summary.images_per_second:.2f} img/s -> {summary.output}"
    )
    return summary


def log_summary(summary: ScoreJobSummary) -> None:
    mlflow.log_metrics(
        {
            "images_scored": summary.images_scored,
            "rows_written": summary.rows_written,
            "shards_skipped": summary.shards_skipped,
            "errors": summary.errors,
            "wall_seconds": summary.seconds,
            "images_per_second": summary.images_per_second,
        }
    )
    mlflow.set_tag("output_uri", summary.output)


if __name__ == "__main__":
    main()
