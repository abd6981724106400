"""The cheaper-ViT experiment's settings and data split (its parts: tests/evaluation/test_efficiency.py,
tests/core/test_pruned.py), without running it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.experiments import pruned
from jobs.experiments.pruned import PrunedArgs
from ltrp.evaluation.protocol import LabelledImages, format_interval, t_interval


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 256}, "--width: the ViT's shape is the MAE encoder's with --init mae"),
        ({"depth": 2, "heads": 2}, "--depth, --heads: the ViT's shape"),
        ({"fine_tuned": ("ltrp", "edges")}, r"--fine-tuned: unknown method\(s\) \['edges'\]"),
        ({"init": "scratch", "backbone": "folk.pth"}, "--backbone: a ViT with --init scratch starts"),
        ({"dataset": "fashion_mnist", "backgrounds": ("faint",)}, "--backgrounds: scenes only"),
        ({"fine_tune_seeds": 0}, "--fine-tune-seeds: at least 1, not 0"),
    ],
)
def test_settings_that_cannot_run_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrunedArgs(**settings)


def test_the_command_refuses_them_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        pruned.main(["--root", str(tmp_path / "run"), "--width", "256"])
    assert "--width: the ViT's shape" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_scratch_vit_takes_its_shape() -> None:
    assert PrunedArgs(init="scratch", width=256).width == 256


def _images(count: int) -> LabelledImages:
    """Image i is all pixel value i, labelled i: a split that pairs them wrongly shows."""
    pixels = np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, 8, 8, 3)).copy()
    return LabelledImages(
        pixels, np.arange(count), [str(i) for i in range(count)], [""] * count, [()] * count
    )


def test_the_training_images_split_into_disjoint_training_and_validation_sets() -> None:
    args = PrunedArgs(train_images=12, val_images=4, seed=1)
    images = _images(16)
    data = pruned._data(args, images, _images(5), Path("ranker"), Path("corpus"))
    assert len(data.x_train) == 12 and len(data.x_val) == 4 and len(data.x_test) == 5
    train, val = set(data.y_train.tolist()), set(data.y_val.tolist())
    assert not train & val and train | val == set(range(16))
    expected = images.inputs()
    torch.testing.assert_close(data.x_val, expected[data.y_val])  # each image kept with its label
    torch.testing.assert_close(data.x_train, expected[data.y_train])
    with pytest.raises(
        ValueError, match=r"corpus: 15 training images, --train-images \+ --val-images ask for 16"
    ):
        pruned._data(args, _images(15), _images(5), Path("ranker"), Path("corpus"))


def test_accuracy_at_a_matched_speed_is_interpolated_in_log_speed_within_the_measured_range() -> None:
    curve = [(100.0, 0.5), (400.0, 0.3), (800.0, 0.2)]
    assert pruned._at_speed(curve, 200.0) == pytest.approx(0.4)  # halfway between 100 and 400 in log
    assert pruned._at_speed(curve, 800.0) == pytest.approx(0.2)
    assert pruned._at_speed(curve, 900.0) is None and pruned._at_speed(curve, 50.0) is None


def _row(method: str, speed: float, by_seed: list[float] | None, kind: str = "top-k") -> dict:
    row = {"method": method, "kind": kind, "keep": 0.5, "images_per_s": speed, "accuracy_off_the_shelf": 0.6}
    if by_seed is not None:
        row |= {pruned.BY_SEED: by_seed, "accuracy_fine_tuned": float(np.mean(by_seed))}
    return row


def test_paired_gaps_are_taken_seed_by_seed_at_the_ltrp_points_speed_or_keep_ratio() -> None:
    """The centre at the shared scorer's 200 images/s: halfway in log speed between the full model (100,
    0.6) and its own point (400), with each seed's fine-tuning: 0.50, 0.52, 0.51 against 0.50, 0.52, 0.54.
    At the same keep ratio (50%): its own 0.40, 0.44, 0.42. The full model, fine-tuned alike, is every
    point's reference."""
    full = _row("full", 100.0, [0.6, 0.6, 0.6], "full")
    shared = _row("ltrp-shared", 200.0, [0.50, 0.52, 0.54], "shared")
    rows = [
        full,
        shared,
        _row("center", 400.0, [0.40, 0.44, 0.42]),
        _row("tome", 150.0, [0.6, 0.6, 0.6], "tome"),  # never as fast as the point, and no keep ratio
        _row("variance", 300.0, None),  # fine-tuned once: not paired
    ]
    result = {"rows": rows, "measure": "mAP"}
    expected_full = format_interval(t_interval([0.10, 0.08, 0.06]), "+")
    for matched, centre in (("throughput", [0.0, 0.0, -0.03]), ("keep", [-0.10, -0.08, -0.12])):
        table = pruned._paired_table(result, matched)
        header = next(line for line in table if line.startswith("| LTRP point"))
        assert header.split(" | ")[3:] == ["full", "ltrp-shared", "center", "tome |"]
        line = next(line for line in table if line.startswith("| ltrp-shared 50%"))
        cells = [expected_full, "-", format_interval(t_interval(centre), "+"), "- |"]
        assert line.split(" | ")[3:] == cells, matched
    once = {"rows": [_row("full", 100.0, None, "full"), _row("center", 400.0, [0.4])], "measure": "mAP"}
    assert pruned._paired_table(once, "throughput") == []
