"""Object measures on hand-made masks and keep sets, where the answer is known."""

import numpy as np
import pytest

from ltrp.evaluation.objects import (
    ImageObjects,
    background_share,
    difference_in_differences,
    measure,
    object_recalls,
)


def _mask(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


# An 8 x 8 image in 4 x 4 patches: a 2 x 2 grid, patches 0 1 / 2 3.
# "Bag" fills patch 0; "Coat" is cut by the patch edge: 2 x 4 pixels in patch 1, 2 x 4 in patch 3.
SCENE = ImageObjects.from_masks(
    [("Bag", _mask(slice(0, 4), slice(0, 4))), ("Coat", _mask(slice(2, 6), slice(4, 6)))], 4
)


def test_pixels_per_patch_and_recall_of_an_object_cut_by_a_patch_edge() -> None:
    assert SCENE.pixels.tolist() == [[16, 0, 0, 0], [0, 4, 0, 4]]
    assert object_recalls(SCENE, np.array([0, 1])).tolist() == [1.0, 0.5]  # half the coat kept
    assert object_recalls(SCENE, np.array([2])).tolist() == [0.0, 0.0]
    assert background_share(SCENE, np.array([0, 2])) == 0.5  # patch 2 holds nothing
    assert background_share(SCENE, np.array([1, 3])) == 0.0


def test_measures_per_image_and_class_and_the_bias_gap() -> None:
    keeps = np.array([[0, 2], [1, 3]])
    m = measure([SCENE, SCENE], keeps, seen=["Coat"], unseen=["Bag"])
    np.testing.assert_allclose(m.recall, [0.5, 0.5])
    np.testing.assert_allclose(m.seen_recall, [0.0, 1.0])
    np.testing.assert_allclose(m.unseen_recall, [1.0, 0.0])
    np.testing.assert_allclose(m.bias_gap, [-1.0, 1.0])
    np.testing.assert_allclose(m.background_share, [0.5, 0.0])
    assert m.class_recalls == {"Bag": [1.0, 0.0], "Coat": [0.0, 1.0]}


def test_difference_in_differences_against_random() -> None:
    """On the scene, one selector keeps coat and bag whole (gap 0), the reference keeps the bag whole
    and half the coat (gap -0.5): the difference in differences is +0.5. An image without both groups
    drops out."""
    only_bag = ImageObjects.from_masks([("Bag", _mask(slice(0, 4), slice(0, 4)))], 4)
    seen_first = measure([SCENE, only_bag], np.array([[1, 3, 0], [0, 1, 2]]), seen=["Coat"], unseen=["Bag"])
    reference = measure([SCENE, only_bag], np.array([[0, 1, 2], [0, 1, 2]]), seen=["Coat"], unseen=["Bag"])
    assert difference_in_differences(seen_first, reference).tolist() == pytest.approx([0.5])
    assert np.isnan(seen_first.bias_gap[1])
