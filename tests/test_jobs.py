"""The launchers, run as users run them: `python -m jobs.<name>` in a subprocess."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from PIL import Image

import ltrp
from ltrp.images import decode_center_crop, to_model_input

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Real photos in nested folders, and files that cannot be decoded."""
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "misc").mkdir()
    Image.fromarray(skimage.data.chelsea()).save(root / "cats" / "chelsea.jpg")
    Image.fromarray(skimage.data.camera()).save(root / "misc" / "camera.png")  # grayscale
    Image.fromarray(skimage.data.coffee()).convert("RGBA").save(root / "misc" / "coffee_rgba.png")
    buf = io.BytesIO()
    Image.fromarray(skimage.data.rocket()).save(buf, format="JPEG")
    (root / "misc" / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "misc" / "empty.jpg").write_bytes(b"")
    (root / "misc" / "text.jpg").write_text("not an image")
    (root / "misc" / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_score_job_scores_good_images_and_records_bad_ones(image_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = ltrp.MAE(ltrp.GEOMETRIES["mae_vit_tiny_patch8"]).eval()
    ltrp.save_mae(mae, str(tmp_path / "mae.pth"))
    out = tmp_path / "out"
    stdout = _run(
        "jobs.score",
        "--images",
        str(image_folder),
        "--mae",
        str(tmp_path / "mae.pth"),
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--mask-ratio",
        "0.75",
        "--seed",
        "5",
    )
    assert "scored 3 images (3 skipped)" in stdout

    table = pq.read_table(out / "scores.parquet")
    assert table.column("image_id").to_pylist() == [
        "cats/chelsea.jpg",
        "misc/camera.png",
        "misc/coffee_rgba.png",
    ]
    meta = json.loads(table.schema.metadata[b"ltrp"])
    assert meta["mae_sha256"] and meta["mask_ratio"] == 0.75 and meta["seed"] == 5
    errors = {r["image_id"]: r["reason"] for r in pq.read_table(out / "errors.parquet").to_pylist()}
    assert set(errors) == {"misc/truncated.jpg", "misc/empty.jpg", "misc/text.jpg"}
    assert "empty" in errors["misc/empty.jpg"]

    ids = table.column("image_id").to_pylist()
    pixels = np.stack([decode_center_crop((image_folder / i).read_bytes(), 64) for i in ids])
    visible = ltrp.visible_sets(ids, grid=8, mask_ratio=0.75, seed=5)
    expected = ltrp.loo_scores(mae, to_model_input(pixels), visible)
    assert table.column("visible").to_pylist() == visible.tolist()
    np.testing.assert_allclose(np.array(table.column("scores").to_pylist()), expected.numpy(), rtol=1e-5)


def test_score_job_demo_defaults_run_from_nothing(tmp_path: Path) -> None:
    stdout = _run("jobs.score", cwd=tmp_path)  # the README's main command, in an empty folder
    assert "randomly initialised demo MAE" in stdout
    assert "scored 7 images (0 skipped)" in stdout
    assert pq.read_table(tmp_path / "runs/demo/scores/scores.parquet").num_rows == 7


def test_benchmark_prints_both_paths_side_by_side() -> None:
    stdout = _run(
        "jobs.bench_scoring", "--geometries", "mae_vit_tiny_patch8", "--batch-size", "2", "--repeats", "1"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    assert "reference loop" in lines[0] and "img/s" in lines[0]
    assert "batched" in lines[1] and "x reference" in lines[1]
