"""The pre-training comparison (MAE vs FOLK vs MFM vs none): its pieces, and a tiny run end to end."""

import json
from pathlib import Path

import pytest
import torch

from jobs.experiments import pretraining
from jobs.experiments.pretraining import PretrainingArgs, _data, _task
from ltrp.pipeline.training_loop import Worker


def test_the_memory_stream_shows_every_image_once_per_pass_across_units() -> None:
    """Units of 12 images in 3 batches over 10 images: passes straddle units, and none repeats or skips
    an image."""
    pixels = torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 32, 32, 3).contiguous()
    task = _task(PretrainingArgs(dataset="fashion_mnist", batch_size=4), "mae", 0, pixels, images=12)
    assert task.steps == 3
    seen = [int(b["image"][i, 0, 0, 0]) for unit in range(5) for b in task.batches(unit, Worker(0, 1, None))
            for i in range(len(b["image"]))]  # fmt: skip
    assert len(seen) == 60
    assert all(sorted(seen[p * 10 : (p + 1) * 10]) == list(range(10)) for p in range(6))
    assert seen[:10] != seen[10:20]  # each pass its own shuffle


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arms", "none", "folk"], "--arms: the compute budget is MAE's"),
        (
            ["--dataset", "fashion_mnist", "--arms", "mae", "shipped"],
            "--arms shipped: the shipped MAE is a scenes",
        ),
        (
            ["--pretrain-images", "10", "--labelled-images", "20"],
            "--labelled-images: at most --pretrain-images",
        ),
    ],
)
def test_settings_that_cannot_run_are_refused_before_any_work(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match=message):
        pretraining.main([*argv, "--root", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_tiny_comparison_writes_its_table_figure_and_numbers(tmp_path: Path) -> None:
    root = tmp_path / "run"
    # fmt: off
    result = pretraining.main([
        "--dataset", "fashion_mnist", "--arms", "none", "mae", "folk", "--seeds", "0", "1",
        "--pretrain-images", "64", "--labelled-images", "32", "--test-images", "32", "--batch-size", "16",
        "--mae-epochs", "10", "--fine-tune-epochs", "1", "--linear-epochs", "2", "--root", str(root),
        "--no-tracking",
    ])
    # fmt: on
    flops = result["gflops_per_image"]
    assert flops["none"] == 0 and flops["folk"] > 2 * flops["mae"]  # all patches, and a teacher
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert runs["folk", 0]["steps"] < runs["mae", 0]["steps"]  # fewer steps for the same FLOPs
    assert runs["folk", 0]["budget_used"] == pytest.approx(1.0, abs=0.1)
    assert runs["mae", 0]["budget_used"] == pytest.approx(1.0, abs=0.1)
    assert [round(done, 2) for done, _ in runs["mae", 1]["curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert all(0 <= r[p] <= 1 for r in result["runs"] for p in ("linear", "fine_tuned"))
    gap = result["summary"]["folk"]["linear_minus_mae"]["mean"]
    assert gap == pytest.approx(sum(runs["folk", s]["linear"] - runs["mae", s]["linear"] for s in (0, 1)) / 2)
    table = (root / "pretraining.md").read_text()
    assert all(f"| {arm} |" in table for arm in ("none", "mae", "folk")) and "top-1" in table
    assert json.loads((root / "pretraining.json").read_text())["summary"] == result["summary"]
    assert (root / "pretraining.png").stat().st_size > 10_000


def test_the_labelled_images_are_a_sample_of_every_class(tmp_path: Path) -> None:
    """An ImageFolder lists its images class by class: the first ones would be one or two classes."""
    args = PretrainingArgs(dataset="fashion_mnist", pretrain_images=200, labelled_images=40, test_images=20)
    data = _data(args, tmp_path)
    assert data.pixels.shape == (200, 32, 32, 3) and data.x_labelled.shape == (40, 3, 32, 32)
    assert len(data.y_labelled.unique()) >= 8
