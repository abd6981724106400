"""The scoring job end to end, on real parts: a local Ray cluster, a moto S3 server, an MLflow server,
Fashion-MNIST and scikit-image photos."""

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import skimage.data
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from support import fashion_mnist, fashion_mnist_pngs

import ltrp
from ltrp.data.checkpoints import CheckpointError
from ltrp.data.images import View, render_view, to_model_input
from ltrp.data.sources import read_bytes
from ltrp.data.tables import JOB_FILE, SCORES_SCHEMA, read_errors, read_scores
from ltrp.pipeline.configs import InputError, ScoreConfig
from ltrp.pipeline.corpus_job import CorpusSummary
from ltrp.pipeline.lease import Lease, LeaseHeld
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.training_data import read_scores_dataset

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format=fmt)
    return buf.getvalue()


def _photo_tar() -> bytes:
    """A WebDataset shard: photo{k}.jpg with its class in photo{k}.cls (or .json for the last)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k, name in enumerate(PHOTOS):
            members = {f"photo{k}.jpg": _encode(getattr(skimage.data, name)(), "JPEG")}
            if k < len(PHOTOS) - 1:
                members[f"photo{k}.cls"] = str(k).encode()
            else:
                members[f"photo{k}.json"] = json.dumps({"label": k}).encode()
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _save_tiny(path: Path, geometry: str = "mae_vit_tiny_patch8") -> str:
    torch.manual_seed(0)
    ltrp.save_mae(ltrp.MAE(ltrp.GEOMETRIES[geometry]), str(path))
    return str(path)


def _write(cfg: ScoreConfig) -> CorpusSummary:
    """The scoring job without MLflow, on the session's Ray cluster."""
    return ScoreJob(cfg).write()


def _job(*args: str, capsys: pytest.CaptureFixture) -> str:
    """`python -m jobs.score ARGS`'s main, in this process, on the session's Ray cluster (a new
    interpreter would only add its imports; the kill test runs the job as a process). Its output."""
    from jobs.score import main

    main(list(args))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("mae") / "tiny.pth")


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint: str) -> str:
    """200 Fashion-MNIST PNGs in ImageFolder layout, and a tar shard of 5 photos, on S3."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("corpus")
    fs.pipe({f"corpus/fmnist/{name}": png for name, png in fashion_mnist_pngs(200).items()})
    fs.pipe_file("corpus/fmnist/photos-000.tar", _photo_tar())
    return "s3://corpus/fmnist"


@pytest.mark.slow
def test_scores_a_real_corpus_from_s3_to_s3(
    s3_corpus: str, checkpoint: str, job_in_process: Path, mlflow_uri: str, capsys: pytest.CaptureFixture
) -> None:
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("scores")
    out = "s3://scores/run1"
    # Shards of 64 rows in scoring batches of 24 over two actors: each shard's rows are committed
    # by the workers from parts staged on S3.
    args = ("--source", s3_corpus, "--mae", checkpoint, "--output", out, "--shard-size", "64")
    stdout = _job(*args, "--batch-size", "24", "--workers", "2", capsys=capsys)
    assert "scored 205 images (205 rows)" in stdout and "0 errors" in stdout

    table = pq.read_table("s3://scores/run1/scores")  # plain pyarrow, through AWS_ENDPOINT_URL_S3
    assert table.schema.remove_metadata() == SCORES_SCHEMA
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 205
    rows = {r["image_id"]: r for r in table.to_pylist()}
    _, labels = fashion_mnist(200)
    assert all(rows[f"{label}/{i:04d}.png"]["label"] == str(label) for i, label in enumerate(labels))
    assert [rows[f"photo{k}"]["label"] for k in range(5)] == ["0", "1", "2", "3", "4"]
    assert rows["photo1"]["uri"] == "s3://corpus/fmnist/photos-000.tar#photo1.jpg"
    meta = json.loads(table.schema.metadata[b"ltrp"])
    assert meta["mae_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.exists("scores/run1/_SUCCESS") and not fs.exists("scores/run1/_parts")
    assert fs.ls("scores/run1/scores") == ["scores/run1/scores/part-00000.parquet"]  # 4 shards, one file
    assert not fs.exists("scores/run1/_shards")
    assert json.loads(fs.cat_file("scores/run1/_ltrp_job.json"))["mae_sha256"] == meta["mae_sha256"]

    # The stored scores are those of loo_scores on the stored views, replayed from the source bytes.
    mae = ltrp.load_mae(checkpoint)
    sample = [rows[i] for i in sorted(rows)[::20]] + [rows[f"photo{k}"] for k in range(5)]
    pixels = np.stack(
        [render_view(read_bytes(r["uri"]), View(tuple(r["crop_box"]), r["flip"]), 64) for r in sample]
    )
    expected = ltrp.loo_scores(mae, to_model_input(pixels), torch.tensor([r["visible"] for r in sample]))
    np.testing.assert_allclose(
        np.array([r["scores"] for r in sample]), expected.numpy(), rtol=1e-5, atol=1e-7
    )

    threes = read_scores(out, columns=["image_id", "label"], filters=[("label", "=", "3")])
    assert threes.column_names == ["image_id", "label"]
    assert threes.num_rows == int((labels == 3).sum()) + 1  # and photo3, whose cls is 3
    assert read_scores_dataset(out).count() == 205

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ltrp-score").experiment_id],
        filter_string="tags.output_uri = 's3://scores/run1'",
    )
    assert run.data.metrics["images"] == 205 and run.data.metrics["errors"] == 0
    assert run.data.metrics["images_per_second"] > 0 and run.data.params["source"] == s3_corpus


def test_bad_and_odd_files_are_recorded_or_scored(tmp_path: Path, ray_address: str, checkpoint: str) -> None:
    photo = skimage.data.coffee()
    folder = tmp_path / "odd"
    folder.mkdir()
    files = {
        "good.jpg": _encode(photo, "JPEG"),
        "truncated.jpg": _encode(photo, "JPEG")[:2000],
        "empty.jpg": b"",
        "text.jpg": b"this is text, not a JPEG",
        "gray16.png": _encode((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)),
        "cmyk.jpg": _encode(photo, "JPEG", mode="CMYK"),
        "rgba.png": _encode(photo, "PNG", mode="RGBA"),
        "tiny.png": _encode(photo[:4, :4]),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # 144 Mpx in a few kB
    out = tmp_path / "out"
    summary = _write(ScoreConfig(source=str(folder), mae=checkpoint, output=str(out), shard_size=4))
    errors = {r["image_id"]: r["reason"] for r in read_errors(str(out)).to_pylist()}
    assert set(errors) == {"truncated.jpg", "empty.jpg", "text.jpg", "tiny.png", "bomb.png"}
    assert "empty" in errors["empty.jpg"] and "too small" in errors["tiny.png"]
    assert "too large" in errors["bomb.png"] and "cannot decode" in errors["text.jpg"]
    assert "truncated" in errors["truncated.jpg"]
    scored = read_scores(str(out))
    assert sorted(scored.column("image_id").to_pylist()) == ["cmyk.jpg", "good.jpg", "gray16.png", "rgba.png"]
    assert summary.errors == 5 and summary.images == 4 and (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_same_seed_same_table_other_seed_refused(tmp_path: Path, ray_address: str, checkpoint: str) -> None:
    """Two runs with one seed write equal tables, views and scores; a run with another seed on a
    finished output is refused, since it would resume it. (That another seed draws other crops, flips
    and visible sets: test_shards.py, on the decode stage, without two more Ray jobs.)"""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    runs = {}
    for name in ("a", "b"):
        cfg = ScoreConfig(
            source=str(folder),
            mae=checkpoint,
            output=str(tmp_path / name),
            views=3,
            crop="random",
            flip=True,
            seed=3,
            shard_size=2,
        )
        _write(cfg)
        runs[name] = read_scores(cfg.output).sort_by([("image_id", "ascending"), ("view", "ascending")])
    assert runs["a"].num_rows == 15 and runs["a"].equals(runs["b"])
    assert {f for f in runs["a"].column("flip").to_pylist()} == {True, False}
    with pytest.raises(InputError, match="differs in: seed"):
        _write(replace(cfg, seed=1))


def test_an_output_another_job_is_writing_is_refused_before_any_work(tmp_path: Path, checkpoint: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")
    out = tmp_path / "out"
    cfg = ScoreConfig(source=str(folder), mae=checkpoint, output=str(out))
    with Lease(str(out), "jobs.score"), pytest.raises(LeaseHeld, match=r"is being written by jobs\.score"):
        _write(cfg)  # a second job started on the same output
    assert not (out / JOB_FILE).exists() and not (out / "scores").exists()


def test_bad_checkpoint_fails_before_any_work(tmp_path: Path, checkpoint: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")
    with pytest.raises(InputError, match=r"missing\.pth") as missing:
        _write(
            ScoreConfig(source=str(folder), mae=str(tmp_path / "missing.pth"), output=str(tmp_path / "out"))
        )
    assert isinstance(missing.value.__cause__, FileNotFoundError)
    state = torch.load(checkpoint, weights_only=True)["model"]
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain_vit_tiny.pth")
    with pytest.raises(InputError, match="encoder only") as refused:
        _write(
            ScoreConfig(
                source=str(folder),
                mae=str(tmp_path / "mae_pretrain_vit_tiny.pth"),
                output=str(tmp_path / "out"),
            )
        )
    assert isinstance(refused.value.__cause__, CheckpointError)
    assert not (tmp_path / "out").exists()
