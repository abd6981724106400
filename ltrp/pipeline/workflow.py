"""The whole pipeline on data with known ground truth: scenes (or Fashion-MNIST) -> the shipped MAE (or
pre-train one) -> score the training split with K views and the held-out split with the full-coverage
oracle -> train the ranker -> evaluate it against the baselines -> register and promote -> a summary.

Each step is a job's `run(config)`, its config built from the config file's section for it (and the
file's top-level keys that job knows) plus the paths derived here from `root`. Every config is built,
and so checked, before the first step runs. A step whose settings are unchanged and whose outputs exist
is not run again (ROOT/_pipeline.json records them), so a second run only repeats what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ltrp.data.datasets import write_fashion_mnist
from ltrp.data.scenes import MANIFEST, SEEN_CLASSES, SHIPPED_MAE, UNSEEN_CLASSES, SceneConfig, write_scenes
from ltrp.data.tables import SUCCESS_FILE
from ltrp.evaluation.measures import metric_key
from ltrp.evaluation.protocol import EvaluationResult
from ltrp.evaluation.scene_eval import SceneEvaluation, primary_ratio
from ltrp.pipeline import evaluate_job, pretrain_job, promote_job, runtime, score_job, train_job
from ltrp.pipeline.configs import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    PretrainConfig,
    PromoteConfig,
    ScoreConfig,
    TrainConfig,
    read_config_file,
    registered_name,
)

SUMMARY_SCORERS = ("ltrp", "random", "center", "folk_rcom", "supervised")
SUMMARY_MEASURES = ("reconstruction_error", "accuracy", "accuracy_seen", "accuracy_unseen")
SPLITS = ("train", "test")


class Steps:
    """Runs steps at most once per settings: ROOT/_pipeline.json maps each step to the digest of its
    settings and upstream steps, and to what it produced."""

    def __init__(self, root: Path) -> None:
        self.path = root / "_pipeline.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}

    @staticmethod
    def digest(*parts: object) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def run(self, name: str, digest: str, run: Callable[[], dict], done: Callable[[dict], bool]) -> dict:
        """The step's recorded results if its digest matches and `done(results)` holds; else runs it."""
        recorded = self.state.get(name, {})
        if recorded.get("digest") == digest and done(recorded["results"]):
            print(f"[pipeline] {name}: reusing the finished step ({digest})", flush=True)
            return recorded["results"]
        print(f"[pipeline] {name}: running ({digest})", flush=True)
        start = time.perf_counter()
        results = run()
        results["seconds"] = round(time.perf_counter() - start, 1)
        self.state[name] = {"digest": digest, "results": results}
        self.path.write_text(json.dumps(self.state, indent=1))
        return results


class Pipeline:
    """Every step's config, built from the file (and so checked) before anything runs, and the digests
    that name each step's outputs (a changed setting redoes that step and the ones after it)."""

    def __init__(self, config: Path) -> None:
        spec = yaml.safe_load(config.read_text()) or {}
        if "root" not in spec:
            raise ConfigError(f"--config {config}: the pipeline needs a top-level 'root' (its output folder)")
        self.root = Path(spec["root"])
        self.ranker_seeds = _ranker_seeds(spec, config)
        values = {
            name: read_config_file(config, name)
            for name in ("data", "pretrain", "score", "score_test", "train", "evaluate")
        }
        self.data = DataConfig(**values["data"])
        self.scenes = self.data.dataset == "scenes"
        data = self.root / "data"
        # Scenes: a manifest per split (docs/scenes.md); Fashion-MNIST: an ImageFolder per split.
        self.sources = {s: data / s / MANIFEST if self.scenes else data / s for s in SPLITS}
        # The scenes do not depend on the judge: a step after them does, through the MAE's digest.
        self.digests = {"data": Steps.digest({k: v for k, v in values["data"].items() if k != "mae"})}
        self.mae = self._judge(values["pretrain"])
        checkpoints = str(self.root / "checkpoints")
        self.pretrain = PretrainConfig(
            **{
                **values["pretrain"],
                "source": str(self.sources["train"]),
                "output": str(self.mae),
                "name": f"mae-{self.digests['pretrain']}",
                "storage": checkpoints,
            }
        )
        self.score = {split: self._score(values, split) for split in SPLITS}
        self.digests["train"] = Steps.digest(self.digests["score-train"], values["train"])
        self.train = TrainConfig(
            **{
                **values["train"],
                "scores": self.score["train"].output,
                "name": f"ranker-{self.digests['train']}",
                "storage": checkpoints,
            }
        )
        # The same recipe at other seeds, for the evaluation's seed spread (its --seed-models); the alias
        # stays on the first, the ranker that is evaluated in full and may be promoted.
        self.seed_trains = [
            replace(self.train, seed=self.train.seed + i, name=f"{self.train.name}-seed{i}", alias=None)
            for i in range(1, self.ranker_seeds)
        ]
        self.model = registered_name(self.train.register)
        # The version is known once trained: until then the registered model's version 1 stands in.
        self.evaluate = EvaluateConfig(
            **{
                **values["evaluate"],
                "model": f"{self.train.register}/1",
                "mae": str(self.mae),
                "scores": (self.score["test"].output,),
                "train_source": str(self.sources["train"]),
                "test_source": str(self.sources["test"]),
            }
        )
        self.evaluate_values = values["evaluate"]

    def _judge(self, pretrain_values: dict) -> Path:
        """The MAE's path; sets the digest the steps after it depend on (its settings, or its bytes)."""
        self.digests["pretrain"] = Steps.digest(self.digests["data"], pretrain_values)
        if self.data.mae == "pretrain":
            return self.root / f"mae-{self.digests['pretrain']}.pth"
        mae = SHIPPED_MAE if self.data.mae == "shipped" else Path(self.data.mae).resolve()
        self.digests["pretrain"] = Steps.digest(
            self.digests["data"], hashlib.sha256(mae.read_bytes()).hexdigest()
        )
        return mae

    def _score(self, values: dict, split: str) -> ScoreConfig:
        """The split's scoring config (`score_test` over `score` for the test split); sets its digest."""
        settings = values["score"] | (values["score_test"] if split == "test" else {})
        digest = self.digests[f"score-{split}"] = Steps.digest(self.digests["pretrain"], settings, split)
        return ScoreConfig(
            **{
                **settings,
                "source": str(self.sources[split]),
                "mae": str(self.mae),
                "output": str(self.root / f"scores-{split}-{digest}"),
            }
        )

    def write_data(self) -> dict:
        """The data step: both splits written where `sources` points."""
        if not self.scenes:
            counts = {"train": self.data.train_images, "test": self.data.test_images}
            return {s: str(write_fashion_mnist(self.sources[s], s, counts[s])) for s in SPLITS}
        train = SceneConfig(backgrounds=Counter(self.data.backgrounds))
        bias_test = SceneConfig(
            backgrounds=Counter(self.data.test_backgrounds), require=(SEEN_CLASSES, UNSEEN_CLASSES)
        )
        return {
            "train": str(write_scenes(self.sources["train"].parent, "train", self.data.train_images, train)),
            "test": str(write_scenes(self.sources["test"].parent, "test", self.data.test_images, bias_test)),
        }


def run(pipeline: Pipeline) -> dict:
    """Runs (or reuses) every step of `pipeline`; returns what each made."""
    pipeline.root.mkdir(parents=True, exist_ok=True)
    runtime.start(workers=max(pipeline.pretrain.workers, pipeline.train.workers))
    steps = Steps(pipeline.root)
    steps.run(
        "data",
        pipeline.digests["data"],
        pipeline.write_data,
        lambda r: all(p.exists() for p in pipeline.sources.values()),
    )
    mae = _judge(pipeline, steps)
    tables = {split: _score_table(pipeline, steps, split) for split in SPLITS}
    rankers = _train_rankers(pipeline, steps)
    versions = [r["version"] for r in rankers]
    evaluation = _evaluate(pipeline, steps, versions)
    promotion = promote_job.run(PromoteConfig(model=pipeline.train.register, candidate=versions[0]))
    print(promote_job.describe(promotion), flush=True)
    champion = MlflowClient().get_registered_model(pipeline.model).aliases.get("champion")
    return {
        "mae": mae,
        "tables": tables,
        "ranker": rankers[0],
        "seed_versions": versions[1:],
        "evaluation": evaluation,
        "promotion": {
            "exit_code": promotion.exit_code,
            "champion": champion,
            "reason": promotion.promotion.decision.reason,
        },
    }


def _judge(pipeline: Pipeline, steps: Steps) -> dict:
    """The MAE that scores: pre-trained here (a step), or the given one."""
    if pipeline.data.mae != "pretrain":
        return {"mae": str(pipeline.mae), "final_loss": None}

    def pretrain() -> dict:
        summary = pretrain_job.run(pipeline.pretrain)
        return {"mae": str(pipeline.mae), "final_loss": summary.history[-1]}

    return steps.run("pretrain", pipeline.digests["pretrain"], pretrain, lambda r: pipeline.mae.exists())


def _score_table(pipeline: Pipeline, steps: Steps, split: str) -> dict:
    """The split's score table: K views a training image, the full-coverage oracle on the test split."""
    cfg = pipeline.score[split]

    def score() -> dict:
        s = score_job.run(cfg)
        return {
            "output": cfg.output,
            "images": s.images,
            "rows": s.rows_written,
            "errors": s.errors,
            "seconds": round(s.seconds, 1),
        }

    finished = Path(cfg.output) / SUCCESS_FILE
    return steps.run(f"score-{split}", pipeline.digests[f"score-{split}"], score, lambda r: finished.exists())


def _train_rankers(pipeline: Pipeline, steps: Steps) -> list[dict]:
    """The ranker, then the same recipe at the other seeds; each is a registered version."""

    def train(cfg: TrainConfig) -> dict:
        summary = train_job.run(cfg)
        return {
            "version": summary.version,
            "best_epoch": summary.best_epoch,
            "epochs": summary.epochs,
            **summary.metrics,
        }

    return [
        steps.run(
            f"train-seed{i}" if i else "train",
            pipeline.digests["train"],
            lambda cfg=cfg: train(cfg),
            lambda r: _version_exists(pipeline.model, r["version"]),
        )
        for i, cfg in enumerate([pipeline.train, *pipeline.seed_trains])
    ]


def _evaluate(pipeline: Pipeline, steps: Steps, versions: list[str]) -> dict:
    """The evaluation of the first version, with the others as its seed spread; its headline table."""
    digest = Steps.digest(
        pipeline.digests["train"], versions, pipeline.digests["score-test"], pipeline.evaluate_values
    )
    report_dir = pipeline.root / f"evaluation-{digest}"
    cfg = replace(
        pipeline.evaluate,
        model=f"{pipeline.train.register}/{versions[0]}",
        seed_models=tuple(f"{pipeline.train.register}/{v}" for v in versions[1:]),
        output=str(report_dir),
    )

    def evaluate() -> dict:
        result = evaluate_job.run(cfg).result
        return {
            "report": str(report_dir / "report.md"),
            "headline": evaluate_job.headline(result),
            **_table(result),
        }

    return steps.run("evaluate", digest, evaluate, lambda r: (report_dir / "report.md").exists())


def _ranker_seeds(spec: dict, config: Path) -> int:
    """The file's `ranker_seeds`: how many rankers of the one recipe train (default 1)."""
    seeds = spec.get("ranker_seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"--config {config}: ranker_seeds must be a positive integer, got {seeds!r}")
    return seeds


def _table(result: EvaluationResult | SceneEvaluation) -> dict:
    """The summary's table: a row per selector, the primary figures at 25% keep (or the first ratio)."""
    if isinstance(result, SceneEvaluation):
        r = primary_ratio(result.keep_ratios)
        rows = {
            s: {
                "object_recall": result.estimates[s][metric_key("object_recall", r)].mean,
                "bias_gap_minus_random": result.bias_did[s][r].mean,
                "background_share": result.estimates[s][metric_key("background_share", r)].mean,
                "probe_map": float(np.mean(result.probe_map[s])) if s in result.probe_map else float("nan"),
            }
            for s in result.selectors
        }
        return {"keep_ratio": r, "table": rows}
    r = result.figure_ratio
    rows = {
        s: {m: result.estimates[s][metric_key(m, r)].mean for m in SUMMARY_MEASURES} for s in SUMMARY_SCORERS
    }
    return {"keep_ratio": r, "table": rows}


def _version_exists(name: str, version: str) -> bool:
    try:
        MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return True


def summary(results: dict, seconds: float) -> str:
    """The pipeline's closing lines: where everything went, and the headline table."""
    ev, ranker = results["evaluation"], results["ranker"]
    report = Path(ev["report"])
    train_table, test_table = results["tables"]["train"], results["tables"]["test"]
    measures = list(next(iter(ev["table"].values())))
    rows = [f"  {'selector':<18}" + "".join(f"{m:>23}" for m in measures)]
    rows += [f"  {s:<18}" + "".join(f"{v:>23.4f}" for v in ev["table"][s].values()) for s in ev["table"]]
    champion = results["promotion"]["champion"]
    loss = results["mae"]["final_loss"]
    return "\n".join(
        [
            f"[pipeline] done in {seconds:.0f} s",
            f"  MAE: {results['mae']['mae']}"
            + (f" (final training loss {loss:.4f})" if loss is not None else ""),
            f"  score tables: {train_table['output']} ({train_table['rows']} rows), "
            f"{test_table['output']} ({test_table['rows']} rows)",
            f"  ranker: version {ranker['version']}, the best of {ranker['epochs']} epochs (epoch "
            f"{ranker['best_epoch'] + 1}), validation Kendall tau "
            f"{ranker.get('val_kendall_tau', float('nan')):.3f} (seeing all patches: "
            f"{ranker.get('val_full_kendall_tau', float('nan')):.3f})"
            + (
                f"; other seeds: versions {', '.join(results['seed_versions'])}"
                if results["seed_versions"]
                else ""
            ),
            f"  promotion: {results['promotion']['reason']}; champion is version {champion}",
            f"  held-out test images, {round(100 * ev['keep_ratio'])}% of patches kept: {ev['headline']}",
            *rows,
            f"  report and figures: {report.parent}",
            f"  MLflow: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        ]
    )
