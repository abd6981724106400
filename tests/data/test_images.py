import functools
import io

import numpy as np
import pytest
from PIL import Image

from ltrp.data import images
from ltrp.data.images import (
    IMAGENET_MEAN,
    ImageDecodeError,
    ImageLimits,
    View,
    center_crop,
    center_view,
    displayed_size,
    render_view,
    render_views,
    to_model_input,
    view_geometry,
)


def decode_center_crop(data: bytes, size: int) -> np.ndarray:
    return center_crop(data, size, ImageLimits(min_side=1))  # the tests' images are small on purpose


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_center_crop_of_a_wide_image_keeps_the_middle() -> None:
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 200  # the central square is bright, the sides dark
    out = decode_center_crop(_encode(Image.fromarray(arr)), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() >= 195  # bicubic rings a little at the crop's edges


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    out = decode_center_crop(_encode(Image.fromarray(ramp)), 64)
    assert out[:, :8].mean() < 20 and out[:, -8:].mean() > 235
    assert out[:, 28:36].mean() == pytest.approx(127, abs=12)


def test_transparent_pixels_become_the_mean_colour() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    out = decode_center_crop(_encode(Image.fromarray(rgba, "RGBA")), 16)
    assert np.abs(out[0, 0].astype(int) - np.round(255 * np.array(IMAGENET_MEAN))).max() <= 1


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "1"])
def test_other_modes_become_rgb(mode: str) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), np.uint8)).convert(mode)
    assert decode_center_crop(_encode(img, "JPEG" if mode == "CMYK" else "PNG"), 8).shape == (8, 8, 3)


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # stored landscape, left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half is shown on top
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_center_crop(buf.getvalue(), 20).astype(float)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # ignoring EXIF would give left/right halves


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, I am text", "cannot decode"),
        (_encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "cannot decode"),
    ],
)
def test_bad_bytes_raise_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_center_crop(data, 16)


def test_model_input_is_normalised_nchw() -> None:
    batch = np.full((2, 4, 4, 3), 255, np.uint8)
    x = to_model_input(batch)
    assert x.shape == (2, 3, 4, 4)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_random_views_are_deterministic_inside_the_image_and_in_scale() -> None:
    boxes = [view_geometry("img", v, 500, 375, seed=1, crop="random", flip=True) for v in range(200)]
    assert boxes == [view_geometry("img", v, 500, 375, seed=1, crop="random", flip=True) for v in range(200)]
    for view in boxes:
        left, top, right, bottom = view.box
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.19 <= (right - left) * (bottom - top) / (500 * 375) <= 1.0
        assert 0.74 <= (right - left) / (bottom - top) <= 1.34 or view.box == center_view(500, 375).box
    flips = sum(v.flip for v in boxes)
    assert 70 < flips < 130
    assert view_geometry("img", 0, 500, 375, seed=2, crop="random") != boxes[0]


def test_center_views_without_flip_are_the_central_square() -> None:
    assert view_geometry("x", 3, 300, 100) == View((100.0, 0.0, 200.0, 100.0), False)


def test_render_view_crops_the_box_and_mirrors() -> None:
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 30:] = 255  # right half white
    data = _encode(Image.fromarray(arr))
    right = render_view(data, View((30.0, 0.0, 60.0, 30.0)), 16)
    assert right[:, 2:].min() >= 250  # bicubic rings a little next to the dark half
    mirrored = render_view(data, View((15.0, 0.0, 45.0, 30.0), flip=True), 16).astype(int)
    assert mirrored[:, :6].mean() > 240 and mirrored[:, -6:].mean() < 15


def test_jpeg_draft_decoding_stays_close_to_full_decoding() -> None:
    import skimage.data

    photo = skimage.data.hubble_deep_field()  # 1000 x 872: decoded at 1/2 or 1/4 scale for 128 px
    data = _encode(Image.fromarray(photo), "JPEG")
    view = center_view(*displayed_size(data))
    drafted = render_view(data, view, 128).astype(float)
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(
            img.convert("RGB").resize((128, 128), Image.Resampling.BICUBIC, box=view.box)
        ).astype(float)
    assert np.abs(drafted - full).mean() < 4


@functools.cache
def _photo(name: str, fmt: str = "JPEG", orientation: int = 1) -> bytes:
    """A sample photo from scikit-image, encoded as `fmt` (JPEG at quality 90) with that EXIF orientation."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)())
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("size", [32, 112, 224])
@pytest.mark.parametrize(
    ("name", "fmt", "orientation"),
    [
        ("astronaut", "JPEG", 1),
        ("chelsea", "JPEG", 1),
        ("coffee", "JPEG", 1),
        ("camera", "JPEG", 1),  # grayscale
        ("chelsea", "JPEG", 6),  # displayed rotated: boxes are in the rotated frame
        ("astronaut", "PNG", 1),  # no draft mode: one decode for every view
    ],
)
def test_render_views_gives_each_view_the_pixels_render_view_gives_it_alone(
    name: str, fmt: str, orientation: int, size: int
) -> None:
    data = _photo(name, fmt, orientation)
    width, height = displayed_size(data)
    views = [view_geometry(name, v, width, height, crop="random", flip=True) for v in range(8)]
    together = render_views(data, views, size)
    assert len(together) == len(views)
    for view, pixels in zip(views, together, strict=True):
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, render_view(data, view, size))


@pytest.mark.parametrize(
    ("fmt", "decodes"),
    [("JPEG", 3), ("PNG", 1)],  # JPEG: reductions 1/8 (twice), 1/2 (twice) and 1/1; PNG: none
)
def test_render_views_decodes_once_per_reduction(
    fmt: str, decodes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _encode(Image.new("RGB", (512, 512), (200, 100, 50)), fmt)
    calls = []
    to_rgb = images._to_rgb

    def counted(img: Image.Image) -> Image.Image:  # called once per decode
        calls.append(img.size)
        return to_rgb(img)

    monkeypatch.setattr(images, "_to_rgb", counted)
    boxes = [(0, 0, 512, 512), (0, 0, 256, 256), (0, 0, 100, 100), (50, 50, 150, 150), (0, 0, 60, 60)]
    render_views(data, [View(tuple(map(float, box))) for box in boxes], 32)
    assert len(calls) == decodes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, I am text",
        _encode(Image.new("RGB", (64, 64)), "JPEG")[:200],
        _photo("coffee")[:20_000],  # a sound header, then the pixels stop
    ],
)
def test_render_views_refuses_an_unreadable_image(data: bytes) -> None:
    views = [View((0.0, 0.0, 16.0, 16.0)), View((8.0, 8.0, 24.0, 24.0), flip=True)]
    with pytest.raises(ImageDecodeError):
        render_views(data, views, 16)
