"""The scene generator: deterministic, masks and labels that match the objects drawn, splits kept apart,
and background kinds whose edges do not give the objects away (distractors, faint objects, photo crops
free of unlabelled objects)."""

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
from ltrp.data import scenes
from ltrp.data.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist
from ltrp.data.images import to_model_input
from ltrp.data.scenes import (
    BACKGROUNDS,
    PHOTO_REGIONS,
    SHIPPED_MAE,
    SceneConfig,
    make_scene,
    read_object_masks,
    scene_background,
    write_scenes,
)
from ltrp.data.sources import plan_corpus

_DIGEST = (
    "import hashlib; from ltrp.data.scenes import BACKGROUNDS, SceneConfig, make_scene\n"
    "h = hashlib.sha256()\n"
    "cfgs = [SceneConfig()] * 12 + [SceneConfig(backgrounds={k: 1}) for k in BACKGROUNDS for _ in range(3)]\n"
    "for i, cfg in enumerate(cfgs):\n"
    "    s = make_scene(cfg, 'train', i); h.update(s.image.tobytes())\n"
    "    [h.update(o.mask.tobytes()) for o in s.objects]\n"
    "print(h.hexdigest())"
)


def test_scenes_are_the_same_in_another_process() -> None:
    """Every kind, the new ones included, draws the same pixels and masks in a fresh interpreter."""
    here = hashlib.sha256()
    cfgs = [SceneConfig()] * 12 + [SceneConfig(backgrounds={k: 1}) for k in BACKGROUNDS for _ in range(3)]
    for i, cfg in enumerate(cfgs):
        scene = make_scene(cfg, "train", i)
        here.update(scene.image.tobytes())
        for o in scene.objects:
            here.update(o.mask.tobytes())
    there = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here.hexdigest()
    assert not np.array_equal(
        make_scene(SceneConfig(), "train", 0).image, make_scene(SceneConfig(seed=1), "train", 0).image
    )


@pytest.mark.parametrize(
    ("split", "kind"), [("train", None), ("test", None), ("test", "shapes"), ("train", "faint")]
)
def test_masks_and_labels_are_the_objects_of_the_scenes_split(split: str, kind: str | None) -> None:
    """Each object's mask is its own Fashion-MNIST image (from the scene's split) drawn into its box,
    less what later objects cover; its class is that image's label. Distractors under the objects and
    faint colours leave the masks as they are."""
    images, labels = read_fashion_mnist(split)
    other_images, _ = read_fashion_mnist("test" if split == "train" else "train")
    cfg = SceneConfig() if kind is None else SceneConfig(backgrounds={kind: 1.0})
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
    return _opacity(source, side) > 0.5  # where the object is more than half opaque


def _opacity(source: np.ndarray, side: int) -> np.ndarray:
    grey = np.asarray(Image.fromarray(source).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    return np.clip(grey / 0.15, 0, 1)


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
    """The default mix is the four kinds the shipped MAE was trained on; weights select any kind."""
    kinds = {make_scene(SceneConfig(), "train", i).background for i in range(40)}
    assert kinds == {"black", "texture", "clutter", "photo"}
    every = SceneConfig(backgrounds=dict.fromkeys(BACKGROUNDS, 1.0))
    assert {make_scene(every, "train", i).background for i in range(60)} == set(BACKGROUNDS)
    for kind in ("photo", "shapes", "faint"):
        chosen = SceneConfig(backgrounds={kind: 1})
        assert {make_scene(chosen, "train", i).background for i in range(10)} == {kind}
    with pytest.raises(ValueError, match="unknown kind"):
        SceneConfig(backgrounds={"sky": 1.0})
    with pytest.raises(ValueError, match="faint_contrast"):
        SceneConfig(faint_contrast=0.0)


def test_the_report_order_has_every_kind_and_ends_with_black() -> None:
    """Per-kind results lead with the kinds whose edges mislead; a new kind must be given a place."""
    from ltrp.evaluation.scene_eval import KIND_ORDER

    assert sorted(KIND_ORDER) == sorted(BACKGROUNDS)
    assert KIND_ORDER[0] == "shapes" and KIND_ORDER[-1] == "black"


def test_objects_hide_the_distractors_under_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same scenes drawn with the distractors blanked out (the same random draws, so the same
    objects): equal wherever an object is opaque and on top, different elsewhere in some scenes."""
    cfg = SceneConfig(backgrounds={"shapes": 1.0})
    images, _ = read_fashion_mnist("test")
    real = [make_scene(cfg, "test", i) for i in range(20)]
    shapes = scenes._BACKGROUND_MAKERS["shapes"]
    monkeypatch.setitem(scenes._BACKGROUND_MAKERS, "shapes", lambda rng, c: 0 * shapes(rng, c))
    differ = 0
    for i, scene in enumerate(real):
        blank = make_scene(cfg, "test", i)
        assert [o.box for o in blank.objects] == [o.box for o in scene.objects]
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            opaque = np.zeros_like(obj.mask)
            opaque[top:bottom, left:right] = _opacity(images[obj.source_index], right - left) >= 1
            on_top = obj.mask & opaque
            assert on_top.sum() > 0
            assert np.array_equal(scene.image[on_top], blank.image[on_top])
        differ += not np.array_equal(scene.image, blank.image)
    assert differ == len(real)  # every shapes scene has distractors


def test_distractors_span_object_scale_and_take_edge_energy_off_the_objects() -> None:
    """Each distractor spans most of a box of the objects' size; on shapes scenes a large share of the
    per-patch variance (what an edge detector ranks by) lies in patches with no object pixel, on black
    none does."""
    rng = np.random.default_rng(0)
    cfg = SceneConfig()
    for _ in range(60):
        side = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
        rows, cols = np.nonzero(scenes._distractor_alpha(rng, side) > 0.5)
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert side // 2 <= extent <= side, (side, extent)
    shares = {kind: _variance_off_objects(kind) for kind in ("black", "shapes")}
    assert shares["black"] < 0.01 and shares["shapes"] > 0.25, shares


def _variance_off_objects(kind: str) -> float:
    """The mean share of a scene's summed 4-px patch variance that lies in patches no object touches."""
    cfg = SceneConfig(backgrounds={kind: 1.0})
    shares = []
    for index in range(30):
        scene = make_scene(cfg, "test", index)
        grid = cfg.size // 4
        variance = scene.image.astype(float).reshape(grid, 4, grid, 4, 3).var(axis=(1, 3)).sum(-1)
        union = np.any([o.mask for o in scene.objects], axis=0).reshape(grid, 4, grid, 4).any(axis=(1, 3))
        shares.append(variance[~union].sum() / variance.sum())
    return float(np.mean(shares))


def test_faint_objects_keep_the_set_share_of_the_texture_objects_contrast() -> None:
    """Faint and texture scenes of one index share background and objects; inside the masks, the faint
    objects differ from the background by about faint_contrast times as much, yet more than the
    texture varies by itself."""
    faint, texture = SceneConfig(backgrounds={"faint": 1.0}), SceneConfig(backgrounds={"texture": 1.0})
    contrasts: dict[str, list[float]] = {"faint": [], "texture": []}
    texture_spread = []
    for index in range(30):
        ground = scene_background(faint, "test", index)
        assert np.array_equal(ground, scene_background(texture, "test", index))
        texture_spread.append(np.abs(ground - ground.mean(axis=(0, 1))).mean())
        for name, cfg in (("faint", faint), ("texture", texture)):
            scene = make_scene(cfg, "test", index)
            union = np.any([o.mask for o in scene.objects], axis=0)
            contrasts[name].append(np.abs(scene.image[union] - ground[union]).mean())
    ratio = np.mean(contrasts["faint"]) / np.mean(contrasts["texture"])
    assert 0.5 * faint.faint_contrast < ratio < 1.5 * faint.faint_contrast, ratio
    assert np.mean(contrasts["faint"]) > 2 * np.mean(texture_spread)


def test_photo_crops_come_only_from_the_object_free_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """With each photo replaced by white inside its listed regions and black outside, every photo
    scene's background is the dimmed white: no crop reaches outside a region."""
    real = scenes._photo_image
    assert not {"astronaut", "chelsea", "coins", "hubble_deep_field"} & set(PHOTO_REGIONS)
    cfg = SceneConfig(backgrounds={"photo": 1.0})

    def regions_only(name: str) -> np.ndarray:
        height, width = real(name).shape[:2]
        out = np.zeros((height, width, 3), dtype=np.uint8)
        for left, top, right, bottom in PHOTO_REGIONS[name]:
            assert 0 <= left < right <= width and 0 <= top < bottom <= height, name
            assert min(right - left, bottom - top) >= cfg.size, name  # room for a crop of the full size
            out[top:bottom, left:right] = 255
        return out

    monkeypatch.setattr(scenes, "_photo_image", regions_only)
    for index in range(60):
        scene = make_scene(cfg, "test", index)
        outside = np.ones((cfg.size, cfg.size), dtype=bool)
        for left, top, right, bottom in (o.box for o in scene.objects):
            outside[top:bottom, left:right] = False
        assert (scene.image[outside] == int(255 * cfg.photo_dim)).all(), index


def test_photo_folder_crops_come_from_its_photos_at_the_scaled_side(tmp_path) -> None:
    """A folder's photos replace scikit-image's: two flat photos of different sizes and colours give
    photo backgrounds of exactly those dimmed colours, both drawn; a folder without images is refused."""
    Image.new("RGB", (2000, 1000), (200, 0, 0)).save(tmp_path / "red.jpg", quality=100)
    Image.new("RGB", (300, 900), (0, 0, 200)).save(tmp_path / "blue.png")
    assert scenes._folder_photo(str(tmp_path / "red.jpg")).shape == (scenes.PHOTO_SIDE, 1024, 3)
    cfg = SceneConfig(backgrounds={"photo": 1.0}, photo_folder=str(tmp_path))
    corners = {tuple(make_scene(cfg, "train", i).image[0, 0] // 20) for i in range(40)}
    assert corners <= {(0, 0, int(200 * cfg.photo_dim) // 20), (int(200 * cfg.photo_dim) // 20, 0, 0)}
    assert len(corners) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.jpg or \.png image in .*empty"):
        SceneConfig(photo_folder=str(tmp_path / "empty"))


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
