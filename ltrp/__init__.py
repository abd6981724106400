"""ltrp: rank image patches by how much they matter (LTRP, CVPR 2024), at corpus scale."""

from ltrp.checkpoint import CheckpointError, CheckpointInfo, load_mae, save_mae
from ltrp.mae import GEOMETRIES, MAE, MAEConfig
from ltrp.masking import visible_count, visible_sets
from ltrp.scoring import loo_scores
from ltrp.table import read_errors, read_scores

__all__ = [
    "GEOMETRIES",
    "MAE",
    "CheckpointError",
    "CheckpointInfo",
    "MAEConfig",
    "load_mae",
    "loo_scores",
    "read_errors",
    "read_scores",
    "save_mae",
    "visible_count",
    "visible_sets",
]
