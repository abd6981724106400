"""ltrp: rank image patches by how much they matter (LTRP, CVPR 2024), at corpus scale."""

from ltrp.checkpoint import CheckpointError, CheckpointInfo, load_mae, save_mae
from ltrp.mae import GEOMETRIES, MAE, MAEConfig
from ltrp.masking import visible_count, visible_sets
from ltrp.ranker import RANKER_GEOMETRIES, Ranker, RankerConfig, keep_top, rank
from ltrp.scoring import loo_scores
from ltrp.table import read_errors, read_scores

__all__ = [
    "GEOMETRIES",
    "MAE",
    "RANKER_GEOMETRIES",
    "CheckpointError",
    "CheckpointInfo",
    "MAEConfig",
    "Ranker",
    "RankerConfig",
    "keep_top",
    "load_mae",
    "loo_scores",
    "rank",
    "read_errors",
    "read_scores",
    "save_mae",
    "visible_count",
    "visible_sets",
]
