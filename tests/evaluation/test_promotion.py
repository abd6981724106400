"""Promotion: the policy as a pure function, then the launcher against a real MLflow registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs._cli import tracking_uri
from jobs.promote import main
from ltrp.evaluation.measures import KEEP_RATIOS, Estimate, metric_key, to_tags
from ltrp.evaluation.promotion import Decision, Policy, decide
from ltrp.pipeline.registry import champion_version, promote

PRIMARY = "reconstruction_error.keep25"
DEFAULT = Policy()


def evaluation(recon: float = 0.040, acc: float = 0.80, width: float = 0.002, **overrides: float) -> dict:
    """Every key the default policy needs: reconstruction_error (lower is better) and accuracy (higher)
    at every keep ratio, mean +/- `width`; `overrides` set single keys' means, e.g. accuracy_keep50=0.7."""
    means = {metric_key("reconstruction_error", r): recon for r in KEEP_RATIOS}
    means |= {metric_key("accuracy", r): acc for r in KEEP_RATIOS}
    means |= {k.replace("_keep", ".keep"): v for k, v in overrides.items()}
    return {k: Estimate(m, m - width, m + width) for k, m in means.items()}


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
    policy = Policy(primary="accuracy", primary_ratio=0.5)
    assert run_decide(evaluation(accuracy_keep50=0.801), evaluation(), policy).promote is False
    assert run_decide(evaluation(accuracy_keep50=0.85), evaluation(), policy).promote is True


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
    candidate = evaluation(recon=0.5, acc=0.8) | {"kendall_tau": Estimate(0.6, 0.58, 0.62)}
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


# --- the launcher against a real MLflow server -------------------------------------------------


def promote_job(uri: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m jobs.promote --model ranker ARGS` as a user (or CI) runs it."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.promote", "--model", "ranker", *args],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )


def promote_main(
    uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> subprocess.CompletedProcess:
    """The same, in this process: each `python -m` pays ~10 s of importing torch (ltrp/__init__.py)
    on a 2-core machine, so only the refusal, whose exit code a shell must see, runs as a subprocess."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["--model", "ranker", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.slow
def test_promote_job_against_mlflow(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    client = MlflowClient(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("promotion-test")
    with mlflow.start_run() as run:
        mlflow.log_text("not a ranker: the registry only needs a source to point at", "model/README.txt")
    client.create_registered_model("ranker")
    evaluations = {
        "1": evaluation(),
        "2": evaluation(reconstruction_error_keep25=0.030),  # better than 1 on the primary, no worse
        "3": evaluation(recon=0.050, acc=0.70),  # worse than 2 everywhere
    }
    for version, estimates in evaluations.items():
        created = client.create_model_version("ranker", f"{run.info.artifact_uri}/model", run.info.run_id)
        assert created.version == version
        tags = to_tags(estimates) | {"eval.dataset": "d1", "eval.run_id": run.info.run_id}
        for key, value in tags.items():
            client.set_model_version_tag("ranker", version, key, value)

    def champion() -> str | None:
        return client.get_registered_model("ranker").aliases.get("champion")

    def promotion_tags(version: str) -> dict[str, str]:
        tags = client.get_model_version("ranker", version).tags
        return {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")}

    first = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "1")
    assert first.returncode == 0, first.stderr
    assert champion() == "1"
    assert promotion_tags("1")["decision"] == "promoted"
    assert promotion_tags("1")["previous_champion"] == ""
    assert "first model" in first.stdout

    dry = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert champion() == "1"
    assert promotion_tags("2")["decision"] == "dry-run"
    assert promotion_tags("2")["reason"].startswith("would promote")

    better = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "2")
    assert better.returncode == 0, better.stderr
    assert champion() == "2"
    tags = promotion_tags("2")
    assert tags["decision"] == "promoted" and tags["previous_champion"] == "1"
    assert json.loads(tags["evidence"])[PRIMARY]["champion"] == pytest.approx([0.040, 0.038, 0.042])
    assert json.loads(tags["policy"]) == Policy().to_dict()
    assert tags["time"].endswith("+00:00")
    assert PRIMARY in better.stdout and "yes" in better.stdout  # the evidence table

    worse = promote_job(mlflow_uri, tmp_path, "--candidate", "3")
    assert worse.returncode == 3, worse.stderr
    assert champion() == "2"
    assert promotion_tags("3")["decision"] == "refused"
    assert PRIMARY in promotion_tags("3")["reason"]
    assert "REFUSED" in worse.stdout

    back = promote_main(mlflow_uri, monkeypatch, capsys, "--rollback")
    assert back.returncode == 0, back.stderr
    assert champion() == "1"
    assert promotion_tags("2")["rolled_back_to"] == "1"

    # Version 1 was the first model: there is nothing earlier, and the job says so.
    nothing = promote_main(mlflow_uri, monkeypatch, capsys, "--rollback")
    assert nothing.returncode == 1
    assert "first model" in nothing.stderr
    assert champion() == "1"

    # Promoting the champion itself changes nothing and records nothing over its promotion.
    again = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "1")
    assert again.returncode == 0 and "already is champion" in again.stdout
    assert promotion_tags("1")["decision"] == "promoted"
    assert not (tmp_path / "mlruns").exists()  # everything went to the server


@pytest.mark.slow
def test_promote_on_the_default_sqlite_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers' default registry (sqlite:///mlflow.db) hands alias versions back as ints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri())
    client.create_registered_model("ranker")
    client.create_model_version("ranker", str(tmp_path))
    for key, value in (to_tags(evaluation()) | {"eval.dataset": "d1"}).items():
        client.set_model_version_tag("ranker", "1", key, value)
    assert main(["--model", "ranker", "--candidate", "1"]) == 0
    assert champion_version("ranker", client) == "1"
    assert promote("ranker", "1", Policy(), client=client).outcome == "unchanged"
