"""The cheaper-ViT experiment's settings and data split (its parts: tests/evaluation/test_efficiency.py,
tests/core/test_pruned.py), without running it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.experiments import pruned
from jobs.experiments.pruned import PrunedArgs
from ltrp.evaluation.protocol import LabelledImages


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 256}, "--width: the ViT's shape is the MAE encoder's with --init mae"),
        ({"depth": 2, "heads": 2}, "--depth, --heads: the ViT's shape"),
        ({"fine_tuned": ("ltrp", "edges")}, r"--fine-tuned: unknown method\(s\) \['edges'\]"),
        ({"init": "scratch", "backbone": "folk.pth"}, "--backbone: a ViT with --init scratch starts"),
        ({"dataset": "fashion_mnist", "backgrounds": ("faint",)}, "--backgrounds: scenes only"),
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
