"""The promotion job against a real MLflow registry: the launcher as users (and CI) run it, deciding by
each version's logged model's metrics (its tags are a summary it does not read); and those metrics
compared across versions as the MLflow UI compares them, with `mlflow.search_logged_models`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from support import PRIMARY, SCENE_PRIMARY, evaluation, scene_evaluation

from jobs.promote import main
from ltrp.evaluation.measures import Estimate, to_tags
from ltrp.evaluation.promotion import Policy
from ltrp.pipeline import lineage
from ltrp.pipeline.registry import (
    HELD_OUT,
    PromotionError,
    champion_version,
    log_evaluation,
    logged_model_id,
    promote,
)
from ltrp.pipeline.runtime import tracking_uri


def register_version(name: str, experiment_id: str) -> ModelVersion:
    """A new version of `name` registered from a logged model of its own, as `register_ranker`'s are
    (without weights: the registry and the metrics need only the logged model)."""
    model = mlflow.create_external_model(name=name, experiment_id=experiment_id)
    registered = mlflow.register_model(f"models:/{model.model_id}", name)
    return MlflowClient().get_model_version(name, str(registered.version))


def log_evaluated(version: ModelVersion, estimates: dict[str, Estimate], digest: str, data: Path) -> None:
    """`estimates` on `version`'s logged model as `python -m jobs.evaluate` logs them: from an evaluation
    run in an experiment of its own, on the held-out dataset (at `data`, with `digest`)."""
    evaluations = mlflow.get_experiment_by_name("ltrp-evaluate")
    with mlflow.start_run(
        experiment_id=evaluations.experiment_id if evaluations else mlflow.create_experiment("ltrp-evaluate")
    ):
        log_evaluation(version, estimates, lineage.dataset(str(data), HELD_OUT, digest))


def summarise(client: MlflowClient, version: ModelVersion, estimates: dict[str, Estimate]) -> None:
    """`estimates` as `version`'s eval.* tags, the summary for people: here other figures than its
    metrics, so that a decision that read them would differ (or, alone, an older ltrp's only record)."""
    for key, value in (to_tags(estimates) | {"eval.dataset": "d1"}).items():
        client.set_model_version_tag(version.name, version.version, key, value)


def promote_job(uri: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m jobs.promote --model models:/ranker ARGS` as a user (or CI) runs it."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.promote", "--model", "models:/ranker", *args],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )


def promote_main(
    uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> subprocess.CompletedProcess:
    """The same, in this process: each `python -m` pays seconds of importing MLflow on a 2-core
    machine, so only the refusal, whose exit code a shell must see, runs as a subprocess."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["--model", "models:/ranker", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.slow
def test_promote_job_against_mlflow(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    client = MlflowClient(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.set_experiment("promotion-test").experiment_id
    # (metrics, tags) per version: each decision must follow the metrics, which the tags contradict.
    evaluations = {
        "1": (evaluation(), evaluation(recon=0.020)),  # tags better than 2's metrics
        "2": (evaluation(reconstruction_error_keep25=0.030), evaluation(recon=0.050, acc=0.70)),
        "3": (evaluation(recon=0.050, acc=0.70), evaluation(recon=0.010, acc=0.99)),  # worse than 2
        "4": (None, evaluation(recon=0.010, acc=0.99)),  # evaluated by an older ltrp: tags only
    }
    versions = {}
    for number, (metrics, tags) in evaluations.items():
        versions[number] = register_version("ranker", experiment)
        assert versions[number].version == number
        if number == "2":  # evaluated twice: the earlier, worse evaluation must not count
            log_evaluated(versions[number], evaluation(recon=0.050, acc=0.70), "d1", tmp_path)
        if metrics is not None:
            log_evaluated(versions[number], metrics, "d1", tmp_path)
        summarise(client, versions[number], tags)

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

    # Refused before anything is recorded: version 4 has tags (an older ltrp's) but no metrics.
    unevaluated = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "4")
    assert unevaluated.returncode == 1
    assert (
        f"candidate version 4 of ranker (logged model {logged_model_id(versions['4'])})" in unevaluated.stderr
    )
    assert "python -m jobs.evaluate --model models:/ranker/4" in unevaluated.stderr
    assert promotion_tags("4") == {} and champion() == "1"

    dry = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert champion() == "1"
    assert promotion_tags("2")["decision"] == "dry-run"
    assert promotion_tags("2")["reason"].startswith("would promote")

    unknown = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "candidate")
    assert unknown.returncode == 1 and "candidate" in unknown.stderr  # no such alias yet
    client.set_registered_model_alias("ranker", "candidate", "2")
    better = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "candidate")  # the alias's version
    assert better.returncode == 0, better.stderr
    assert "candidate version 2" in better.stdout
    assert champion() == "2"
    tags = promotion_tags("2")
    assert tags["decision"] == "promoted" and tags["previous_champion"] == "1"
    evidence = json.loads(tags["evidence"])[PRIMARY]
    assert evidence["candidate"] == pytest.approx([0.030, 0.028, 0.032])  # the latest evaluation's
    assert evidence["champion"] == pytest.approx([0.040, 0.038, 0.042])  # version 1's metrics, not tags
    assert json.loads(tags["policy"]) == Policy().to_dict()
    assert tags["time"].endswith("+00:00")
    assert PRIMARY in better.stdout and "yes" in better.stdout  # the evidence table

    worse = promote_job(mlflow_uri, tmp_path, "--candidate", "3")  # its tags say far better
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

    # A champion without metrics is refused as well, by its name, and nothing is recorded on the candidate.
    client.set_registered_model_alias("ranker", "champion", "4")
    refused = promotion_tags("3")
    against = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "3")
    assert against.returncode == 1 and "champion version 4 of ranker" in against.stderr
    assert promotion_tags("3") == refused and champion() == "4"
    assert not (tmp_path / "mlruns").exists()  # everything went to the server


@pytest.mark.slow
def test_versions_compared_by_object_recall_with_search_logged_models(
    mlflow_uri: str, tmp_path: Path
) -> None:
    """Two evaluated versions ranked and filtered by object recall on the held-out set, as the MLflow
    UI's comparison of logged models does, and promotion deciding as that ranking says."""
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.set_experiment("recall-test").experiment_id
    name, key = "ranker-by-recall", f"{SCENE_PRIMARY}.mean"
    first, second = register_version(name, experiment), register_version(name, experiment)
    # The earlier version recalls more: the order below is the metric's, not the newest-first default.
    log_evaluated(first, scene_evaluation(recall=0.7), "d1", tmp_path)
    log_evaluated(second, scene_evaluation(recall=0.6), "d1", tmp_path)
    version_of = {logged_model_id(v): v.version for v in (first, second)}

    def ranked(ascending: bool, filter_string: str | None = None) -> list[str]:
        by_recall = {"field_name": f"metrics.{key}", "ascending": ascending}
        found = mlflow.search_logged_models(
            experiment_ids=[experiment],
            filter_string=filter_string,
            order_by=[by_recall | {"dataset_name": HELD_OUT, "dataset_digest": "d1"}],
            output_format="list",
        )
        return [version_of[m.model_id] for m in found]

    assert ranked(ascending=False) == ["1", "2"]
    assert ranked(ascending=True) == ["2", "1"]
    assert ranked(ascending=False, filter_string=f"metrics.`{key}` > 0.65") == ["1"]
    assert promote(name, "2", Policy()).outcome == "promoted"  # the first model
    assert promote(name, "1", Policy()).outcome == "promoted"  # beyond version 2's interval
    assert champion_version(name) == ranked(ascending=False)[0]


@pytest.mark.slow
def test_promote_on_the_default_sqlite_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers' default registry (sqlite:///mlflow.db) hands alias versions back as ints; a
    version registered from a path, without a logged model, has no metrics to promote by."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())  # for the fluent API the evaluation logs with
    log_evaluated(register_version("ranker", "0"), evaluation(), "d1", tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # (set_tracking_uri exports it) the launchers' default again
    assert main(["--model", "models:/ranker", "--candidate", "1"]) == 0
    assert champion_version("ranker", client) == "1"
    assert promote("ranker", "1", Policy(), client=client).outcome == "unchanged"
    client.create_model_version("ranker", str(tmp_path))
    with pytest.raises(
        PromotionError, match=r"version 2 of ranker was registered from .*not from a logged model"
    ):
        promote("ranker", "2", Policy(), client=client)
