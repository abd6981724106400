"""Lineage in MLflow: the data a run learned from or was measured on, as datasets by reference (where
they are and a digest of what they hold), so that the UI and `mlflow.search_logged_models` can say
which score table trained a model and which held-out set its metrics come from."""

from __future__ import annotations

import hashlib
import json
import warnings

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset


def dataset(uri: str, name: str, digest: str) -> MetaDataset:
    """A dataset by reference: `uri` (a local path or a URL such as s3://...), its `name` and a digest
    of its content (at most 36 characters, MLflow's limit)."""
    with warnings.catch_warnings():  # MLflow 3 registers two local-file sources and warns of its own tie
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source=source, name=name, digest=digest[:36])


def table_digest(metadata: dict) -> str:
    """A score or rank table's digest: its job's fingerprint (corpus plan, model, result-changing
    settings), which decides every row."""
    identity = {key: metadata[key] for key in metadata["fingerprint"]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
