import io

import numpy as np
import pytest
from PIL import Image

from ltrp.data.images import (
    IMAGENET_MEAN,
    ImageDecodeError,
    ImageLimits,
    View,
    center_crop,
    center_view,
    displayed_size,
    render_view,
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
