"""Rankers in the MLflow registry (SQLite, artifacts in a local folder): weights and geometry files,
no pickle; loading runs no code from the artifact store and refuses weights changed after registration."""

from __future__ import annotations

import pickle
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, rank
from ltrp.data.checkpoints import RANKER_WEIGHTS, save_ranker_files, weights_sha256
from ltrp.pipeline.registry import WEIGHTS_TAG, load_ranker_ref, register_ranker

GEOMETRY = "ltrp_vit_micro_patch8"


class _Planted:
    """A pickle that, if anything ever unpickled it, would create the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Ranker, Path]:
    """Version 1 of `ranker` (@champion) in a SQLite registry; (the ranker, the artifacts folder)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # (the environment is restored after)
    artifacts = tmp_path / "artifacts"
    experiment = mlflow.create_experiment("registry-test", artifact_location=str(artifacts))
    torch.manual_seed(0)
    ranker = Ranker(RANKER_GEOMETRIES[GEOMETRY])
    with mlflow.start_run(experiment_id=experiment):
        register_ranker(ranker, "ranker", tags={"source": "test"}, alias="champion")
    return ranker, artifacts


def _model_folder(artifacts: Path) -> Path:
    (mlmodel,) = artifacts.rglob("MLmodel")
    return mlmodel.parent


@pytest.mark.slow
def test_a_registered_ranker_is_files_not_code_and_loads_by_alias_version_and_pyfunc(
    registered: tuple[Ranker, Path],
) -> None:
    ranker, artifacts = registered
    folder = _model_folder(artifacts)
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert RANKER_WEIGHTS in files and "ranker.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files
    flavors = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]
    assert set(flavors) == {"python_function"}  # no pytorch flavour, whose loader unpickles
    assert flavors["python_function"]["loader_module"] == "ltrp.pipeline.registry"
    signature = mlflow.models.get_model_info("models:/ranker@champion").signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 64, 64)
    requirements = (folder / "requirements.txt").read_text().split()
    assert f"torch=={metadata.version('torch')}" in requirements and all("==" in r for r in requirements)

    images = torch.randn(3, 3, 64, 64)
    by_alias, version = load_ranker_ref("models:/ranker@champion")
    by_number, _ = load_ranker_ref("models:/ranker/1")
    assert str(version.version) == "1" and version.tags[WEIGHTS_TAG] == weights_sha256(ranker)
    assert torch.equal(rank(by_alias, images), rank(ranker, images))
    assert torch.equal(rank(by_number, images), rank(ranker, images))
    pyfunc = mlflow.pyfunc.load_model("models:/ranker@champion")
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), rank(ranker, images).numpy(), rtol=1e-6)


@pytest.mark.slow
def test_changed_weights_are_refused_and_a_planted_pickle_never_runs(
    registered: tuple[Ranker, Path], tmp_path: Path
) -> None:
    _, artifacts = registered
    folder = _model_folder(artifacts)
    marker = tmp_path / "code-ran"
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    load_ranker_ref("models:/ranker@champion")  # loads: the weights are the registered ones
    assert not marker.exists()

    (weights,) = folder.rglob(RANKER_WEIGHTS)
    torch.manual_seed(1)
    save_ranker_files(
        Ranker(RANKER_GEOMETRIES[GEOMETRY]), str(weights.parent)
    )  # same geometry, other weights
    with pytest.raises(ValueError, match=r"models:/ranker@champion \(version 1\).*the artifact was changed"):
        load_ranker_ref("models:/ranker@champion")
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_ranker_ref("models:/ranker/1")
    assert not marker.exists()
