"""Logging a trained ranker to MLflow and registering it as a model version; loading one back by
reference; promoting a version to the `champion` alias under ltrp.evaluation.promotion's policy, and
rolling that back."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient

from ltrp.core.ranker import Ranker, rank
from ltrp.data.checkpoints import load_ranker, load_ranker_files, save_ranker_files, weights_sha256
from ltrp.evaluation.measures import from_tags
from ltrp.evaluation.promotion import Decision, Policy, decide
from ltrp.pipeline.configs import MODEL_VERSION

CHAMPION = "champion"
WEIGHTS_TAG = "weights_sha256"  # the registered weights' digest, checked on every load
#: Pinned, at the versions installed, in every logged ranker: what loading it needs (ltrp: the loader).
_REQUIREMENTS = ("ltrp", "torch", "timm", "safetensors", "numpy", "mlflow")


def register_ranker(
    model: Ranker, name: str, *, tags: dict[str, str], alias: str | None = None
) -> ModelVersion:
    """Logs `model` to the active MLflow run as weights and geometry (`save_ranker_files`: no pickle),
    a pyfunc flavour whose loader is this module of the installed ltrp (so loading runs no code from
    the artifact store), with an input example, the signature inferred from it and the requirements it
    was trained with pinned; registers it as a new version of `name`, tagged with `tags` and the
    weights' digest (`weights_sha256`, checked on every load), under `alias` if given."""
    size = model.cfg.img_size
    example = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    output = rank(model, torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as folder:
        save_ranker_files(model, folder)
        info = mlflow.pyfunc.log_model(
            name="ranker",
            loader_module=__name__,
            data_path=folder,
            input_example=example,
            signature=infer_signature(example, output),  # MLflow infers none for a loader_module
            registered_model_name=name,
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in _REQUIREMENTS],
        )
    client = MlflowClient()
    registered = str(info.registered_model_version)
    for key, value in {**tags, WEIGHTS_TAG: weights_sha256(model)}.items():
        client.set_model_version_tag(name, registered, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, registered)
    return client.get_model_version(name, registered)


def load_ranker_ref(uri: str) -> tuple[Ranker, ModelVersion | None]:
    """A ranker by reference: from the registry (models:/NAME/VERSION or models:/NAME@ALIAS, with its
    version) or from a training checkpoint file (no version), in eval mode on the CPU. A registered
    ranker is read from its weights and geometry files only, and must have the digest its version was
    tagged with at registration.

    Raises:
        ValueError: not in the registry, not an ltrp ranker, weights changed since registration, or not
            a ranker checkpoint (named in the message).
        FileNotFoundError: the checkpoint file does not exist.
    """
    match = MODEL_VERSION.match(uri)
    if not match:
        if uri.startswith("models:/"):
            raise ValueError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return load_ranker(uri), None
    client = MlflowClient()
    name = match["name"]
    try:
        version = (
            client.get_model_version(name, match["version"])
            if match["version"]
            else client.get_model_version_by_alias(name, match["alias"])
        )
    except MlflowException as err:
        raise ValueError(
            f"{uri}: not in the registry at {mlflow.get_tracking_uri()}: {err.message}"
        ) from None
    if WEIGHTS_TAG not in version.tags:
        raise ValueError(
            f"{uri} (version {version.version}) has no {WEIGHTS_TAG} tag: not a ranker registered by ltrp "
            "(or registered by an older ltrp, which pickled rankers: register it again)"
        )
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=folder)
        data = Model.load(local).flavors["python_function"].get("data", "")
        model = load_ranker_files(str(Path(local) / data))
    if (digest := weights_sha256(model)) != version.tags[WEIGHTS_TAG]:
        raise ValueError(
            f"{uri} (version {version.version}): its weights' sha256 is {digest}, not the {WEIGHTS_TAG} "
            f"{version.tags[WEIGHTS_TAG]} recorded at registration: the artifact was changed; refusing it"
        )
    return model, version


class _PyfuncRanker:
    """The pyfunc flavour's model: (N, 3, S, S) float32 normalised images -> (N, L) patch scores."""

    def __init__(self, model: Ranker) -> None:
        self.model = model

    def predict(self, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        return rank(self.model, torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


def _load_pyfunc(data_path: str) -> _PyfuncRanker:
    """MLflow's entry point for `mlflow.pyfunc.load_model` (loader_module): the ranker files only."""
    return _PyfuncRanker(load_ranker_files(data_path))


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be carried out (as opposed to a candidate refused)."""


@dataclass(frozen=True)
class Promotion:
    """What `promote` did.

    Attributes:
        decision: the policy's decision (for an unchanged champion: promote=False, nothing compared).
        outcome: "promoted", "refused", "dry-run" (nothing moved; `decision.promote` says what would
            have happened) or "unchanged" (the candidate already is champion; nothing recorded).
        champion: the champion version the candidate was compared with, None if there was none.
    """

    decision: Decision
    outcome: str
    champion: str | None


def champion_version(name: str, client: MlflowClient | None = None) -> str | None:
    """The version that `name`'s `champion` alias points at, None if the alias is not set."""
    client = client or MlflowClient()
    # The registered model's alias map says "not set" without an exception to tell apart from others;
    # its versions are ints from a SQLite registry and strings over REST.
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if version is None else str(version)


def promote(
    name: str,
    candidate: str,
    policy: Policy,
    *,
    dry_run: bool = False,
    client: MlflowClient | None = None,
) -> Promotion:
    """Compares version `candidate` of `name` with its champion under `policy`, moves the `champion`
    alias to it if the policy allows (and not `dry_run`), and records on the candidate the tags
    `promotion.decision` (promoted, refused or dry-run), `.reason`, `.evidence` (JSON), `.policy`
    (JSON), `.previous_champion` (the champion at decision time, "" if none) and `.time` (UTC ISO 8601).

    Raises:
        mlflow.exceptions.MlflowException: the model or version does not exist.
    """
    client = client or MlflowClient()
    candidate = str(candidate)
    tags = client.get_model_version(name, candidate).tags
    current = champion_version(name, client)
    if current == candidate:
        # Comparing the champion with itself would refuse it and overwrite the record rollback reads.
        return Promotion(Decision(False, f"version {candidate} already is {CHAMPION}"), "unchanged", current)
    theirs = None if current is None else client.get_model_version(name, current).tags
    decision = decide(
        from_tags(tags),
        None if theirs is None else from_tags(theirs),
        policy,
        candidate_dataset=tags.get("eval.dataset"),
        champion_dataset=None if theirs is None else theirs.get("eval.dataset"),
    )
    outcome = "dry-run" if dry_run else "promoted" if decision.promote else "refused"
    reason = decision.reason
    if dry_run:
        reason = ("would promote: " if decision.promote else "would refuse: ") + reason
    record = {
        "decision": outcome,
        "reason": reason,
        "evidence": json.dumps(decision.evidence, sort_keys=True),
        "policy": json.dumps(policy.to_dict(), sort_keys=True),
        "previous_champion": current or "",
        "time": _now(),
    }
    # Tags before the alias: a champion must never exist without the record that rollback reads.
    for key, value in record.items():
        client.set_model_version_tag(name, candidate, f"promotion.{key}", value)
    if outcome == "promoted":
        client.set_registered_model_alias(name, CHAMPION, candidate)
    return Promotion(decision, outcome, current)


def rollback(name: str, client: MlflowClient | None = None) -> tuple[str, str]:
    """Moves `champion` back to the version the current champion replaced (its
    `promotion.previous_champion`), and tags the current one `promotion.rolled_back_to` and
    `promotion.rolled_back_time`. Rolling back again walks further back through the promotions.

    Returns:
        (the version rolled back from, the version that is champion now).

    Raises:
        PromotionError: no champion, a champion not promoted by `promote`, or one that replaced none.
    """
    client = client or MlflowClient()
    current = champion_version(name, client)
    if current is None:
        raise PromotionError(f"{name} has no {CHAMPION}: nothing to roll back")
    tags = client.get_model_version(name, current).tags
    if tags.get("promotion.decision") != "promoted":
        raise PromotionError(
            f"{CHAMPION} version {current} of {name} was not promoted by jobs.promote "
            f"(promotion.decision={tags.get('promotion.decision', '(none)')}): no previous champion recorded"
        )
    previous = tags.get("promotion.previous_champion", "")
    if not previous:
        raise PromotionError(
            f"{CHAMPION} version {current} of {name} was the first model: there is none to roll back to"
        )
    client.get_model_version(name, previous)  # fails clearly if that version was deleted since
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, "promotion.rolled_back_to", previous)
    client.set_model_version_tag(name, current, "promotion.rolled_back_time", _now())
    return current, previous


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
