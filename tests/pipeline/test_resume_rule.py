"""One resume rule for every job that resumes: each field is the job's identity (a resume must agree on
it) or `may_change()`; the decision for every field is written here once, so a new field fails this
test until someone decides."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from ltrp.pipeline import pretrain_job, train_job
from ltrp.pipeline.configs import PretrainConfig, RankConfig, ScoreConfig, TrainConfig, identity_fields

CORPUS_IDENTITY = {
    "source",
    "views",
    "crop",
    "flip",
    "seed",
    "shard_size",
    "file_shards",
    "min_side",
    "max_pixels",
}
CORPUS_MAY_CHANGE = {"output", "batch_size", "workers", "max_workers", "worker_cpus", "threads", "device"}
RUNNING = {
    "name",
    "storage",
    "workers",
    "device",
    "worker_cpus",
    "threads",
    "max_failures",
    "keep_checkpoints",
}
#: Per resumable config: (its identity fields, the fields a resume may change).
DECISIONS = {
    ScoreConfig: (
        CORPUS_IDENTITY | {"cover", "mask_ratio", "mode", "metric", "precision"},
        CORPUS_MAY_CHANGE | {"mae"},  # its bytes are fingerprinted, not its path
    ),
    # likewise its weights; the rounds of set inference change every score
    RankConfig: (CORPUS_IDENTITY | {"rounds"}, CORPUS_MAY_CHANGE | {"model"}),
    TrainConfig: (
        {"scores", "ranker", "head", "init", "loss", "training", "val_fraction", "views", "seed"},
        RUNNING
        | {"epochs", "warmup_epochs", "batch_size", "shuffle_buffer", "lr", "weight_decay"}
        | {"topk", "validate_every", "patience", "cache_mib", "register", "alias"},
    ),
    PretrainConfig: (
        {"source", "geometry", "norm_pix", "mask_ratio", "crop", "flip", "max_images", "shard_size", "seed"}
        # what a frequency pre-training learns: a resume that changed them would mix two objectives
        | {"objective", "filters", "taus", "distill_weight", "teacher_momentum"},
        RUNNING
        | {"output", "epochs", "warmup_epochs", "batch_size", "lr", "base_lr", "weight_decay"}
        | {"shuffle_buffer", "sample_images"},
    ),
}
REQUIRED = {"source": "s", "scores": "s", "mae": "m.pth", "model": "r.pt", "output": "o"}


def _config(cls: type) -> object:
    return cls(**{f.name: REQUIRED[f.name] for f in fields(cls) if f.name in REQUIRED and f.init})


@pytest.mark.parametrize("cls", list(DECISIONS), ids=lambda c: c.__name__)
def test_every_field_of_a_resumable_job_is_decided(cls: type) -> None:
    identity, may_change = DECISIONS[cls]
    assert not identity & may_change
    assert identity | may_change == {f.name for f in fields(cls)}
    assert set(identity_fields(_config(cls))) == identity


def test_a_trainings_resume_compares_its_identity_and_the_table() -> None:
    cfg = _config(TrainConfig)
    inputs = train_job._inputs(cfg, {"fingerprint": ["mae_sha256"], "mae_sha256": "x"}, "/abs/s")
    assert set(inputs) == DECISIONS[TrainConfig][0] | {"score_table"}
    assert inputs["scores"] == "/abs/s" and inputs["score_table"] == {"mae_sha256": "x"}
    longer = replace(cfg, epochs=99, lr=1.0, register="models:/other")
    assert train_job._inputs(longer, {}, "/abs/s") == train_job._inputs(cfg, {}, "/abs/s")


def test_a_pretrainings_resume_compares_its_identity_and_the_plan() -> None:
    cfg = _config(PretrainConfig)
    inputs = pretrain_job._inputs(cfg, [])
    assert set(inputs) == DECISIONS[PretrainConfig][0] | {"plan_digest"}
    assert pretrain_job._inputs(replace(cfg, flip=True), []) != inputs  # flip was missing from the old list
    assert pretrain_job._inputs(replace(cfg, epochs=99, workers=4), []) == inputs
