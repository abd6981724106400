"""The promotion policy, a pure function of two evaluations (the registry and the job: tests/pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import PRIMARY, SCENE_PRIMARY, evaluation, scene_evaluation

from ltrp.evaluation.measures import Estimate
from ltrp.evaluation.promotion import Decision, Policy, decide

DEFAULT = Policy()


def run_decide(
    candidate: dict,
    champion: dict | None,
    policy: Policy = DEFAULT,
    *,
    candidate_dataset: str = "d1",
    champion_dataset: str = "d1",
) -> Decision:
    return decide(
        candidate, champion, policy, candidate_dataset=candidate_dataset, champion_dataset=champion_dataset
    )


@pytest.mark.parametrize(
    ("candidate", "promote", "names"),
    [
        # better: the mean 0.030 lies below the champion's interval [0.038, 0.042]
        (evaluation(reconstruction_error_keep25=0.030), True, []),
        # within the champion's interval on the primary: not better beyond noise
        (evaluation(reconstruction_error_keep25=0.039), False, [PRIMARY]),
        # worse everywhere
        (evaluation(recon=0.050, acc=0.70), False, [PRIMARY, "accuracy.keep10"]),
        # mixed: better on the primary, worse on one guarded ratio, which the reason names
        (evaluation(reconstruction_error_keep25=0.030, accuracy_keep50=0.70), False, ["accuracy.keep50"]),
        # a guarded ratio just inside the champion's interval on the bad side is "no worse"
        (evaluation(reconstruction_error_keep25=0.030, reconstruction_error_keep75=0.0415), True, []),
    ],
    ids=["better", "within-noise", "worse", "mixed", "guard-within-noise"],
)
def test_decide_against_a_champion(candidate: dict, promote: bool, names: list[str]) -> None:
    decision = run_decide(candidate, evaluation())
    assert decision.promote is promote
    for name in names:
        assert name in decision.reason
    assert decision.evidence[PRIMARY]["role"] == "primary"
    assert decision.evidence[PRIMARY]["champion"] == pytest.approx([0.040, 0.038, 0.042])
    failing = sorted(k for k, row in decision.evidence.items() if not row["ok"])
    assert (failing == []) is promote


def test_decide_higher_is_better_primary() -> None:
    policy = Policy(primary="accuracy", primary_ratio=0.5, beat_random=False)
    assert run_decide(evaluation(accuracy_keep50=0.801), evaluation(), policy).promote is False
    assert run_decide(evaluation(accuracy_keep50=0.85), evaluation(), policy).promote is True


@pytest.mark.parametrize("champion", [None, evaluation(recon=0.1)], ids=["first-model", "with-champion"])
@pytest.mark.parametrize(
    ("vs_random", "promote"), [(-0.01, True), (0.0, False), (0.01, False), (None, False)]
)
def test_the_floor_no_champion_unless_it_beats_random(
    champion: dict | None, vs_random: float | None, promote: bool
) -> None:
    """Ranker minus random on the primary (reconstruction error: lower is better) must exclude 0 below."""
    candidate = evaluation()
    key = "vs_random." + PRIMARY
    if vs_random is None:
        del candidate[key]
    else:
        candidate[key] = Estimate(vs_random, vs_random - 0.002, vs_random + 0.002)
    decision = run_decide(candidate, champion)
    assert decision.promote is promote
    if not promote:
        expected = f"does not beat random on {PRIMARY}" if vs_random is not None else f"lacks {key}"
        assert expected in decision.reason
    assert run_decide(candidate, champion, Policy(beat_random=False)).promote  # the floor is a setting


def test_auto_policy_ranks_by_object_recall_where_the_data_has_masks() -> None:
    scene = scene_evaluation()
    resolved = Policy().resolved(scene)
    assert resolved.primary_key == SCENE_PRIMARY and "background_share.keep10" in resolved.required_keys
    assert Policy().resolved(evaluation()).primary_key == PRIMARY  # the fallback without masks
    assert run_decide(scene, None).promote
    better = scene_evaluation(object_recall_keep25=0.7)
    assert run_decide(better, scene).promote and not run_decide(scene, better).promote
    with pytest.raises(ValueError, match="best at 0"):
        Policy(primary="bias_gap")


def test_first_model_is_promoted_when_it_carries_the_metrics() -> None:
    decision = decide(evaluation(), None, Policy(), candidate_dataset="d1", champion_dataset=None)
    assert decision.promote
    assert "first model" in decision.reason
    assert decision.evidence[PRIMARY]["champion"] is None


@pytest.mark.parametrize("champion", [None, evaluation()], ids=["first-model", "with-champion"])
def test_candidate_missing_metrics_is_refused(champion: dict | None) -> None:
    candidate = evaluation(reconstruction_error_keep25=0.030)
    del candidate["accuracy.keep75"], candidate[PRIMARY]
    decision = run_decide(candidate, champion)
    assert not decision.promote
    assert "candidate lacks metrics reconstruction_error.keep25, accuracy.keep75" in decision.reason


def test_champion_missing_metrics_is_refused_until_re_evaluated() -> None:
    champion = evaluation()
    del champion["accuracy.keep10"]
    decision = run_decide(evaluation(reconstruction_error_keep25=0.030), champion)
    assert not decision.promote
    assert "champion lacks metrics accuracy.keep10" in decision.reason
    assert "re-evaluate the champion" in decision.reason


@pytest.mark.parametrize("candidate_dataset", ["d2", ""], ids=["different", "none"])
def test_incomparable_datasets_are_refused(candidate_dataset: str) -> None:
    better = evaluation(recon=0.010, acc=0.99)
    decision = run_decide(better, evaluation(), candidate_dataset=candidate_dataset)
    assert not decision.promote
    assert "not comparable" in decision.reason and "d1" in decision.reason


def test_policy_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("primary: kendall_tau\nprimary_ratio: null\nguarded: [accuracy]\nguard_ratios: [0.5]\n")
    policy = Policy.from_yaml(path)
    assert policy.required_keys == ["kendall_tau", "accuracy.keep50"]
    assert Policy.from_dict(policy.to_dict()) == policy
    # Only the keys it names are compared: reconstruction_error may regress under this policy.
    candidate = evaluation(recon=0.5, acc=0.8) | {
        "kendall_tau": Estimate(0.6, 0.58, 0.62),
        "vs_random.kendall_tau": Estimate(0.5, 0.45, 0.55),
    }
    champion = evaluation() | {"kendall_tau": Estimate(0.5, 0.48, 0.52)}
    assert run_decide(candidate, champion, policy).promote
    (tmp_path / "empty.yaml").write_text("")
    assert Policy.from_yaml(tmp_path / "empty.yaml") == Policy()


@pytest.mark.parametrize(
    "text",
    ["primari: accuracy\n", "primary: bleu\n", "primary: kendall_tau\n", "primary_ratio: null\n"],
    ids=["unknown-key", "unknown-measure", "ratio-free-with-ratio", "ratio-missing"],
)
def test_bad_policy_is_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        Policy.from_yaml(path)
