"""Logging a trained ranker to MLflow and registering it as a model version."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

import ltrp
from ltrp.ranker import Ranker


def register_ranker(
    model: Ranker, name: str, *, tags: dict[str, str], alias: str | None = None
) -> ModelVersion:
    """Logs `model` to the active MLflow run (with an input example and the signature inferred from
    it, and ltrp's source, so that loading needs no install) and registers it as a new version of
    `name`, tagged with `tags`, under `alias` if given."""
    size = model.cfg.img_size
    example = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    info = mlflow.pytorch.log_model(
        model.eval(),
        name="ranker",
        input_example=example,
        registered_model_name=name,
        code_paths=[str(Path(ltrp.__file__).parent)],
        # MLflow 3's default (pt2, torch.export) loads back a graph that refuses .eval() and drops the
        # `visible` argument; a pickled Ranker (its code shipped alongside) is the whole model.
        serialization_format="pickle",
        pip_requirements=["torch", "timm", "numpy"],
    )
    client = MlflowClient()
    version = client.get_model_version(name, str(info.registered_model_version))
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)
