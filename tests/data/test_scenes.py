"""The scene generator: deterministic, masks and labels that match the objects drawn, splits kept apart."""

import hashlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import ltrp
from ltrp.core.mae import GEOMETRIES, random_visible
from ltrp.data.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist
from ltrp.data.images import to_model_input
from ltrp.data.scenes import (
    BACKGROUNDS,
    SHIPPED_MAE,
    SceneConfig,
    make_scene,
    read_object_masks,
    write_scenes,
)
from ltrp.data.sources import plan_corpus

_DIGEST = (
    "import hashlib; from ltrp.data.scenes import SceneConfig, make_scene\n"
    "h = hashlib.sha256()\n"
    "for i in range(12):\n"
    "    s = make_scene(SceneConfig(), 'train', i); h.update(s.image.tobytes())\n"
    "    [h.update(o.mask.tobytes()) for o in s.objects]\n"
    "print(h.hexdigest())"
)


def test_scenes_are_the_same_in_another_process() -> None:
    here = hashlib.sha256()
    for i in range(12):
        scene = make_scene(SceneConfig(), "train", i)
        here.update(scene.image.tobytes())
        for o in scene.objects:
            here.update(o.mask.tobytes())
    there = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here.hexdigest()
    assert not np.array_equal(
        make_scene(SceneConfig(), "train", 0).image, make_scene(SceneConfig(seed=1), "train", 0).image
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_masks_and_labels_are_the_objects_of_the_scenes_split(split: str) -> None:
    """Each object's mask is its own Fashion-MNIST image (from the scene's split) drawn into its box,
    less what later objects cover; its class is that image's label."""
    images, labels = read_fashion_mnist(split)
    other_images, _ = read_fashion_mnist("test" if split == "train" else "train")
    cfg = SceneConfig()
    checked = 0
    for index in range(40):
        scene = make_scene(cfg, split, index)
        assert scene.labels == sorted({o.name for o in scene.objects})
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        covered = np.zeros((cfg.size, cfg.size), dtype=bool)
        for obj in reversed(scene.objects):  # the top object first
            assert obj.name == FASHION_MNIST_CLASSES[labels[obj.source_index]]
            left, top, right, bottom = obj.box
            drawn = np.zeros_like(covered)
            drawn[top:bottom, left:right] = _shape(images[obj.source_index], right - left)
            assert np.array_equal(obj.mask, drawn & ~covered)
            if obj.mask.sum() > 20 and obj.source_index < len(other_images):  # not the other split's image
                other = np.zeros_like(covered)
                other[top:bottom, left:right] = _shape(other_images[obj.source_index], right - left)
                assert not np.array_equal(obj.mask, other & ~covered)
            covered |= drawn
            checked += 1
        masks = np.stack([o.mask for o in scene.objects])
        assert masks.sum(0).max() <= 1  # each pixel belongs to one object at most
    assert checked > 60


def _shape(source: np.ndarray, side: int) -> np.ndarray:
    grey = np.asarray(Image.fromarray(source).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    return grey > 0.075  # where the object is more than half opaque


def test_on_black_the_masks_are_the_bright_pixels() -> None:
    cfg = SceneConfig(backgrounds={"black": 1.0})
    for index in range(10):
        scene = make_scene(cfg, "test", index)
        union = np.any([o.mask for o in scene.objects], axis=0)
        brightness = scene.image.max(axis=2)
        assert brightness[union].min() >= 50  # an object's pixels are lit...
        outside_boxes = np.ones_like(union)
        for left, top, right, bottom in (o.box for o in scene.objects):
            outside_boxes[top:bottom, left:right] = False
        assert brightness[outside_boxes].max() == 0  # ...and the background is black


def test_every_background_kind_occurs_and_weights_select_them() -> None:
    kinds = {make_scene(SceneConfig(), "train", i).background for i in range(40)}
    assert kinds == set(BACKGROUNDS)
    assert {make_scene(SceneConfig(backgrounds={"photo": 1}), "train", i).background for i in range(10)} == {
        "photo"
    }
    with pytest.raises(ValueError, match="unknown kind"):
        SceneConfig(backgrounds={"sky": 1.0})


def test_required_groups_each_have_an_object_in_every_scene() -> None:
    seen, unseen = ("T-shirt_top", "Pullover", "Coat"), ("Bag", "Sandal")
    cfg = SceneConfig(require=(seen, unseen), max_objects=3)
    for index in range(60):
        names = [o.name for o in make_scene(cfg, "test", index).objects]
        assert any(n in seen for n in names) and any(n in unseen for n in names), names
    with pytest.raises(ValueError, match="unknown class"):
        SceneConfig(require=(("Hat",),))


def test_written_corpus_is_a_manifest_the_scoring_job_reads(tmp_path) -> None:
    manifest = write_scenes(tmp_path, "test", 6)
    table = pq.read_table(manifest)
    assert table.num_rows == 6
    shards = plan_corpus(str(manifest), shard_size=4).shards
    assert [len(s.uris) for s in shards] == [4, 2]
    assert shards[0].labels[0] == table.column("label")[0].as_py()
    masks = read_object_masks(manifest)
    scene = make_scene(SceneConfig(), "test", 3)
    assert [name for name, _ in masks["test-000003"]] == [o.name for o in scene.objects]
    assert all(
        np.array_equal(m, o.mask) for (_, m), o in zip(masks["test-000003"], scene.objects, strict=True)
    )
    png = np.asarray(Image.open(tmp_path / table.column("uri")[3].as_py()))
    assert np.array_equal(png, scene.image)


def test_the_shipped_mae_loads_strictly_and_reconstructs_held_out_scenes() -> None:
    """The package's scenes MAE: official layout with a decoder, loaded strictly; on held-out scenes its
    masked-patch error is well below that of the same MAE freshly initialised."""
    mae = ltrp.load_mae(str(SHIPPED_MAE))  # strict: refuses a missing or unexpected weight
    assert mae.cfg == replace(GEOMETRIES["mae_vit_scenes_patch4"], norm_pix=False)
    assert mae.decoder_pred.weight.dtype == torch.float32  # stored in fp16, computed in fp32
    scenes = np.stack([make_scene(SceneConfig(), "test", i).image for i in range(5000, 5032)])
    x = to_model_input(scenes)
    visible = random_visible(len(x), mae.cfg.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fresh = ltrp.MAE(mae.cfg).eval()
    with torch.inference_mode():
        trained_error = mae.forward_loss(x, mae(x, visible), visible).item()
        fresh_error = fresh.forward_loss(x, fresh(x, visible), visible).item()
    assert trained_error < 0.5 * fresh_error, (trained_error, fresh_error)
