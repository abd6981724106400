"""The evaluation job: a ranker (file or MLflow registry) against the baselines, reported and tracked.

Output under OUTPUT (local or s3://): report.md, measures_vs_keep_ratio.png, kept_patches.png and
estimates.json (every scorer's mean and interval per measure). The same files are logged to an MLflow
run (experiment ltrp-evaluate), and when the ranker came from the registry, the ranker's figures are
attached to its model version as tags (see `ltrp.evaluation.measures`), which is what promotion compares.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ltrp.core.classifier import ClassifierConfig
from ltrp.core.ranker import Ranker
from ltrp.data.checkpoints import load_mae, load_ranker
from ltrp.evaluation.measures import TAG_PREFIX, to_tags
from ltrp.evaluation.protocol import EvalSettings, EvaluationResult, evaluate, load_labelled, pseudo_scores
from ltrp.evaluation.report import write_report
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import MODEL_VERSION, EvaluateConfig, checking_inputs


@dataclass(frozen=True)
class EvaluateSummary:
    result: EvaluationResult
    run_id: str  # the MLflow run holding the report


def settings(cfg: EvaluateConfig) -> EvalSettings:
    """The protocol's settings from the job's options."""
    return EvalSettings(
        keep_ratios=tuple(cfg.keep_ratios),
        seen_classes=tuple(cfg.seen_classes) if cfg.seen_classes else None,
        max_train=cfg.max_train,
        max_test=cfg.max_test,
        classifier=ClassifierConfig(
            embed_dim=cfg.classifier_dim, depth=cfg.classifier_depth, epochs=cfg.classifier_epochs
        ),
        resamples=cfg.resamples,
        seed=cfg.seed,
    )


def load_evaluated_ranker(uri: str) -> tuple[Ranker, ModelVersion | None]:
    """A ranker from the registry (models:/NAME/VERSION or models:/NAME@ALIAS; returns its version too)
    or from a training checkpoint file (no version)."""
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
    model = mlflow.pytorch.load_model(f"models:/{name}/{version.version}", map_location="cpu")
    if not isinstance(model, Ranker):
        raise ValueError(f"{uri} is a {type(model).__name__}, not an ltrp Ranker")
    return model.eval(), version


def run(cfg: EvaluateConfig, progress=print) -> EvaluateSummary:
    """Evaluates, writes the report to cfg.output and logs it to an MLflow run (experiment
    ltrp-evaluate), opened only once the measures are in: a bad input fails before any run exists."""
    runtime.track()  # the registry to load from; the experiment is created only once there is a result
    torch.manual_seed(cfg.seed)
    with checking_inputs():  # everything the measures need, before they start
        ranker, version = load_evaluated_ranker(cfg.model)
        mae = load_mae(cfg.mae)
        size = mae.cfg.img_size
        train, classes, skipped = load_labelled(cfg.train_source, size, limit=cfg.max_train)
        test, _, test_skipped = load_labelled(cfg.test_source, size, classes, limit=cfg.max_test)
        for uri, reason in skipped + test_skipped:
            progress(f"skipped {uri}: {reason}")
        covered, visible, pseudo = pseudo_scores(cfg.scores, test)
        if len(covered) < len(test.pixels):
            progress(f"{len(test.pixels) - len(covered)} held-out images have no score-table row: left out")
        test = test.subset(covered)
    progress(f"evaluating on {len(test.pixels)} held-out images, {len(train.pixels)} training images")
    result = evaluate(ranker, mae, train, test, visible, pseudo, classes, settings(cfg), progress)

    mlflow.set_experiment("ltrp-evaluate")
    with mlflow.start_run(run_name=f"evaluate {cfg.model}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({k: str(v)[:500] for k, v in asdict(cfg).items()})
        mlflow.set_tags({"eval.dataset": result.dataset, "output_uri": cfg.output, "model_uri": cfg.model})
        mlflow.log_metrics(
            {f"{s}.{k}": e.mean for s, keys in result.estimates.items() for k, e in keys.items()}
        )
        folder = Path(tmp)
        paths = write_report(result, folder, f"Evaluation of {cfg.model}")
        estimates = {s: {k: asdict(e) for k, e in keys.items()} for s, keys in result.estimates.items()}
        (folder / "estimates.json").write_text(json.dumps(estimates, indent=1))
        for path in [*paths, folder / "estimates.json"]:
            mlflow.log_artifact(str(path))
        fs, root = fsspec.core.url_to_fs(cfg.output)
        fs.makedirs(root, exist_ok=True)
        fs.put([str(p) for p in folder.iterdir()], root.rstrip("/") + "/")
        if version is not None:
            tags = {
                **to_tags(result.estimates["ltrp"]),
                f"{TAG_PREFIX}run_id": run.info.run_id,
                f"{TAG_PREFIX}dataset": result.dataset,
                f"{TAG_PREFIX}report": cfg.output.rstrip("/") + "/report.md",
            }
            client = MlflowClient()
            # A re-evaluation replaces the whole record: keys it no longer produces (another keep ratio)
            # would otherwise stay and be read by promotion as measured on this eval.dataset.
            for key in version.tags:
                if key.startswith(TAG_PREFIX) and key not in tags:
                    client.delete_model_version_tag(version.name, version.version, key)
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, value)
    return EvaluateSummary(result, run.info.run_id)
