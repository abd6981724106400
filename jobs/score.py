"""Score a folder of images: leave-one-out MAE pseudo-scores of each image's visible patches.

    python -m jobs.score                                   # embedded demo: sample photos, small MAE
    python -m jobs.score --images DIR_OR_S3 --mae mae_visualize_vit_base.pth --output runs/scores

Writes OUTPUT/scores.parquet (image_id, visible, scores; run metadata under the "ltrp" key) and
OUTPUT/errors.parquet (image_id, reason) for images that could not be decoded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ltrp.demo import write_demo_mae, write_sample_photos
from ltrp.folder import FolderScoringConfig, score_folder

DEMO_ROOT = Path("runs/demo")


def parse_config() -> FolderScoringConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", help="folder or s3:// prefix of images (default: demo photos)")
    parser.add_argument("--mae", help="MAE checkpoint with a decoder (default: a random small demo MAE)")
    parser.add_argument("--output", default=str(DEMO_ROOT / "scores"), help="output folder or s3:// prefix")
    parser.add_argument(
        "--mask-ratio", type=float, default=0.9, help="fraction of patches hidden from the MAE"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the visible sets")
    parser.add_argument("--view", type=int, default=0, help="view number (each view has its own visible set)")
    parser.add_argument(
        "--mode",
        choices=["decoder", "encoder"],
        default="decoder",
        help="decoder: cut the patch from the decoder (the paper); encoder: from both",
    )
    parser.add_argument("--metric", choices=["l1", "l2"], default="l1", help="reconstruction distance")
    parser.add_argument("--batch-size", type=int, default=8, help="images per scoring batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.mae is None:
        print(
            f"no --mae given: using a randomly initialised demo MAE ({DEMO_ROOT / 'mae_demo.pth'}); "
            "its scores show the machinery, not meaning"
        )
    return FolderScoringConfig(
        images=args.images or str(write_sample_photos(DEMO_ROOT / "images")),
        mae=args.mae or str(write_demo_mae(DEMO_ROOT / "mae_demo.pth")),
        output=args.output,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        view=args.view,
        mode=args.mode,
        metric=args.metric,
        batch_size=args.batch_size,
        device=args.device,
    )


def main() -> None:
    cfg = parse_config()
    result = score_folder(cfg)
    for row in result.scores.to_pylist():
        top = sorted(zip(row["scores"], row["visible"], strict=True), reverse=True)[:5]
        print(f"{row['image_id']}: top patches " + ", ".join(f"{p} ({s:.4f})" for s, p in top))
    for row in result.errors.to_pylist():
        print(f"skipped {row['image_id']}: {row['reason']}")
    n = result.scores.num_rows
    print(
        f"scored {n} images ({result.errors.num_rows} skipped) in {result.seconds:.1f} s "
        f"({n / result.seconds:.2f} img/s) -> {cfg.output}/scores.parquet"
    )


if __name__ == "__main__":
    main()
