"""The promotion job against a real MLflow registry: the launcher as users (and CI) run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from support import PRIMARY, evaluation

from jobs.promote import main
from ltrp.evaluation.measures import to_tags
from ltrp.evaluation.promotion import Policy
from ltrp.pipeline.registry import champion_version, promote
from ltrp.pipeline.runtime import tracking_uri


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

    unknown = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "candidate")
    assert unknown.returncode == 1 and "candidate" in unknown.stderr  # no such alias yet
    client.set_registered_model_alias("ranker", "candidate", "2")
    better = promote_main(mlflow_uri, monkeypatch, capsys, "--candidate", "candidate")  # the alias's version
    assert better.returncode == 0, better.stderr
    assert "candidate version 2" in better.stdout
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
    assert main(["--model", "models:/ranker", "--candidate", "1"]) == 0
    assert champion_version("ranker", client) == "1"
    assert promote("ranker", "1", Policy(), client=client).outcome == "unchanged"
