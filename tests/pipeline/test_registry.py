"""Rankers in the MLflow registry (SQLite, artifacts in a local folder): weights and geometry files and
their digest, no pickle, with the sources of the ltrp that logged them and requirements that any index
can install; `load_ranker_ref` runs none of that code, and every load path refuses weights changed after
registration."""

from __future__ import annotations

import io
import pickle
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ltrp.core.ranker import RANKER_GEOMETRIES, Ranker, rank
from ltrp.data.checkpoints import RANKER_WEIGHTS, save_ranker_files, weights_sha256
from ltrp.data.images import center_crop, to_model_input
from ltrp.pipeline.registry import DIGEST_FILE, WEIGHTS_TAG, load_ranker_ref, register_ranker

GEOMETRY = "ltrp_vit_micro_patch8"
#: What a logged ranker's requirements pin: public packages only, never ltrp itself.
PINNED = {
    "torch", "timm", "safetensors", "numpy", "pillow", "pandas", "pyarrow", "pyyaml", "fsspec", "s3fs",
    "mlflow",
}  # fmt: skip


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
def test_a_registered_ranker_is_files_and_sources_and_loads_by_alias_version_and_pyfunc(
    registered: tuple[Ranker, Path],
) -> None:
    ranker, artifacts = registered
    folder = _model_folder(artifacts)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert set(mlmodel["flavors"]) == {"python_function"}  # no pytorch flavour, whose loader unpickles
    assert flavor["loader_module"] == "ltrp.pipeline.registry"
    data = folder / flavor["data"]
    assert {p.name for p in data.iterdir()} == {RANKER_WEIGHTS, "ranker.json", DIGEST_FILE}
    assert (data / DIGEST_FILE).read_text().strip() == weights_sha256(ranker)
    assert mlmodel["metadata"][WEIGHTS_TAG] == weights_sha256(ranker)
    # The code: the loader and the rest of the package, Python sources only (not the shipped MAEs).
    code = folder / flavor["code"] / "ltrp"
    assert (code / "pipeline" / "registry.py").is_file() and (code / "data" / "images.py").is_file()
    assert {p.suffix for p in code.rglob("*") if p.is_file()} == {".py"}
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files

    requirements = (folder / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == PINNED, requirements
    assert all(r == f"{r.split('==')[0]}=={metadata.version(r.split('==')[0])}" for r in requirements)
    info = mlflow.models.get_model_info("models:/ranker@champion")
    assert info.signature.inputs.to_dict() == [
        {"type": "binary", "name": "image", "required": False},
        {"type": "string", "name": "uri", "required": False},
    ]
    params = [(p.name, p.default) for p in info.signature.params.params]
    assert params == [("keep_ratio", 0.25), ("rounds", 8)]
    assert info.signature.outputs.input_names() == ["scores", "kept"]
    example = mlflow.models.Model.load(str(folder)).load_input_example(str(folder))
    assert list(example.columns) == ["image"] and Image.open(io.BytesIO(example["image"][0])).format == "PNG"

    images = torch.randn(3, 3, 64, 64)
    by_alias, version = load_ranker_ref("models:/ranker@champion")
    by_number, _ = load_ranker_ref("models:/ranker/1")
    assert str(version.version) == "1" and version.tags[WEIGHTS_TAG] == weights_sha256(ranker)
    assert torch.equal(rank(by_alias, images), rank(ranker, images))
    assert torch.equal(rank(by_number, images), rank(ranker, images))
    pyfunc = mlflow.pyfunc.load_model("models:/ranker@champion")
    expected = rank(ranker, to_model_input(np.stack([center_crop(example["image"][0], 64)])))
    np.testing.assert_allclose(pyfunc.predict(example)["scores"][0], expected[0].numpy(), rtol=1e-6)


@pytest.mark.slow
def test_changed_weights_are_refused_on_every_load_path_and_a_planted_pickle_never_runs(
    registered: tuple[Ranker, Path], tmp_path: Path
) -> None:
    ranker, artifacts = registered
    folder = _model_folder(artifacts)
    marker = tmp_path / "code-ran"
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    load_ranker_ref("models:/ranker@champion")  # loads: the weights are the registered ones
    mlflow.pyfunc.load_model("models:/ranker/1")
    assert not marker.exists()

    (weights,) = folder.rglob(RANKER_WEIGHTS)
    torch.manual_seed(1)
    other = Ranker(RANKER_GEOMETRIES[GEOMETRY])  # same geometry, other weights
    save_ranker_files(other, str(weights.parent))
    with pytest.raises(ValueError, match=r"models:/ranker@champion \(version 1\).*the artifact was changed"):
        load_ranker_ref("models:/ranker@champion")
    with pytest.raises(ValueError, match="the artifact was changed") as refused:
        mlflow.pyfunc.load_model("models:/ranker/1")
    assert f"sha256 is {weights_sha256(other)}, not the {weights_sha256(ranker)}" in str(refused.value)
    (weights.parent / DIGEST_FILE).unlink()
    with pytest.raises(ValueError, match=f"no {DIGEST_FILE} beside the weights"):
        mlflow.pyfunc.load_model("models:/ranker/1")
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_ranker_ref("models:/ranker/1")
    assert not marker.exists()
