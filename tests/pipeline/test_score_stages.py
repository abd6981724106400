"""The scoring job's stages as plain functions, without Ray: an image's rows (cover mode), scoring, and
the job's fingerprint. The stages and output folder it shares with the ranking job are in
test_shards.py; the end-to-end runs on a Ray cluster in test_score_job.py."""

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from support import TINY_GRID, decode, image, job_metadata, pixels, score_config, score_output, write_shard

import ltrp
from ltrp.data.images import to_model_input
from ltrp.data.sources import Shard, plan_corpus, plan_digest
from ltrp.data.tables import OUTPUT_LAYOUT
from ltrp.pipeline.configs import ConfigError, InputError, ScoreConfig, identity_fields
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.score_stages import ShardScorer
from ltrp.pipeline.shards import FileGroups, ShardedOutput

#: The fields of ScoreConfig that a resume may change: all others must be fingerprinted.
MAY_CHANGE = {*("mae", "output", "batch_size", "workers", "max_workers", "worker_cpus", "threads", "device")}
#: A different value for every identity field, each of which must make a resume refuse.
RESULT_CHANGES = {
    "source": "elsewhere",  # a copy of the corpus
    "views": 2,
    "cover": 1,
    "crop": "random",
    "flip": True,
    "mask_ratio": 0.5,
    "seed": 1,
    "mode": "encoder",
    "metric": "l2",
    "precision": "bf16",
    "shard_size": 1,
    "file_shards": 2,
    "min_side": 8,
    "max_pixels": 10**6,
}


# -- an image's rows -------------------------------------------------------------------------------


def test_cover_mode_scores_every_patch_of_one_view_r_times(tmp_path: Path) -> None:
    files = {"a.png": image(0, 40, 90), "b.png": image(1, 64, 64)}
    cfg = score_config(tmp_path, cover=2, crop="random", flip=True, mask_ratio=0.75, seed=5)
    rows = decode(cfg, write_shard(tmp_path, 0, files)).to_pylist()
    per_round = TINY_GRID * TINY_GRID // 16  # 64 patches in sets of 16
    assert len(rows) == len(files) * 2 * per_round
    for image_id in files:
        mine = [r for r in rows if r["image_id"] == image_id]
        assert [r["view"] for r in mine] == list(range(2 * per_round))  # a row per visible set
        assert len({(tuple(r["crop_box"]), r["flip"], r["pixels"]) for r in mine}) == 1  # all of view 0
        counts = Counter(p for r in mine for p in r["visible"])
        assert set(counts) == set(range(TINY_GRID * TINY_GRID)) and min(counts.values()) == 2
        expected = ltrp.core.masking.cover_sets(image_id, grid=TINY_GRID, mask_ratio=0.75, seed=5, rounds=2)
        assert [r["visible"] for r in mine] == expected.tolist()


def test_cover_with_several_views_is_refused() -> None:
    with pytest.raises(ConfigError, match="cover"):
        ScoreConfig(source="s", mae="m", output="o", cover=2, views=3)


# -- scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "metric"), [("decoder", "l1"), ("encoder", "l2")])
def test_the_scorer_scores_usable_rows_as_loo_scores_does(
    tmp_path: Path, mae_path: str, mae: ltrp.MAE, mode: str, metric: str
) -> None:
    files = {"a.png": image(0, 60, 90), "b.png": b"junk", "c.png": image(1, 64, 64, gray=True)}
    cfg = score_config(tmp_path, mae_path, views=2, crop="random", mask_ratio=0.9, mode=mode, metric=metric)
    batch = decode(cfg, write_shard(tmp_path, 0, files))
    scored = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(batch)

    assert scored.column_names == [c for c in batch.column_names if c != "pixels"] + ["scores"]
    assert scored.drop_columns(["scores"]).equals(batch.drop_columns(["pixels"]))
    rows = batch.to_pylist()
    ok = [i for i, r in enumerate(rows) if r["error"] is None]
    assert len(ok) == 4 and len(rows) == 5
    scores = scored.column("scores").to_pylist()
    assert [scores[i] for i in range(len(rows)) if i not in ok] == [None]
    assert all(len(scores[i]) == len(rows[i]["visible"]) == 6 for i in ok)  # int(64 * 0.1)
    expected = ltrp.loo_scores(
        mae,
        to_model_input(np.stack([pixels(rows[i]) for i in ok])),
        torch.tensor([rows[i]["visible"] for i in ok]),
        mode=mode,
        metric=metric,
    )
    got = np.array([scores[i] for i in ok], np.float32)
    assert np.all(got > 0)  # not an empty or zero result that would match anything
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-8)


def test_the_scorer_passes_a_batch_of_errors_through(tmp_path: Path, mae_path: str, mae: ltrp.MAE) -> None:
    cfg = score_config(tmp_path, mae_path)
    scored = ShardScorer(cfg, mae.checkpoint.sha256, gpu=False)(decode(cfg, Shard(3)))
    assert scored.column("scores").to_pylist() == [None]


def test_the_scorer_refuses_a_checkpoint_changed_since_the_job_started(tmp_path: Path) -> None:
    path = str(tmp_path / "mae.pth")
    torch.manual_seed(0)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), path)
    sha256 = ltrp.load_mae(path).checkpoint.sha256
    cfg = score_config(tmp_path, path)
    assert ShardScorer(cfg, sha256, gpu=False).mae.checkpoint.sha256 == sha256
    torch.manual_seed(1)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]), path)  # replaced under the job
    with pytest.raises(RuntimeError, match="changed since the job started"):
        ShardScorer(cfg, sha256, gpu=False)


# -- the job's fingerprint --------------------------------------------------------------------------


def _corpus(tmp_path: Path) -> Path:
    write_shard(tmp_path / "corpus", 0, {"a.png": image(0, 20, 20), "b.png": image(1, 20, 20)})
    return tmp_path / "corpus"


def _scores(cfg: ScoreConfig) -> ShardedOutput:
    """The output folder of `cfg`'s job (what a resume checks is the same for any file groups)."""
    return score_output(cfg.output, FileGroups(size=1, shards=1))


def test_the_fingerprint_holds_every_identity_field_and_what_is_derived(
    tmp_path: Path, mae_path: str, mae: ltrp.MAE
) -> None:
    cfg = ScoreConfig(source=str(_corpus(tmp_path)), mae=mae_path, output=str(tmp_path / "out"), shard_size=1)
    shards = plan_corpus(cfg.source, cfg.shard_size).shards
    metadata = job_metadata(cfg)

    names = {f.name for f in dataclasses.fields(ScoreConfig)}
    assert names >= MAY_CHANGE and set(identity_fields(cfg)) == names - MAY_CHANGE
    derived = {"plan_digest", "layout", "mae_sha256", "mae_config"}
    assert metadata["fingerprint"] == sorted((names - MAY_CHANGE) | derived)
    assert all(metadata[name] == getattr(cfg, name) for name in names - MAY_CHANGE)
    assert metadata["plan_digest"] == plan_digest(shards) != plan_digest(shards[:1])
    assert metadata["layout"] == OUTPUT_LAYOUT  # an output of another layout is not resumed
    assert metadata["mae_sha256"] == mae.checkpoint.sha256 and metadata["mae_uri"] == mae_path
    assert metadata["mae_config"] == dataclasses.asdict(mae.cfg)
    assert json.loads(json.dumps(metadata)) == metadata  # what a resume compares, after the JSON file


def test_every_identity_field_is_covered_here(tmp_path: Path) -> None:
    assert set(RESULT_CHANGES) == set(identity_fields(score_config(tmp_path)))


@pytest.mark.parametrize("field", sorted(RESULT_CHANGES))
def test_a_resume_with_another_identity_setting_is_refused(tmp_path: Path, mae_path: str, field: str) -> None:
    cfg = score_config(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    _scores(cfg).claim(job_metadata(cfg))
    value = RESULT_CHANGES[field]
    if field == "source":
        value = str(shutil.copytree(cfg.source, tmp_path / value))
    # encoder mode records its slot; the plan names the images' URIs and cuts the shards
    derived = {
        "mode": "encoder_slot, mode",
        "source": "plan_digest, source",
        "shard_size": "plan_digest, shard_size",
    }
    differs = derived.get(field, field)
    with pytest.raises(ValueError, match=rf"differs in: {differs}\)"):
        _scores(cfg).check(job_metadata(dataclasses.replace(cfg, **{field: value})))


def test_a_job_on_an_output_of_another_is_refused_before_any_work(tmp_path: Path, mae_path: str) -> None:
    cfg = score_config(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    ScoreJob(cfg).out.claim(ScoreJob(cfg).metadata)
    with pytest.raises(InputError, match=r"differs in: seed\)"):
        ScoreJob(dataclasses.replace(cfg, seed=1))


def test_an_encoder_mode_table_of_the_dropped_slot_kind_is_not_resumed(tmp_path: Path, mae_path: str) -> None:
    cfg = score_config(tmp_path, mae_path, mode="encoder", source=str(_corpus(tmp_path)))
    metadata = job_metadata(cfg)
    assert metadata["encoder_slot"] == "mask_token" and "encoder_slot" in metadata["fingerprint"]
    decoder = job_metadata(dataclasses.replace(cfg, mode="decoder"))
    assert "encoder_slot" not in decoder  # decoder mode is unchanged: its older tables still resume
    # An encoder-mode table written before v's slot held the mask token: the same, without the key.
    older = {k: v for k, v in metadata.items() if k != "encoder_slot"}
    older["fingerprint"] = [k for k in metadata["fingerprint"] if k != "encoder_slot"]
    _scores(cfg).claim(older)
    with pytest.raises(ValueError, match=r"differs in: encoder_slot\)"):
        _scores(cfg).check(metadata)


def test_a_resume_with_other_execution_settings_is_the_same_job(tmp_path: Path, mae_path: str) -> None:
    cfg = score_config(tmp_path, mae_path, source=str(_corpus(tmp_path)))
    _scores(cfg).claim(job_metadata(cfg))
    moved = str(tmp_path / "moved.pth")
    shutil.copy(mae_path, moved)  # the same bytes elsewhere
    execution = {"workers": 3, "max_workers": 5, "worker_cpus": 2.0, "threads": 1, "device": "cpu"}
    faster = dataclasses.replace(cfg, mae=moved, batch_size=7, **execution)
    assert _scores(cfg).check(job_metadata(faster)) is True
