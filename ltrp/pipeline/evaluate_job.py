"""The evaluation job: a ranker (file or MLflow registry) against the baselines, reported and tracked.

Output under OUTPUT (local or s3://): report.md, its PNGs and estimates.json (every scorer's mean and
interval per measure; for scenes also the report's per-kind, oracle and seed figures:
`ltrp.evaluation.scene_report.figures`). Scenes with object masks get the scene evaluation (object
recall, bias gap, probes: ltrp.evaluation.scene_eval), with --seed-models measured beside the ranker;
other labelled images the classification one. The same files are logged to an MLflow run (experiment
ltrp-evaluate), and when the ranker came from the registry, the ranker's figures and its paired
differences from random become metrics of its logged model on the held-out dataset
(`ltrp.pipeline.registry.log_evaluation`): what promotion compares and the MLflow UI and
`mlflow.search_logged_models` rank versions by. The model version's `eval.*` tags repeat them for people
(see `ltrp.evaluation.measures`), with the seed-mean figures where there are seed models.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from ltrp.core.classifier import ClassifierConfig
from ltrp.core.mae import MAE
from ltrp.core.probe import ProbeSettings
from ltrp.core.ranker import Ranker
from ltrp.data.checkpoints import load_mae
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES
from ltrp.data.tables import read_job_metadata, read_scores
from ltrp.evaluation import fidelity, scene_report
from ltrp.evaluation.measures import TAG_PREFIX, Estimate, metric_key, to_tags, vs_random
from ltrp.evaluation.protocol import EvalSettings, EvaluationResult, evaluate, load_labelled, pseudo_scores
from ltrp.evaluation.report import write_report
from ltrp.evaluation.scene_eval import (
    SEED_MEAN,
    SceneEvalSettings,
    SceneEvaluation,
    SplitHalf,
    evaluate_scenes,
    load_scene_set,
    primary_ratio,
    split_half_reliability,
)
from ltrp.pipeline import lineage, runtime
from ltrp.pipeline.configs import EvaluateConfig, InputError, checking_inputs
from ltrp.pipeline.registry import HELD_OUT, load_ranker_ref, log_evaluation


@dataclass(frozen=True)
class EvaluateSummary:
    result: EvaluationResult | SceneEvaluation
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
        rounds=cfg.rounds,
    )


def run(cfg: EvaluateConfig, progress=print) -> EvaluateSummary:
    """Evaluates, writes the report to cfg.output and logs it to an MLflow run (experiment
    ltrp-evaluate), opened only once the measures are in: a bad input fails before any run exists.
    A test source that is a scene manifest with object masks gets the scene evaluation
    (`ltrp.evaluation.scene_eval`), any other labelled source the classification one."""
    runtime.track()  # the registry to load from; the experiment is created only once there is a result
    torch.manual_seed(cfg.seed)
    with checking_inputs():  # everything the measures need, before they start
        ranker, version = load_ranker_ref(cfg.model)
        seeds = [load_ranker_ref(uri)[0] for uri in cfg.seed_models]
        mae = load_mae(cfg.mae)
        _check_agree(cfg, ranker, seeds, mae)
    evaluation = _evaluate_scenes if has_masks(cfg.test_source) else _evaluate_labelled
    result, write = evaluation(cfg, ranker, seeds, mae, progress)

    mlflow.set_experiment("ltrp-evaluate")
    with mlflow.start_run(run_name=f"evaluate {cfg.model}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({k: str(v)[:500] for k, v in asdict(cfg).items()})
        mlflow.set_tags({"eval.dataset": result.dataset, "output_uri": cfg.output, "model_uri": cfg.model})
        held_out = lineage.dataset(cfg.test_source, HELD_OUT, result.dataset)
        mlflow.log_input(held_out, context="evaluation")
        mlflow.log_metrics(
            {f"{s}.{k}": e.mean for s, keys in result.estimates.items() for k, e in keys.items()}
            | _seed_metrics(result)
        )
        folder = Path(tmp)
        provenance = {
            "model": cfg.model,
            **({"seed models": ", ".join(cfg.seed_models)} if cfg.seed_models else {}),
            "MAE": f"{cfg.mae} (sha256 {mae.checkpoint.sha256})",
            "score tables": ", ".join(cfg.scores),
            "test source": cfg.test_source,
            "training source": cfg.train_source,
            "MLflow run": f"{mlflow.get_tracking_uri()} experiment ltrp-evaluate, run {run.info.run_id}",
        }
        paths = write(result, folder, f"Evaluation of {cfg.model}", provenance)
        estimates = {s: {k: asdict(e) for k, e in keys.items()} for s, keys in result.estimates.items()}
        if isinstance(result, SceneEvaluation):
            estimates |= scene_report.figures(result)
        (folder / "estimates.json").write_text(json.dumps(estimates, indent=1))
        for path in [*paths, folder / "estimates.json"]:
            mlflow.log_artifact(str(path))
        fs, root = fsspec.core.url_to_fs(cfg.output)
        fs.makedirs(root, exist_ok=True)
        fs.put([str(p) for p in folder.iterdir()], root.rstrip("/") + "/")
        if version is not None:
            _tag_version(version, result, run.info.run_id, cfg.output, cfg.seed_models)
            log_evaluation(version, _ranker_figures(result), held_out)
    return EvaluateSummary(result, run.info.run_id)


Writer = Callable[[Any, Path, str, dict], list[Path]]


def _check_agree(cfg: EvaluateConfig, ranker: Ranker, seeds: list[Ranker], mae: MAE) -> None:
    """The rankers rank the MAE's patch grid, and every score table was scored by that MAE."""
    rankers = [("--model", cfg.model, ranker)]
    rankers += [("--seed-models", uri, m) for uri, m in zip(cfg.seed_models, seeds, strict=True)]
    for option, uri, model in rankers:
        if model.cfg.num_patches != mae.cfg.num_patches:
            raise InputError(
                f"{option} {uri} ranks {model.cfg.num_patches} patches, --mae {cfg.mae} has "
                f"{mae.cfg.num_patches}: evaluate a ranker of the MAE's grid"
            )
    for uri in cfg.scores:
        scored_by = read_job_metadata(uri).get("mae_sha256")
        if scored_by not in (None, mae.checkpoint.sha256):
            raise InputError(
                f"--scores {uri} was scored by the MAE with sha256 {scored_by}, not by --mae {cfg.mae} "
                f"(sha256 {mae.checkpoint.sha256}): give the MAE that scored it"
            )


def headline(result: EvaluationResult | SceneEvaluation) -> str:
    """The primary figures at 25% keep (or the first ratio), the ranker's against random's."""
    if isinstance(result, SceneEvaluation):
        r = primary_ratio(result.keep_ratios)
        recall = {s: result.estimates[s][metric_key("object_recall", r)] for s in ("ltrp", "random")}
        did = result.bias_did["ltrp"][r]
        spread = result.seed_spread
        seeds = (
            f"; over {len(spread.per_seed)} training seeds {spread.mean.mean:.3f} (min-max "
            f"{spread.low:.3f}-{spread.high:.3f}, std {spread.std:.3f})"
            if spread
            else ""
        )
        return (
            f"at {round(100 * r)}% keep, object recall {recall['ltrp'].mean:.3f} (random "
            f"{recall['random'].mean:.3f}){seeds}; bias gap minus random's {did.mean:+.3f} "
            f"[{did.lo:+.3f}, {did.hi:+.3f}]"
        )
    r = result.figure_ratio
    figures = []
    for measure in ("reconstruction_error", "accuracy"):
        key = metric_key(measure, r)
        ltrp, rand = result.estimates["ltrp"][key].mean, result.estimates["random"][key].mean
        figures.append(f"{measure} {ltrp:.4f} (random {rand:.4f})")
    return f"{round(100 * r)}% of patches kept: {'; '.join(figures)}"


def has_masks(source: str) -> bool:
    """Whether a source is a scene manifest with object masks (docs/scenes.md)."""
    if not source.lower().endswith(".parquet"):
        return False
    with fsspec.open(source, "rb") as f:
        return "objects" in pq.read_schema(f).names


def _evaluate_labelled(
    cfg: EvaluateConfig, ranker: Ranker, seeds: list[Ranker], mae: MAE, progress: Callable[[str], None]
) -> tuple[EvaluationResult, Writer]:
    with checking_inputs():
        if seeds:  # they are measured on object recall, which needs masks
            raise InputError(
                f"--seed-models: measured on scenes with object masks only, and --test-source "
                f"{cfg.test_source} has none"
            )
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
    return result, lambda r, folder, title, _provenance: write_report(r, folder, title)


def _evaluate_scenes(
    cfg: EvaluateConfig, ranker: Ranker, seeds: list[Ranker], mae: MAE, progress: Callable[[str], None]
) -> tuple[SceneEvaluation, Writer]:
    with checking_inputs():
        size, p = mae.cfg.img_size, mae.cfg.patch_size
        train = load_scene_set(cfg.train_source, size, p, limit=cfg.max_train)
        test = load_scene_set(cfg.test_source, size, p, limit=cfg.max_test)
        table = pa.concat_tables(
            [read_scores(uri, columns=["image_id", "view", "visible", "scores"]) for uri in cfg.scores]
        )
        try:
            oracle = fidelity.oracle(table, mae.cfg.num_patches, test.image_ids)
        except ValueError as err:
            raise InputError(
                f"--scores {' '.join(cfg.scores)}: not a full cover of the test scenes ({err}): score them "
                "with python -m jobs.score --cover R"
            ) from None
    progress(f"evaluating on {len(test.pixels)} held-out scenes, {len(train.pixels)} training scenes")
    reliability = _split_half(table, mae.cfg.num_patches, test.image_ids, cfg)
    result = evaluate_scenes(
        ranker, mae, train, test, oracle, scene_settings(cfg), progress, seeds, split_half=reliability
    )
    return result, scene_report.write_report


def _split_half(table: pa.Table, num_patches: int, ids: list[str], cfg: EvaluateConfig) -> SplitHalf | None:
    """The oracle's split-half reliability, or None when its tables hold one round only (or are not laid
    out in rounds, so that a half leaves a position unscored)."""
    sets = fidelity.sets_per_round(table, num_patches)
    try:
        first, second = fidelity.split_half_oracles(table, num_patches, ids, sets)
    except ValueError:  # the full oracle exists (checked up front); the report says why halves do not
        return None
    return split_half_reliability(first, second, fidelity.cover_rounds(table, sets), cfg.resamples, cfg.seed)


def scene_settings(cfg: EvaluateConfig) -> SceneEvalSettings:
    """The scene evaluation's settings from the job's options."""
    return SceneEvalSettings(
        keep_ratios=tuple(cfg.keep_ratios),
        seen=tuple(cfg.seen_classes or SEEN_CLASSES),
        unseen=tuple(cfg.unseen_classes or UNSEEN_CLASSES),
        probe=ProbeSettings(epochs=cfg.probe_epochs),
        probe_seeds=cfg.probe_seeds,
        supervised=ProbeSettings(epochs=cfg.supervised_epochs, patience=3),
        resamples=cfg.resamples,
        seed=cfg.seed,
        rounds=cfg.rounds,
    )


def _seed_metrics(result: EvaluationResult | SceneEvaluation) -> dict[str, float]:
    """The spread of the ranker's object recall over its training seeds, at the primary ratio, as
    MLflow metrics (each seed's and the seed mean's figures are among the estimates)."""
    spread = getattr(result, "seed_spread", None)
    if spread is None:
        return {}
    key = f"seed_spread.{metric_key('object_recall', primary_ratio(result.keep_ratios))}"
    return {f"{key}.min": spread.low, f"{key}.max": spread.high, f"{key}.std": spread.std}


def _ranker_figures(result: EvaluationResult | SceneEvaluation) -> dict[str, Estimate]:
    """The ranker's figures and its paired differences from random (`vs_random.KEY`: the promotion
    floor), by metric key: what its model version carries."""
    return result.estimates["ltrp"] | {vs_random(k): e for k, e in result.paired["random"].items()}


def _tag_version(
    version: ModelVersion,
    result: EvaluationResult | SceneEvaluation,
    run_id: str,
    output: str,
    seed_models: tuple[str, ...],
) -> None:
    """The ranker's figures, and its paired difference from random (the promotion floor), as tags of
    its model version, with the seed-mean ranker's object recall and its spread where seed models were
    measured: a summary for people (promotion reads the logged model's metrics); a re-evaluation
    replaces the whole record."""
    tags = {
        **to_tags(_ranker_figures(result)),
        f"{TAG_PREFIX}run_id": run_id,
        f"{TAG_PREFIX}dataset": result.dataset,
        f"{TAG_PREFIX}report": output.rstrip("/") + "/report.md",
    }
    if seed_models:
        tags |= to_tags({f"seed_mean.{k}": e for k, e in result.estimates[SEED_MEAN].items()})
        tags |= {TAG_PREFIX + k: f"{v:.6g}" for k, v in _seed_metrics(result).items()}
        tags[f"{TAG_PREFIX}seed_models"] = ",".join(seed_models)
    client = MlflowClient()
    # Keys it no longer produces (another keep ratio) would otherwise stay and read as measured on this
    # eval.dataset.
    for key in version.tags:
        if key.startswith(TAG_PREFIX) and key not in tags:
            client.delete_model_version_tag(version.name, version.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
