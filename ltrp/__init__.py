"""ltrp: rank image patches by how much they matter (LTRP, CVPR 2024), at corpus scale.

The library is split by concern; each subpackage may import only what its line says:

    ltrp.core        torch (and timm): models, visible sets, leave-one-out scoring, losses, metrics
    ltrp.data        + pyarrow, fsspec, PIL: images, corpus sources, score tables, checkpoints, data sets
    ltrp.evaluation  + scipy, matplotlib: measures, the evaluation protocol, report, promotion policy
    ltrp.pipeline    + ray, mlflow: the jobs, the shared Ray Train loop, the registry

`import ltrp` itself imports nothing heavy: the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GEOMETRIES": "ltrp.core.mae",
    "MAE": "ltrp.core.mae",
    "MAEConfig": "ltrp.core.mae",
    "visible_count": "ltrp.core.masking",
    "visible_sets": "ltrp.core.masking",
    "RANKER_GEOMETRIES": "ltrp.core.ranker",
    "Ranker": "ltrp.core.ranker",
    "RankerConfig": "ltrp.core.ranker",
    "keep_top": "ltrp.core.ranker",
    "rank": "ltrp.core.ranker",
    "loo_scores": "ltrp.core.leave_one_out",
    "forward_kept": "ltrp.core.pruned",
    "forward_tome": "ltrp.core.pruned",
    "forward_shared": "ltrp.core.pruned",
    "TokenScorer": "ltrp.core.pruned",
    "vit_from_mae": "ltrp.core.pruned",
    "CheckpointError": "ltrp.data.checkpoints",
    "CheckpointInfo": "ltrp.data.checkpoints",
    "load_mae": "ltrp.data.checkpoints",
    "load_ranker": "ltrp.data.checkpoints",
    "save_mae": "ltrp.data.checkpoints",
    "read_errors": "ltrp.data.tables",
    "read_ranks": "ltrp.data.tables",
    "read_scores": "ltrp.data.tables",
    "top_k": "ltrp.data.tables",
    "read_job_metadata": "ltrp.data.tables",
    "position_scores": "ltrp.data.tables",
    "SceneConfig": "ltrp.data.scenes",
    "make_scene": "ltrp.data.scenes",
    "write_scenes": "ltrp.data.scenes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ltrp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
