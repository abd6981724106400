"""The evaluation protocol: each measure against a hand computation or a case whose answer is known, and
the report on a small real evaluation (the job through MLflow: tests/pipeline/test_evaluate_job.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from support import SMALL_MAE, SMALL_RANKER, fashion_mnist, png_bytes, score_rows, write_folder, write_table

import ltrp
from ltrp.core.classifier import ClassifierConfig, fit_classifier, predict
from ltrp.core.ranker import Ranker, keep_top
from ltrp.evaluation.measures import metric_key
from ltrp.evaluation.protocol import (
    EvalSettings,
    EvaluationResult,
    LabelledImages,
    agreement,
    dataset_digest,
    evaluate,
    interval,
    load_labelled,
    oracle_scores,
    pseudo_scores,
    reconstruction_error,
    spread,
    t_interval,
)
from ltrp.evaluation.report import CURVES, KEPT, REPORT, write_report

# --- measures ------------------------------------------------------------------------------------


def test_oracle_ranks_the_scored_patches_first_in_pseudo_score_order() -> None:
    visible = torch.tensor([[1, 5, 9, 12], [0, 2, 3, 15]])
    pseudo = torch.tensor([[0.3, 0.1, 0.9, 0.5], [-1.0, 2.0, 0.0, 1.0]])
    out = oracle_scores(visible, pseudo, 16)
    assert out.shape == (2, 16)
    assert torch.isfinite(out).all()
    for row in range(2):
        expected = visible[row][pseudo[row].argsort(descending=True)]
        assert torch.equal(out[row].argsort(descending=True)[:4], expected)
        unscored = torch.ones(16, dtype=torch.bool).scatter(0, visible[row], False)
        assert out[row][unscored].max() < out[row][visible[row]].min()
    # Keeping the scored count keeps exactly the scored patches.
    assert torch.equal(keep_top(out, 4 / 16), visible.sort(dim=1).values)


def test_agreement_is_one_for_the_pseudo_scores_and_minus_one_reversed() -> None:
    torch.manual_seed(0)
    ratios = (0.25, 0.5)
    visible = ltrp.visible_sets(["a", "b", "c"], grid=4, mask_ratio=0.5)  # 8 of 16 patches
    pseudo = torch.randn(3, 8)
    noise = torch.randn(3, 16) * 100  # the unscored positions must not matter
    same = agreement(noise.scatter(1, visible, pseudo), visible, pseudo, ratios)
    expected_keys = {"kendall_tau", "spearman"} | {
        metric_key(m, r) for m in ("ndcg", "topk_overlap") for r in ratios
    }
    assert set(same) == expected_keys
    for key, values in same.items():
        assert values.shape == (3,)
        torch.testing.assert_close(values, torch.ones(3), msg=key)
    reversed_ = agreement(noise.scatter(1, visible, -pseudo), visible, pseudo, ratios)
    torch.testing.assert_close(reversed_["kendall_tau"], -torch.ones(3))
    torch.testing.assert_close(reversed_["spearman"], -torch.ones(3))
    assert (reversed_[metric_key("topk_overlap", 0.25)] == 0).all()  # top 2 vs bottom 2 of 8
    assert (reversed_[metric_key("ndcg", 0.25)] < 1).all()


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm-pix"])
def test_reconstruction_error_is_the_mse_on_the_dropped_patches(norm_pix: bool) -> None:
    torch.manual_seed(0)
    mae = ltrp.MAE(replace(SMALL_MAE, norm_pix=norm_pix)).eval()
    images = torch.randn(3, 3, 32, 32)
    keep = keep_top(torch.rand(3, 64), 0.25)
    got = reconstruction_error(mae, images, keep, batch_size=2)
    with torch.inference_mode():
        pred = mae(images, keep)
    target = mae.patchify(images)
    if norm_pix:  # per patch: (t - mean) / sqrt(unbiased var + 1e-6), MAE's norm_pix_loss
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    for i in range(3):
        dropped = [j for j in range(64) if j not in set(keep[i].tolist())]
        assert len(dropped) == 48
        by_hand = ((pred[i, dropped] - target[i, dropped]) ** 2).mean()
        torch.testing.assert_close(got[i], by_hand)
    other = reconstruction_error(mae, images, keep_top(torch.rand(3, 64), 0.25))
    assert (other != got).all()


def test_t_interval_over_seeds() -> None:
    e = t_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / 3**0.5
    assert e["mean"] == 2.0 and e["low"] == pytest.approx(2 - half) and e["high"] == pytest.approx(2 + half)
    assert t_interval([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5}


def test_interval_contains_the_mean_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.5, 0.2, 40), rng.normal(0.5, 0.2, 1000)
    small, large = interval(few, 300, 0), interval(many, 300, 0)
    assert small.lo < small.mean < small.hi and small.mean == pytest.approx(few.mean())
    assert large.lo < large.mean < large.hi
    assert large.hi - large.lo < (small.hi - small.lo) / 2
    assert interval(few, 300, 0) == small  # seeded
    flat = interval(np.full(10, 0.3), 300, 0)
    assert flat.lo == flat.mean == flat.hi == pytest.approx(0.3)


def test_paired_differences_tell_apart_what_the_separate_intervals_cannot() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.uniform(0.0, 1.0, 60)  # images differ far more than the scorers do
    ltrp_ = baseline - rng.uniform(0.005, 0.03, 60)  # better (lower) on every image
    a, b = interval(ltrp_, 500, 0), interval(baseline, 500, 0)
    assert a.hi > b.lo and b.hi > a.lo  # unpaired intervals overlap
    diff = interval(ltrp_ - baseline, 500, 0)  # as evaluate() pairs them
    assert diff.hi < 0 and diff.lo < diff.mean < diff.hi


def test_spread_covers_every_class_of_a_sorted_listing() -> None:
    # A hash-ordered sample, not a stratified one: at 100 of 1000 images a class is missed with
    # probability ~3e-4 (this listing covers all ten; at 50 it would miss one).
    ids = [f"{c}/{i:04d}.png" for c in range(10) for i in range(100)]
    chosen = spread(ids, 100)
    assert len(chosen) == 100 and chosen == sorted(set(chosen))
    assert chosen == spread(ids, 100)
    assert {ids[i].split("/")[0] for i in chosen} == {str(c) for c in range(10)}
    assert {ids[i].split("/")[0] for i in range(100)} == {"0"}  # what taking the first 100 would do
    shuffled = ids[::-1]  # a different listing order picks the same images
    assert {shuffled[i] for i in spread(shuffled, 100)} == {ids[i] for i in chosen}
    assert set(spread(ids, 40)) < set(chosen)  # a smaller limit takes a subset
    assert spread(ids[:7], 50) == list(range(7))


def test_dataset_digest_changes_with_what_the_numbers_depend_on() -> None:
    def images(uris: list[str]) -> LabelledImages:
        n = len(uris)
        return LabelledImages(np.zeros((n, 32, 32, 3), np.uint8), np.zeros(n, np.int64), uris, uris, [()] * n)

    mae, settings = ltrp.MAE(SMALL_MAE), EvalSettings()
    test, train = images(["t1", "t2"]), images(["a", "b"])
    visible, pseudo = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    base = dataset_digest(test, mae, settings, train, visible, pseudo)
    assert base == dataset_digest(test, mae, settings, train, visible.clone(), pseudo.clone())
    changed = [
        dataset_digest(images(["t1", "t3"]), mae, settings, train, visible, pseudo),
        dataset_digest(test, mae, replace(settings, keep_ratios=(0.5,)), train, visible, pseudo),
        dataset_digest(test, mae, settings, images(["a", "c"]), visible, pseudo),  # classifiers' data
        dataset_digest(test, mae, settings, train, visible, pseudo * 2),  # another score table
    ]
    assert base not in changed and len(set(changed)) == len(changed)


# --- the classifiers -----------------------------------------------------------------------------


def quadrant_task(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32 px images on a 4x4 grid of 8 px patches; the class is the quadrant whose top-left patch
    (0, 2, 8 or 10) is bright. Brighter patches make a classifier this small memorise the noise
    instead: the patch embedding then dwarfs the position embedding."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=g)
    images = torch.randn(count, 3, 32, 32, generator=g) * 0.1
    for i, q in enumerate(labels.tolist()):
        r, c = divmod(q, 2)
        images[i, :, 16 * r : 16 * r + 8, 16 * c : 16 * c + 8] += 0.3
    return images, labels


@pytest.mark.parametrize("kept", [None, [0, 2, 5, 8, 10, 15]], ids=["all", "fixed-subset"])
def test_fit_classifier_learns_which_quadrant_is_bright(kept: list[int] | None) -> None:
    # The subset is the same for every image (it holds each class's bright patch), so which patches
    # are visible says nothing about the class: only their content does.
    cfg = ClassifierConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, epochs=10, batch_size=32, lr=3e-3
    )
    x_train, y_train = quadrant_task(256, 0)
    x_test, y_test = quadrant_task(128, 1)
    train_vis = None if kept is None else torch.tensor(kept).expand(256, -1)
    test_vis = None if kept is None else torch.tensor(kept).expand(128, -1)
    model = fit_classifier(x_train, y_train, 4, cfg, visible=train_vis, seed=0)
    assert not model.training
    predicted = predict(model, x_test, test_vis, batch_size=50)
    assert predicted.shape == (128,) and predicted.dtype == torch.int64
    assert (predicted == y_test).float().mean() > 0.85  # chance: 0.25


# --- the score table ------------------------------------------------------------------------------


def test_pseudo_scores_match_unflipped_central_squares_by_uri(tmp_path: Path) -> None:
    images, labels = fashion_mnist(4)
    folder = write_folder(tmp_path / "images", images, labels)
    wide = np.zeros((28, 40), np.uint8)  # a non-square image: its central square is not the whole
    (folder / str(labels[0]) / "wide.png").write_bytes(png_bytes(wide))
    test, _, skipped = load_labelled(str(folder), 32)
    assert not skipped and len(test.uris) == 5
    w = test.uris.index(next(u for u in test.uris if u.endswith("wide.png")))
    assert test.boxes[w] == (6.0, 0.0, 34.0, 28.0)

    def row(i: int, box: tuple[float, ...], flip: bool, first: float) -> dict:
        return {
            "image_id": test.image_ids[i],
            "uri": test.uris[i],
            "label": "x",
            "view": 0,
            "crop_box": list(box),
            "flip": flip,
            "visible": [3, 7, 9],
            "scores": [first, 0.5, 0.25],
        }

    others = [i for i in range(5) if i != w]
    table = write_table(
        tmp_path / "one",
        [
            row(w, test.boxes[w], True, 9.0),  # flipped: not used
            row(w, test.boxes[w], False, 1.0),  # the one to use
            row(others[0], (0.0, 0.0, 20.0, 20.0), False, 9.0),  # a random crop: not used
            row(others[1], test.boxes[others[1]], True, 9.0),  # only flipped: not covered
            {**row(others[3], test.boxes[others[3]], False, 9.0), "uri": "file:///elsewhere/0001.png"},
        ],
    )
    second = write_table(tmp_path / "two", [row(others[2], test.boxes[others[2]], False, 2.0)])
    covered, visible, scores = pseudo_scores([str(table), str(second)], test)
    assert covered.tolist() == sorted([w, others[2]])
    by_image = dict(zip(covered.tolist(), scores[:, 0].tolist(), strict=True))
    assert by_image == {w: 1.0, others[2]: 2.0}
    assert visible.tolist() == [[3, 7, 9]] * 2 and visible.dtype == torch.int64
    assert scores.dtype == torch.float32
    with pytest.raises(ValueError, match="no held-out image has an unflipped central-square row") as err:
        pseudo_scores([str(table)], test.subset([others[1]]))  # its only row is flipped
    assert str(table) in str(err.value)


# --- a small real evaluation, and its report -----------------------------------------------------


@pytest.fixture(scope="module")
def small_result(tmp_path_factory: pytest.TempPathFactory) -> EvaluationResult:
    """evaluate() on 48 training and 24 held-out Fashion-MNIST images (disjoint), tiny random models."""
    root = tmp_path_factory.mktemp("small")
    images, labels = fashion_mnist(72)
    test_dir = write_folder(root / "test", images[:24], labels[:24])
    train_dir = write_folder(root / "train", images[24:], labels[24:], first=24)
    torch.manual_seed(0)
    mae = ltrp.MAE(SMALL_MAE).eval()
    ranker = Ranker(SMALL_RANKER).eval()
    train, classes, _ = load_labelled(str(train_dir), 32)
    test, _, _ = load_labelled(str(test_dir), 32, classes)
    covered, visible, pseudo = pseudo_scores(
        [str(write_table(root / "table", score_rows(test_dir, mae)))], test
    )
    assert len(covered) == len(test.uris)
    settings = EvalSettings(
        keep_ratios=(0.25, 0.5),
        classifier=ClassifierConfig(embed_dim=32, depth=1, num_heads=2, epochs=1),
        resamples=200,
        examples=3,
    )
    return evaluate(ranker, mae, train, test, visible, pseudo, classes, settings, progress=lambda _: None)


def test_evaluate_measures_every_scorer(small_result: EvaluationResult) -> None:
    r = small_result
    assert r.scorers[:2] == ["ltrp", "oracle"] and "supervised" in r.scorers and "folk_rcom" in r.scorers
    assert r.test_images == 24 and r.train_images == 48
    for name in r.scorers:
        keys = set(r.estimates[name])
        assert {"kendall_tau", "spearman", "reconstruction_error.keep25", "ndcg.keep50"} <= keys, name
        assert ("accuracy.keep25" in keys) == (name != "oracle"), name  # no oracle for training images
        for key, e in r.estimates[name].items():
            if key.startswith("accuracy_") and np.isnan(e.mean):
                continue  # no held-out image of that group
            assert e.lo <= e.mean <= e.hi, (name, key)
    # The oracle agrees perfectly with the pseudo-scores on every image; the random ranker does not,
    # so ltrp minus oracle, paired on the same images, excludes 0.
    assert r.estimates["oracle"]["kendall_tau"].mean == pytest.approx(1.0)
    assert r.paired["oracle"]["kendall_tau"].hi < 0
    assert "ltrp" not in r.paired and set(r.paired) == set(r.scorers) - {"ltrp"}
    assert r.examples.shape == (3, 32, 32, 3) and r.example_keep["ltrp"].shape == (3, 16)
    assert len(r.seen_classes) == len(r.classes) // 2


def test_write_report(small_result: EvaluationResult, tmp_path: Path) -> None:
    paths = write_report(small_result, tmp_path / "report", "Evaluation of a test ranker")
    assert [p.name for p in paths] == [REPORT, CURVES, KEPT]
    text = (tmp_path / "report" / REPORT).read_text()
    assert text.startswith("# Evaluation of a test ranker")
    # the ratio-free table, then one per keep-ratio measure this evaluation has: ndcg, topk_overlap,
    # reconstruction_error, accuracy, accuracy_seen, accuracy_unseen
    tables = 1 + 6
    for name in small_result.scorers:
        assert text.count(f"| {name} |") == tables + (name != "ltrp"), name  # + the paired table
    assert "| scorer | keep 25% | keep 50% |" in text
    for png in (CURVES, KEPT):
        with Image.open(tmp_path / "report" / png) as img:
            assert img.format == "PNG"
            assert img.width >= 300 and img.height >= 200
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
