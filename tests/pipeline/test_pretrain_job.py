"""MAE pre-training: the loss and masking in pure torch, the data stage, and the job end to end on a
real local Ray cluster with a real MLflow server."""

import io
import json
import math
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import ray.train
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from support import fashion_mnist, fashion_mnist_pngs, png_bytes

import ltrp
from ltrp.core.folk import Folk
from ltrp.core.mae import random_visible
from ltrp.core.optim import param_groups
from ltrp.core.probe import Probe
from ltrp.core.pruned import vit_from_mae
from ltrp.data.images import to_model_input
from ltrp.data.sources import Shard
from ltrp.pipeline import pretrain_job, trainer
from ltrp.pipeline.configs import PretrainConfig, option
from ltrp.pipeline.pretrain_job import FrequencyTask, ViewBatches, folk_config, mae_config, read_tasks
from ltrp.pipeline.training_data import images_dataset, read_images
from ltrp.pipeline.training_loop import Worker, read_state

ROOT = Path(__file__).resolve().parents[2]


def _fmnist_batch(count: int, size: int) -> torch.Tensor:
    images, _ = fashion_mnist(count)
    rgb = [np.asarray(Image.fromarray(x).convert("RGB").resize((size, size), Image.BICUBIC)) for x in images]
    return to_model_input(np.stack(rgb))


def test_random_visible_is_sorted_distinct_of_mae_count_and_seeded() -> None:
    visible = random_visible(6, 196, 0.9, generator=torch.Generator().manual_seed(1))
    assert visible.shape == (6, 19) and visible.dtype == torch.long  # int(196 * 0.1) = 19, MAE's count
    assert (visible.diff(dim=1) > 0).all() and visible.min() >= 0 and visible.max() < 196
    assert len({tuple(row.tolist()) for row in visible}) == 6  # per-sample masks
    again = random_visible(6, 196, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(visible, again)
    assert random_visible(2, 64, generator=torch.Generator()).shape == (2, 16)  # default ratio 0.75


def test_norm_pix_targets_standardise_each_patch_and_raw_targets_are_the_patches() -> None:
    imgs = torch.randn(2, 3, 64, 64) * 3 + 1
    raw = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"])
    norm = ltrp.MAE(replace(ltrp.GEOMETRIES["mae_vit_tiny_patch8"], norm_pix=True))
    assert torch.equal(raw.targets(imgs), raw.patchify(imgs))
    patch = raw.patchify(imgs)[1, 5]
    expected = (patch - patch.mean()) / torch.sqrt(patch.var() + 1e-6)
    torch.testing.assert_close(norm.targets(imgs)[1, 5], expected)


def test_loss_is_mse_on_masked_patches_only(tiny_mae: ltrp.MAE) -> None:
    imgs = torch.randn(2, 3, 64, 64)
    visible = random_visible(2, 64, generator=torch.Generator().manual_seed(0))
    target = tiny_mae.patchify(imgs)
    pred = target + 1.0  # error 1 everywhere ...
    pred.scatter_(1, visible.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), 50.0)  # ... but visible patches
    assert tiny_mae.forward_loss(imgs, pred, visible).item() == pytest.approx(1.0)


def test_a_few_steps_on_fashion_mnist_lower_the_loss() -> None:
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"])
    imgs = _fmnist_batch(32, 64)
    fixed = random_visible(32, 64, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(param_groups(mae, 0.05), lr=1e-3, betas=(0.9, 0.95))
    with torch.no_grad():
        before = mae.forward_loss(imgs, mae(imgs, fixed), fixed).item()
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):  # 30 steps ended at 0.60-0.62 of the start over seeds 0-2: too close to call
        visible = random_visible(32, 64, generator=generator)
        loss = mae.forward_loss(imgs, mae(imgs, visible), visible)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = mae.forward_loss(imgs, mae(imgs, fixed), fixed).item()
    assert after < 0.6 * before


def test_views_change_with_the_epoch_and_bad_images_are_skipped_and_listed() -> None:
    png = png_bytes(fashion_mnist(1)[0][0])
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "uri": np.array(["u/a.png", "u/b.png", "u/c.png"], dtype=object),
        "data": np.array([png, b"not an image", None], dtype=object),
        "error": np.array([None, None, "cannot read file: gone"], dtype=object),
    }
    out = ViewBatches(32, 0, seed=0, crop="random", flip=True)(batch)
    assert out["image"].shape == (1, 32, 32, 3) and out["image"].dtype == torch.uint8
    assert [u for u, _ in out["skipped"]] == ["u/b.png", "u/c.png"]
    assert "gone" in out["skipped"][1][1]
    same = ViewBatches(32, 0, seed=0, crop="random", flip=True)(batch)["image"]
    other = ViewBatches(32, 1, seed=0, crop="random", flip=True)(batch)["image"]
    assert torch.equal(out["image"], same) and not torch.equal(out["image"], other)


def test_max_images_takes_the_first_images_of_the_sorted_source_then_tar_members(
    tmp_path: Path, ray_address: str
) -> None:
    pngs = fashion_mnist_pngs(15)
    names = sorted(pngs)
    for name in names[:10]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(pngs[name])
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for k, name in enumerate(names[10:]):
            info = tarfile.TarInfo(f"{k:03d}.png")
            info.size = len(pngs[name])
            tar.addfile(info, io.BytesIO(pngs[name]))
    cfg = PretrainConfig(source=str(tmp_path), output="unused", shard_size=4, max_images=12)
    reads, count = read_tasks(cfg)
    tables = [read_images({k: np.array([v]) for k, v in read.items()}) for read in reads]
    rows = [row for table in tables for row in table.to_pylist()]
    assert count == 12 == len(rows)
    assert sorted(r["image_id"] for r in rows[:10]) == names[:10]  # every file, in a shuffled order
    assert [r["image_id"] for r in rows[:10]] != names[:10]
    assert [r["image_id"] for r in rows[10:]] == ["000", "001"]  # then the tar's first members
    assert Shard.from_json(reads[-1]["shard"]).tar is not None and reads[-1]["limit"] == 2
    assert read_tasks(cfg) == (reads, count)  # deterministic
    everything, total = read_tasks(replace(cfg, max_images=None))
    assert total == 15 and everything[-1]["limit"] == 5


def test_norm_pix_is_recorded_in_the_saved_mae(tmp_path: Path) -> None:
    cfg = mae_config(PretrainConfig(source="x", output="y", geometry="mae_vit_tiny_patch8", norm_pix=True))
    ltrp.save_mae(ltrp.MAE(cfg), str(tmp_path / "mae.pth"))
    assert ltrp.load_mae(str(tmp_path / "mae.pth")).cfg == cfg and cfg.norm_pix


def _pretrain(tmp_path: Path, capsys: pytest.CaptureFixture, epochs: int, *extra: str) -> str:
    """`python -m jobs.pretrain_mae ...`'s main, in this process: on the session's Ray cluster, without
    paying a new interpreter's imports for each of the three launches (the CLI's exit codes are tested
    in subprocesses elsewhere). Returns what it printed."""
    from jobs.pretrain_mae import main

    # fmt: off
    main([
        "--source", str(tmp_path / "images"), "--output", str(tmp_path / "mae.pth"),
        "--storage", str(tmp_path / "ckpt"), "--name", "fmnist", "--geometry", "mae_vit_tiny_patch8",
        "--epochs", str(epochs), "--batch-size", "32", "--lr", "1e-3", "--crop", "random", "--flip",
        "--sample-images", "4", *extra,
    ])
    # fmt: on
    return capsys.readouterr().out


@pytest.mark.faults  # three launches, one a relaunch (~3 min): with the other re-runs, outside make test
def test_the_job_pretrains_checkpoints_logs_and_resumes(
    job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    tmp_path = job_in_process
    images = tmp_path / "images"
    for name, data in fashion_mnist_pngs(48).items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    (images / "0" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")

    stdout = _pretrain(tmp_path, capsys, epochs=1)
    assert "this run started at epoch 0" in stdout and "skipped 1 unreadable images" in stdout
    mae = ltrp.load_mae(str(tmp_path / "mae.pth"))  # strict: every official name, nothing else
    assert mae.cfg == ltrp.GEOMETRIES["mae_vit_tiny_patch8"] and mae.checkpoint.format == "ltrp"
    visible = ltrp.visible_sets(["a", "b"], grid=8, mask_ratio=0.75)
    scores = ltrp.loo_scores(mae, _fmnist_batch(2, 64), visible)
    assert scores.shape == (2, 16) and torch.isfinite(scores).all() and (scores > 0).any()

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("ltrp-pretrain")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.output = '{tmp_path / 'mae.pth'}'")
    assert run.data.params["geometry"] == "mae_vit_tiny_patch8" and run.data.params["norm_pix"] == "False"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0] and all(np.isfinite(m.value) for m in losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [0]
    assert run.data.metrics["skipped_images"] == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "reconstructions", "skipped_images.json"} <= artifacts
    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "reconstructions"))
    assert grids == ["reconstructions/epoch_000.png"]
    grid = Image.open(client.download_artifacts(run.info.run_id, grids[-1], str(tmp_path)))
    assert grid.size == (3 * 2 * 64, 4 * 2 * 64)  # original | masked | reconstruction, 4 images, zoom 2
    skipped = json.loads(Path(client.download_artifacts(run.info.run_id, "skipped_images.json")).read_text())
    assert [Path(s["uri"]).name for s in skipped] == ["9999.png"] and "cannot decode" in skipped[0]["reason"]

    checkpoints = tmp_path / "ckpt" / "fmnist"
    assert len([p for p in checkpoints.glob("checkpoint_*") if p.is_dir()]) == 1
    again = _pretrain(tmp_path, capsys, 2, "--keep-checkpoints", "1")  # same name: resumes after epoch 0
    assert "this run started at epoch 1" in again
    (kept,) = [p for p in checkpoints.glob("checkpoint_*") if p.is_dir()]  # epoch 0's pruned, the latest kept
    assert torch.load(kept / "state.pt", weights_only=False)["epoch"] == 1
    # ... in the same MLflow run: one training, one run, its history continued.
    (rerun,) = client.search_runs([experiment.experiment_id], f"tags.output = '{tmp_path / 'mae.pth'}'")
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [0, 1]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == [0, 1]
    assert rerun.data.params["epochs"] == "1" and rerun.data.tags["relaunched_with.epochs"] == "2"
    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "reconstructions"))
    assert grids[-1] == "reconstructions/epoch_001.png" and len(grids) == 2
    resumed = ltrp.load_mae(str(tmp_path / "mae.pth"))
    assert resumed.cfg == mae.cfg and resumed.checkpoint.sha256 != mae.checkpoint.sha256

    finished = _pretrain(tmp_path, capsys, epochs=2)  # nothing left to do, no worker started: same MAE
    assert "this run started at epoch 2" in finished
    rewritten = ltrp.load_mae(str(tmp_path / "mae.pth"))
    assert torch.equal(rewritten.decoder_pred.weight, resumed.decoder_pred.weight)
    (last,) = client.search_runs([experiment.experiment_id], f"tags.output = '{tmp_path / 'mae.pth'}'")
    assert last.info.run_id == run.info.run_id  # still the one run, and no epoch logged twice
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [0, 1]


def test_a_source_without_images_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.pretrain_mae import main

    with pytest.raises(SystemExit) as exit_:
        main(["--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "mae.pth")])
    assert exit_.value.code == 2
    assert f"--source: image source not found: {tmp_path / 'nothing'}" in capsys.readouterr().err
    assert not (tmp_path / "mae.pth").exists()


# -- frequency-masked pre-training (FOLK, MFM) ------------------------------------------------------------
def _images(folder: Path, count: int) -> Path:
    for name, data in fashion_mnist_pngs(count).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _frequency_cfg(tmp_path: Path, name: str, **changes: object) -> PretrainConfig:
    """A deterministic filter (one kind, one tau), so that how images are dealt to workers cannot matter."""
    cfg = PretrainConfig(
        source=str(tmp_path / "images"), output=str(tmp_path / f"{name}.pth"), name=name,
        storage=str(tmp_path / "ckpt"), geometry="mae_vit_tiny_patch8", objective="frequency",
        filters=("com",), taus=(0.05,), epochs=1, batch_size=8, lr=1e-3, sample_images=0,
    )  # fmt: skip
    return replace(cfg, **changes)


def _state(result: ray.train.Result) -> dict[str, torch.Tensor]:
    return read_state(result.checkpoint)["model"]


def _moved(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.cat([(state[k] - start[k]).flatten() for k in start if k.startswith(prefix)])


@pytest.mark.slow
def test_frequency_pretraining_on_two_workers_takes_one_workers_steps_and_logs_restorations(
    job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """The launcher with 2 DDP workers of 4 images a step against the library with 1 worker of 8: the
    same step for student and teacher. The MAE it writes loads, and the probe and the ViT take it."""
    from jobs.pretrain_mae import main

    tmp_path = job_in_process
    _images(tmp_path / "images", 8)
    two = _frequency_cfg(tmp_path, "two", workers=2, batch_size=4, sample_images=2)
    main(_argv(two))
    assert "pre-trained mae_vit_tiny_patch8 (objective frequency) for 1 epochs" in capsys.readouterr().out
    (checkpoint,) = (tmp_path / "ckpt" / "two").glob("checkpoint_*/state.pt")
    by_two = torch.load(checkpoint, weights_only=True)["model"]
    by_one = _state(pretrain_job.fit(_frequency_cfg(tmp_path, "one")))

    torch.manual_seed(0)  # as the training loop seeds every worker before building
    start = Folk(ltrp.MAE(mae_config(two)), folk_config(two)).state_dict()
    for part in ("student.", "teacher.", "distill_head."):
        one_step, two_steps = _moved(by_one, start, part), _moved(by_two, start, part)
        assert one_step.abs().mean() > 0, part
        assert (two_steps - one_step).abs().mean() < 0.01 * one_step.abs().mean(), part

    mae = ltrp.load_mae(two.output)  # strict: the student, in the official layout
    assert all(torch.equal(v, by_two[f"student.{k}"]) for k, v in mae.state_dict().items())
    images = _fmnist_batch(2, 64)
    assert Probe(mae, num_classes=3)(images).shape == (2, 3) and vit_from_mae(mae, 3)(images).shape == (2, 3)
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("ltrp-pretrain")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.output = '{two.output}'")
    assert run.data.params["objective"] == "frequency" and run.data.params["filters"] == "('com',)"
    (grid,) = client.list_artifacts(run.info.run_id, "restorations")
    picture = Image.open(client.download_artifacts(run.info.run_id, grid.path, str(tmp_path)))
    assert picture.size == (3 * 2 * 64, 2 * 2 * 64)  # original | filtered | restored, 2 images, zoom 2


def _argv(cfg: PretrainConfig) -> list[str]:
    """`cfg` as the launcher's options."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    argv = []
    for name, value in values.items():
        argv += [option(name), *map(str, value)] if isinstance(value, tuple) else [option(name), str(value)]
    return argv


class _LosesAWorkerInEpoch1(FrequencyTask):
    """Fails the first time epoch 1 starts (a marker file remembers it across the restarted workers)."""

    def __init__(self, cfg: PretrainConfig, marker: Path) -> None:
        super().__init__(cfg, [], np.zeros((0, 64, 64, 3), np.uint8))
        self.marker = marker

    def batches(self, epoch: int, worker: Worker) -> Iterator[dict]:
        if epoch == 1 and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("worker lost")
        yield from super().batches(epoch, worker)


@pytest.mark.faults
def test_a_restarted_frequency_pretraining_continues_its_schedule_teacher_included(
    tmp_path: Path, ray_address: str
) -> None:
    """Ray Train restarts the worker group from epoch 0's checkpoint: epoch 1 then runs as it would
    have (learning rate, teacher momentum, the teacher itself), and ends where an unbroken run ends."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    _images(tmp_path / "images", 8)
    straight = _frequency_cfg(tmp_path, "straight", epochs=2, filters=("com", "rcom"), taus=(0.01, 0.05))
    unbroken = read_state(pretrain_job.fit(straight).checkpoint)
    broken = replace(straight, name="broken", max_failures=1)
    reads, count = read_tasks(broken)
    settings = trainer.settings(broken, steps_per_epoch=math.ceil(count / broken.batch_size), lr=broken.lr)
    task = _LosesAWorkerInEpoch1(broken, tmp_path / "lost")
    resumed = read_state(trainer.fit(settings, task, {"train": images_dataset(reads)}).checkpoint)
    assert (tmp_path / "lost").exists() and resumed["epoch"] == unbroken["epoch"] == 1
    torch.testing.assert_close(resumed["history"], unbroken["history"])
    weights = unbroken["model"]
    lags = weights["teacher.blocks.0.attn.qkv.weight"] - weights["student.blocks.0.attn.qkv.weight"]
    assert lags.abs().max() > 1e-4  # the teacher is its own state, not a copy of the student
    torch.testing.assert_close(resumed["model"], unbroken["model"], atol=1e-6, rtol=1e-4)
