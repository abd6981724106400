"""Logging a trained ranker to MLflow and registering it as a model version; loading one back by
reference; a version's evaluation as metrics of its logged model (`log_evaluation`, `evaluation_of`);
promoting a version to the `champion` alias under ltrp.evaluation.promotion's policy, which compares
those metrics, and rolling that back.

A registered ranker is its weights (safetensors) and geometry (JSON), never a pickle, plus a pyfunc
flavour that serves it: `mlflow.pyfunc.load_model(...).predict(frame)` takes a pandas DataFrame with a
column `image` (encoded image bytes) or `uri` (a path or fsspec URL), preprocesses each image exactly
as the scoring and ranking jobs do for their (default) centre view, and returns each row's patch
`scores` and `kept` positions. The
flavour's loader is this module, and the model carries the sources of the ltrp that logged it
(`code_paths`): a serving environment installs only public packages (the requirements pin them at the
versions that logged the model), and loading the pyfunc imports that copy of ltrp from the artifact
store (in a process that has not imported ltrp already). The artifact store is thus trusted with code,
as for any pyfunc model; `load_ranker_ref` still reads the files only and runs none of it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import torch
from mlflow.data.dataset import Dataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from ltrp.core.options import ROUNDS
from ltrp.core.ranker import Ranker, keep_top, rank
from ltrp.data.checkpoints import load_ranker, load_ranker_files, save_ranker_files, weights_sha256
from ltrp.data.images import ImageDecodeError, center_crop, png_bytes, to_model_input
from ltrp.data.sources import read_bytes
from ltrp.evaluation.measures import Estimate, from_metrics, to_metrics
from ltrp.evaluation.promotion import Decision, Policy, decide

CHAMPION = "champion"
#: The name of the dataset an evaluation's metrics are logged on: its held-out set (`log_evaluation`).
HELD_OUT = "held-out"
WEIGHTS_TAG = "weights_sha256"  # the registered weights' digest, checked on every load
#: Beside the weights in the logged model: their digest at registration, which the pyfunc loader checks
#: (it is handed the model's files only, not the registry version and its tag).
DIGEST_FILE = "ranker.sha256"
#: The pyfunc's predict parameter, and its default: the fraction of patches kept.
KEEP_RATIO = 0.25
#: Pinned, at the versions installed, in every logged ranker: the public packages its loader imports,
#: and s3fs, which fsspec imports for an s3:// `uri`. Not ltrp: the model carries its sources
#: (`code_paths`), and no index holds this project (an `ltrp` there would be someone else's, installed
#: into the serving environment).
_REQUIREMENTS = (
    "torch", "timm", "safetensors", "numpy", "pillow", "pandas", "pyarrow", "pyyaml", "fsspec", "s3fs",
    "mlflow",
)  # fmt: skip
#: What the pyfunc accepts, quoted by every input error.
ACCEPTED = (
    "expected a DataFrame with one column, `image` (encoded image bytes, any format PIL reads) or `uri` "
    "(a local path or fsspec URL); arrays are not accepted: encode them as PNG bytes "
    "(ltrp.data.images.png_bytes)"
)
#: The pyfunc's signature. MLflow casts any input to a DataFrame of these columns before the model sees
#: it (which is also how the scoring server decodes base64 `image` values in a JSON request); an image
#: array cannot be cast, so MLflow refuses it itself (its message quotes the array, unless the
#: environment sets MLFLOW_DISABLE_SCHEMA_DETAILS=true).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "uri", required=False)]),
    outputs=Schema([ColSpec(Array("float"), "scores"), ColSpec(Array("long"), "kept")]),
    params=ParamSchema([ParamSpec("keep_ratio", "double", KEEP_RATIO), ParamSpec("rounds", "long", ROUNDS)]),
)
_BATCH = 64  # images decoded and ranked at a time: bounds the pixels held, whatever the request's size


def register_ranker(
    model: Ranker, name: str, *, tags: dict[str, str], alias: str | None = None
) -> ModelVersion:
    """Logs `model` to the active MLflow run and registers it as a new version of `name`, tagged with
    `tags` and the weights' digest (`weights_sha256`), under `alias` if given.

    The logged model holds the weights and geometry (`save_ranker_files`: no pickle) and their digest
    (`DIGEST_FILE`), the sources of this ltrp (`code_paths`, for the pyfunc flavour's loader, this
    module), `SIGNATURE`, an input example (a small PNG) and the public packages the loader imports,
    pinned at the installed versions. `load_ranker_ref` checks the digest against the version's tag,
    the pyfunc loader against the file."""
    digest = weights_sha256(model)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder, "ranker")
        save_ranker_files(model, str(data))
        (data / DIGEST_FILE).write_text(f"{digest}\n")
        info = mlflow.pyfunc.log_model(
            name="ranker",
            loader_module=__name__,
            data_path=str(data),
            code_paths=[_package_sources(Path(folder, "code"))],
            signature=SIGNATURE,
            input_example=_frame({"image": [png_bytes(_example_pixels(model.cfg.img_size))]}),
            registered_model_name=name,
            pip_requirements=[f"{p}=={metadata.version(p)}" for p in _REQUIREMENTS],
            metadata={WEIGHTS_TAG: digest},
        )
    client = MlflowClient()
    registered = str(info.registered_model_version)
    for key, value in {**tags, WEIGHTS_TAG: digest}.items():
        client.set_model_version_tag(name, registered, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, registered)
    return client.get_model_version(name, registered)


def _package_sources(folder: Path) -> str:
    """A copy of the imported ltrp package's Python sources under FOLDER/ltrp, its path: what the model
    needs to load, without the shipped MAE weights and caches beside them."""

    def _not_sources(directory: str, names: list[str]) -> list[str]:
        def skipped(name: str) -> bool:
            if name in ("__pycache__", "weights"):
                return True
            return not name.endswith(".py") and not Path(directory, name).is_dir()

        return [n for n in names if skipped(n)]

    target = folder / "ltrp"
    shutil.copytree(Path(__file__).resolve().parents[1], target, ignore=_not_sources)  # ltrp/pipeline/..
    return str(target)


def _example_pixels(size: int) -> np.ndarray:
    """A (size, 3/2 size, 3) uint8 colour gradient: a real image, wider than square (so that it shows the
    centre crop), that compresses to a small PNG."""
    y, x = np.mgrid[0:size, 0 : size * 3 // 2]
    return np.stack([255 * x // x.max(), 255 * y // y.max(), 255 - 255 * x // x.max()], -1).astype(np.uint8)


def load_ranker_ref(uri: str) -> tuple[Ranker, ModelVersion | None]:
    """A ranker by reference: from the registry (models:/NAME/VERSION or models:/NAME@ALIAS, with its
    version) or from a training checkpoint file (no version), in eval mode on the CPU. A registered
    ranker is read from its weights and geometry files only (none of the code it carries runs), and
    must have the digest its version was tagged with at registration.

    Raises:
        ValueError: not in the registry, not an ltrp ranker, weights changed since registration, or not
            a ranker checkpoint (named in the message).
        FileNotFoundError: the checkpoint file does not exist.
    """
    # Here, not at the top: the configs need tyro, which a serving environment (this module is the
    # pyfunc's loader) does not install.
    from ltrp.pipeline.configs import MODEL_VERSION

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
    return _as_registered(model, version.tags[WEIGHTS_TAG], f"{uri} (version {version.version})"), version


def _as_registered(model: Ranker, expected: str, source: str) -> Ranker:
    """`model`, refused unless its weights have the digest `expected` recorded at registration (every
    load path checks it: `load_ranker_ref` against the version's tag, the pyfunc loader against the file)."""
    if (found := weights_sha256(model)) != expected:
        raise ValueError(
            f"{source}: its weights' sha256 is {found}, not the {expected} recorded at registration: "
            "the artifact was changed; refusing it"
        )
    return model


class _PyfuncRanker:
    """The pyfunc flavour's model: a DataFrame of images, one column of `image` bytes or of `uri`s ->
    a DataFrame of `scores` (the L patch scores, list of float) and `kept` (the positions `keep_top`
    keeps at the `keep_ratio` parameter, list of int), one row per input row, in order; `rounds` is
    `rank`'s (a ranker trained on sets of n ranks in such sets; 0: one pass seeing every patch). Each image is
    decoded, centre-cropped and resized to the ranker's size (`center_crop`) and normalised
    (`to_model_input`), as the scoring and ranking jobs do; arrays are refused (`ACCEPTED`)."""

    def __init__(self, model: Ranker) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict | None = None) -> Any:
        ratio, rounds = _keep_ratio(params), _rounds(params)
        column, values = _input_column(model_input)
        scores, kept = [], []
        for start in range(0, len(values), _BATCH):
            rows = range(start, min(start + _BATCH, len(values)))
            pixels = np.stack([self._pixels(column, i, values[i]) for i in rows])
            batch = rank(self.model, to_model_input(pixels), rounds)
            scores += batch.tolist()
            kept += keep_top(batch, ratio).tolist()
        return _frame(
            {"scores": scores, "kept": kept},
            {"scores": pa.list_(pa.float32()), "kept": pa.list_(pa.int64())},
        )

    def _pixels(self, column: str, row: int, value: object) -> np.ndarray:
        """Row `row`'s image as the jobs' centre view, (S, S, 3) uint8; a short error naming the row."""
        where = f"row {row}" + (f" ({_clip(value, 120)})" if column == "uri" else "")
        if column == "uri":
            if not isinstance(value, str) or not value:
                raise _input_error(f"{where}: `uri` must be a non-empty string, got {_describe(value)}")
            try:
                value = read_bytes(value)
            except FileNotFoundError:  # (its message would repeat the uri)
                raise _input_error(f"{where}: not found") from None
            except Exception as err:  # any store's failure: fsspec's errors are the protocol's own
                raise _input_error(f"{where}: cannot read it: {type(err).__name__}: {_clip(err)}") from None
        elif not isinstance(value, bytes | bytearray):
            raise _input_error(f"{where}: `image` must be encoded image bytes, got {_describe(value)}")
        try:
            return center_crop(bytes(value), self.model.cfg.img_size)
        except ImageDecodeError as err:
            raise _input_error(f"{where}: {_clip(err)}") from None


def _load_pyfunc(data_path: str) -> _PyfuncRanker:
    """MLflow's entry point for `mlflow.pyfunc.load_model` (loader_module): the ranker files, refused
    unless their weights have the digest recorded beside them at registration.

    Raises:
        ValueError: the weights' digest is not the recorded one (the artifact was changed), or none
            was recorded (a model registered by an older ltrp: register it again).
    """
    model = load_ranker_files(data_path)
    recorded = Path(data_path, DIGEST_FILE)
    if not recorded.is_file():
        raise ValueError(
            f"{data_path}: no {DIGEST_FILE} beside the weights: not registered by this ltrp (register it "
            "again); refusing weights whose digest cannot be checked"
        )
    return _PyfuncRanker(_as_registered(model, recorded.read_text().strip(), data_path))


def _keep_ratio(params: dict | None) -> float:
    """The `keep_ratio` parameter (MLflow has checked its type against `SIGNATURE`), in (0, 1]."""
    ratio = (params or {}).get("keep_ratio", KEEP_RATIO)
    if not isinstance(ratio, int | float) or not 0.0 < ratio <= 1.0:
        raise MlflowException.invalid_parameter_value(f"keep_ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _rounds(params: dict | None) -> int:
    """The `rounds` parameter (MLflow has checked its type against `SIGNATURE`), >= 0."""
    rounds = (params or {}).get("rounds", ROUNDS)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise MlflowException.invalid_parameter_value(f"rounds must be an integer >= 0, got {rounds!r}")
    return rounds


def _input_column(model_input: Any) -> tuple[str, list]:
    """("image" or "uri", that column's values) of a DataFrame with exactly one of them."""
    columns = getattr(model_input, "columns", None)
    if columns is None:
        raise _input_error(f"got {_describe(model_input)}")
    present = [c for c in ("image", "uri") if c in columns]
    if len(present) != 1:
        # (MLflow has dropped the columns its signature does not name: there is no more to say.)
        which = "both `image` and `uri`" if present else "neither `image` nor `uri`"
        raise _input_error(f"got a DataFrame with {which}")
    return present[0], model_input[present[0]].tolist()


def _input_error(problem: str) -> MlflowException:
    """A wrong input's error: the problem and what is accepted, short (never the data itself), as a
    400 Bad Request from the scoring server (which turns other exceptions into a 500 and a trace)."""
    return MlflowException.invalid_parameter_value(f"{problem}; {ACCEPTED}")


def _describe(value: object) -> str:
    """A value's type, and an array's dtype and shape, without its contents."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"a {type(value).__name__} of {value.dtype} {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _clip(err: object, limit: int = 160) -> str:
    """An error's message on one line, at most `limit` characters, without the repr of the in-memory
    file that PIL names (an address, of no use to the caller)."""
    text = " ".join(re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frame(columns: dict[str, list], types: dict[str, pa.DataType] | None = None) -> Any:
    """A pandas DataFrame of `columns`, list cells as Python lists. Built through pyarrow: this layer
    imports pyarrow, not pandas (docs/layout.md), and pandas frames are what MLflow passes and takes."""
    types = types or {}
    table = pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})
    frame = table.to_pandas()
    for name, kind in types.items():
        if pa.types.is_list(kind):
            frame[name] = frame[name].map(np.ndarray.tolist)
    return frame


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


@dataclass(frozen=True)
class Evaluation:
    """A model version's latest evaluation, as its logged model's metrics hold it.

    Attributes:
        estimates: {metric key: Estimate}, the ranker's figures and its paired differences from random.
        dataset: the digest of the held-out dataset they were computed on (the evaluation's
            `eval.dataset`): two evaluations are comparable only when it is the same.
    """

    estimates: dict[str, Estimate]
    dataset: str


def logged_model_id(version: ModelVersion) -> str | None:
    """The id (m-...) of the logged model `version` was registered from; None for a version registered
    from a run's artifacts or a path, which has none."""
    # MLflow 3 names the logged model in the version's source (models:/m-...); its model_id field is
    # left empty by log_model(registered_model_name=...).
    model_id = version.model_id or version.source.removeprefix("models:/")
    return model_id if model_id.startswith("m-") else None


def log_evaluation(version: ModelVersion, estimates: Mapping[str, Estimate], dataset: Dataset) -> None:
    """Logs `estimates` (mean and 95% interval of each metric key) as metrics of `version`'s logged
    model on `dataset`, in the active run: what promotion compares (`evaluation_of`, which reads the
    metrics of a dataset named HELD_OUT only), the MLflow UI compares versions by, and
    `mlflow.search_logged_models` sorts and filters on (e.g. "metrics.`object_recall.keep25.mean` > 0.6").
    A version without a logged model gets nothing."""
    if model_id := logged_model_id(version):
        mlflow.log_metrics(to_metrics(estimates), model_id=model_id, dataset=dataset)


def evaluation_of(version: ModelVersion, client: MlflowClient, role: str = "version") -> Evaluation:
    """`version`'s latest evaluation: the metrics its logged model holds on the HELD_OUT dataset from
    the evaluation run that logged last (an earlier evaluation's, of another keep ratio or dataset, are
    not mixed in; metrics without a dataset, such as training's, are not an evaluation's).

    Raises:
        PromotionError: the version has no logged model, or its logged model no evaluation metrics (never
            evaluated, or by an older ltrp that wrote `eval.*` tags only); the message names the
            version as `role`, its logged model and the command to run.
    """
    where = f"{role} {version.version} of {version.name}"
    model_id = logged_model_id(version)
    if model_id is None:
        raise PromotionError(
            f"{where} was registered from {version.source}, not from a logged model, so it has no "
            "evaluation metrics: register the ranker again (python -m jobs.train), then evaluate it"
        )
    evaluated = [m for m in client.get_logged_model(model_id).metrics or [] if m.dataset_name == HELD_OUT]
    if not evaluated:
        raise PromotionError(
            f"{where} (logged model {model_id}) has no evaluation metrics: evaluate it first, python -m "
            f"jobs.evaluate --model models:/{version.name}/{version.version} --mae ... --scores ... "
            "--train-source ... --test-source ... (an older ltrp wrote eval.* tags only, which promotion "
            "no longer reads)"
        )
    evaluated.sort(key=lambda m: (m.timestamp, m.step))  # oldest first: a key logged twice keeps its last
    last = evaluated[-1]
    latest = {
        m.key: m.value
        for m in evaluated
        if (m.run_id, m.dataset_digest) == (last.run_id, last.dataset_digest)
    }
    return Evaluation(from_metrics(latest), last.dataset_digest)


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
    """Compares version `candidate` of `name` with its champion under `policy`, each by its latest
    evaluation (`evaluation_of`: its logged model's metrics, not its tags), moves the `champion` alias to
    it if the policy allows (and not `dry_run`), and records on the candidate the tags
    `promotion.decision` (promoted, refused or dry-run), `.reason`, `.evidence` (JSON), `.policy`
    (JSON), `.previous_champion` (the champion at decision time, "" if none) and `.time` (UTC ISO 8601).

    Raises:
        mlflow.exceptions.MlflowException: the model or version does not exist.
        PromotionError: the candidate or the champion has no evaluation metrics (nothing is recorded).
    """
    client = client or MlflowClient()
    candidate = str(candidate)
    version = client.get_model_version(name, candidate)
    current = champion_version(name, client)
    if current == candidate:
        # Comparing the champion with itself would refuse it and overwrite the record rollback reads.
        return Promotion(Decision(False, f"version {candidate} already is {CHAMPION}"), "unchanged", current)
    # Both read before anything is written: a version without evaluation metrics leaves no record.
    ours = evaluation_of(version, client, role="candidate version")
    theirs = None
    if current is not None:
        theirs = evaluation_of(client.get_model_version(name, current), client, role=f"{CHAMPION} version")
    decision = decide(
        ours.estimates,
        None if theirs is None else theirs.estimates,
        policy,
        candidate_dataset=ours.dataset,
        champion_dataset=None if theirs is None else theirs.dataset,
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
