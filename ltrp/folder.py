"""Scoring a folder of images in one process: list, decode, score, write Parquet."""

from __future__ import annotations

import importlib.metadata
import json
import posixpath
import time
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ltrp.checkpoint import load_mae
from ltrp.images import IMAGE_SUFFIXES, ImageDecodeError, decode_center_crop, to_model_input
from ltrp.mae import MAE
from ltrp.masking import visible_sets
from ltrp.scoring import Metric, Mode, loo_scores

SCORES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("visible", pa.list_(pa.int16())),
        ("scores", pa.list_(pa.float32())),
    ]
)
ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])


@dataclass
class FolderScoringConfig:
    images: str  # local folder or fsspec URL (s3://bucket/prefix), searched recursively
    mae: str  # MAE checkpoint, see `ltrp.load_mae`
    output: str  # folder that receives scores.parquet and errors.parquet
    mask_ratio: float = 0.9
    seed: int = 0
    view: int = 0
    mode: Mode = "decoder"
    metric: Metric = "l1"
    batch_size: int = 8
    device: str = "cpu"


@dataclass
class FolderScoringResult:
    scores: pa.Table
    errors: pa.Table
    seconds: float


def list_images(root: str) -> dict[str, str]:
    """Image files under `root`, recursively: {image_id (path relative to root): full path}, sorted."""
    fs, base = fsspec.core.url_to_fs(root)
    found = sorted(p for p in fs.find(base) if p.lower().endswith(IMAGE_SUFFIXES))
    return {posixpath.relpath(p, base): fs.unstrip_protocol(p) for p in found}


def score_folder(cfg: FolderScoringConfig) -> FolderScoringResult:
    """Scores every image under `cfg.images` (center crop at the MAE's input size); undecodable images
    are recorded in the errors table and skipped. Writes both tables under `cfg.output`."""
    start = time.perf_counter()
    mae = load_mae(cfg.mae).to(cfg.device)
    paths = list_images(cfg.images)
    rows, errors = [], []
    ids = list(paths)
    for first in range(0, len(ids), cfg.batch_size):
        decoded = {}
        for image_id in ids[first : first + cfg.batch_size]:
            try:
                with fsspec.open(paths[image_id], "rb") as f:
                    decoded[image_id] = decode_center_crop(f.read(), mae.cfg.img_size)
            except ImageDecodeError as err:
                errors.append({"image_id": image_id, "reason": str(err)})
        if not decoded:
            continue
        visible = visible_sets(
            list(decoded), grid=mae.cfg.grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed, view=cfg.view
        )
        images = to_model_input(np.stack(list(decoded.values()))).to(cfg.device)
        scores = loo_scores(mae, images, visible.to(cfg.device), mode=cfg.mode, metric=cfg.metric).cpu()
        rows += [
            {"image_id": i, "visible": v.tolist(), "scores": s.tolist()}
            for i, v, s in zip(decoded, visible, scores, strict=True)
        ]
    metadata = {"ltrp": json.dumps(run_metadata(cfg, mae))}
    scores_table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA.with_metadata(metadata))
    errors_table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    fs, out = fsspec.core.url_to_fs(cfg.output)
    fs.makedirs(out, exist_ok=True)
    pq.write_table(scores_table, posixpath.join(out, "scores.parquet"), filesystem=fs, compression="zstd")
    pq.write_table(errors_table, posixpath.join(out, "errors.parquet"), filesystem=fs, compression="zstd")
    return FolderScoringResult(scores_table, errors_table, time.perf_counter() - start)


def run_metadata(cfg: FolderScoringConfig, mae: MAE) -> dict:
    """What a score table was computed with, stored in its Parquet key-value metadata under "ltrp"."""
    return {
        "mae_uri": mae.checkpoint.uri,
        "mae_sha256": mae.checkpoint.sha256,
        "mae_config": asdict(mae.cfg),
        "norm_pix": mae.cfg.norm_pix,
        "mask_ratio": cfg.mask_ratio,
        "mode": cfg.mode,
        "metric": cfg.metric,
        "seed": cfg.seed,
        "view": cfg.view,
        "ltrp_version": importlib.metadata.version("ltrp"),
        "torch_version": torch.__version__,
    }
