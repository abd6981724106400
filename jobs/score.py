"""Score an image corpus: leave-one-out MAE pseudo-scores of each view's visible patches, on Ray.

    python -m jobs.score --source s3://bucket/images/ --mae s3://bucket/mae_visualize_vit_base.pth \\
        --output s3://bucket/scores/run1 --views 4 --crop random --flip --precision fp16
    python -m jobs.score --config score.yaml --seed 1      # YAML keys are the option names; flags win
    python -m jobs.score --demo                            # sample photos and a random small demo MAE

Runs on a local Ray, or on the cluster that RAY_ADDRESS names (`ray job submit -- python -m jobs.score`).
Each run is an MLflow run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). Re-running with the same
output resumes: finished shards are kept, the rest are scored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._cli import parse, run_job
from ltrp.pipeline.configs import ScoreConfig

DEMO_ROOT = Path("runs/demo")
DEMO = {
    "source": str(DEMO_ROOT / "images"),
    "mae": str(DEMO_ROOT / "mae_demo.pth"),
    "output": str(DEMO_ROOT / "scores"),
}


def main(argv: list[str] | None = None):
    """--demo: the demo's inputs as defaults (written if absent); its scores show the machinery, not
    meaning, since the demo MAE is random. Without it --source, --mae and --output are required."""
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = "--demo" in argv
    cfg = parse(
        ScoreConfig,
        "score",
        [a for a in argv if a != "--demo"],
        prog="python -m jobs.score",
        defaults=DEMO if demo else None,
    )
    from ltrp.pipeline import score_job  # after parsing: --help and refusals need no torch or Ray

    if demo:
        from ltrp.data.datasets import write_demo_mae, write_sample_photos

        write_sample_photos(Path(DEMO["source"]))
        write_demo_mae(Path(DEMO["mae"]))
    summary = run_job(score_job.run, cfg, "python -m jobs.score")
    print(summary.describe())
    return summary


if __name__ == "__main__":
    main()
