"""The whole pipeline on real images: pre-train an MAE on Fashion-MNIST -> score -> train the ranker ->
evaluate it against the baselines -> register and promote -> a summary.

Each step is a job's `run(config)`, its config built from the config file's section for it (and the
file's top-level keys that job knows) plus the paths derived here from `root`. Every config is built,
and so checked, before the first step runs. A step whose settings are unchanged and whose outputs exist
is not run again (ROOT/_pipeline.json records them), so a second run only repeats what changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ltrp.data.datasets import write_fashion_mnist
from ltrp.evaluation.measures import metric_key
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


class Plan:
    """Every step's config, built from the file (and so checked) before anything runs, and the digests
    that name each step's outputs (a changed setting redoes that step and the ones after it)."""

    def __init__(self, config: Path) -> None:
        spec = yaml.safe_load(config.read_text()) or {}
        if "root" not in spec:
            raise ConfigError(f"--config {config}: the pipeline needs a top-level 'root' (its output folder)")
        self.root = Path(spec["root"])
        values = {
            name: read_config_file(config, name)
            for name in ("data", "pretrain", "score", "train", "evaluate")
        }
        self.data = DataConfig(**values["data"])
        data = self.root / "data"
        self.images = {split: data / split for split in SPLITS}
        self.digests = {"data": Steps.digest(values["data"])}
        self.digests["pretrain"] = Steps.digest(self.digests["data"], values["pretrain"])
        self.mae = self.root / f"mae-{self.digests['pretrain']}.pth"
        checkpoints = str(self.root / "checkpoints")
        self.pretrain = PretrainConfig(
            **{
                **values["pretrain"],
                "source": str(self.images["train"]),
                "output": str(self.mae),
                "name": f"mae-{self.digests['pretrain']}",
                "storage": checkpoints,
            }
        )
        self.score = {}
        for split in SPLITS:
            digest = self.digests[f"score-{split}"] = Steps.digest(
                self.digests["pretrain"], values["score"], split
            )
            self.score[split] = ScoreConfig(
                **{
                    **values["score"],
                    "source": str(self.images[split]),
                    "mae": str(self.mae),
                    "output": str(self.root / f"scores-{split}-{digest}"),
                }
            )
        self.digests["train"] = Steps.digest(self.digests["score-train"], values["train"])
        self.train = TrainConfig(
            **{
                **values["train"],
                "scores": self.score["train"].output,
                "name": f"ranker-{self.digests['train']}",
                "storage": checkpoints,
            }
        )
        self.model = registered_name(self.train.model)
        # The version is known once trained: until then the registered model's version 1 stands in.
        self.evaluate = EvaluateConfig(
            **{
                **values["evaluate"],
                "model": f"{self.train.model}/1",
                "mae": str(self.mae),
                "scores": (self.score["test"].output,),
                "train_source": str(self.images["train"]),
                "test_source": str(self.images["test"]),
            }
        )
        self.evaluate_values = values["evaluate"]


def run(plan: Plan) -> dict:
    """Runs (or reuses) every step of the pipeline `plan`; returns what each made."""
    plan.root.mkdir(parents=True, exist_ok=True)
    runtime.start(workers=max(plan.pretrain.workers, plan.train.workers))
    steps = Steps(plan.root)

    steps.run(
        "data",
        plan.digests["data"],
        lambda: {
            split: str(write_fashion_mnist(plan.images[split], split, count))
            for split, count in (("train", plan.data.train_images), ("test", plan.data.test_images))
        },
        lambda r: all(plan.images[s].exists() for s in SPLITS),
    )

    def pretrain_step() -> dict:
        summary = pretrain_job.run(plan.pretrain)
        return {"mae": str(plan.mae), "final_loss": summary.history[-1]}

    mae = steps.run("pretrain", plan.digests["pretrain"], pretrain_step, lambda r: plan.mae.exists())

    tables = {}
    for split in SPLITS:
        cfg = plan.score[split]

        def score_step(cfg: ScoreConfig = cfg) -> dict:
            s = score_job.run(cfg)
            return {
                "output": cfg.output,
                "images": s.images_scored,
                "rows": s.rows_written,
                "errors": s.errors,
            }

        tables[split] = steps.run(
            f"score-{split}",
            plan.digests[f"score-{split}"],
            score_step,
            lambda r, o=cfg.output: (Path(o) / "_SUCCESS").exists(),
        )

    def train_step() -> dict:
        summary = train_job.run(plan.train)
        return {"version": summary.version, **summary.metrics}

    ranker = steps.run(
        "train", plan.digests["train"], train_step, lambda r: _version_exists(plan.model, r["version"])
    )

    evaluate_cfg = replace(plan.evaluate, model=f"{plan.train.model}/{ranker['version']}")
    eval_digest = Steps.digest(
        plan.digests["train"], ranker["version"], plan.digests["score-test"], plan.evaluate_values
    )
    report_dir = plan.root / f"evaluation-{eval_digest}"
    evaluate_cfg = replace(evaluate_cfg, output=str(report_dir))

    def evaluate_step() -> dict:
        result = evaluate_job.run(evaluate_cfg).result
        r = result.figure_ratio
        table = {
            s: {m: result.estimates[s][metric_key(m, r)].mean for m in SUMMARY_MEASURES}
            for s in SUMMARY_SCORERS
        }
        return {"report": str(report_dir / "report.md"), "keep_ratio": r, "table": table}

    evaluation = steps.run(
        "evaluate", eval_digest, evaluate_step, lambda r: (report_dir / "report.md").exists()
    )
    promotion = promote_job.run(PromoteConfig(model=plan.train.model, candidate=ranker["version"]))
    print(promote_job.describe(promotion), flush=True)
    champion = MlflowClient().get_registered_model(plan.model).aliases.get("champion")
    return {
        "mae": mae,
        "tables": tables,
        "ranker": ranker,
        "evaluation": evaluation,
        "promotion": {"exit_code": promotion.exit_code, "champion": champion},
    }


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
    figures = [report.parent / "measures_vs_keep_ratio.png", report.parent / "kept_patches.png"]
    rows = [f"  {'scorer':<11}" + "".join(f"{m:>22}" for m in SUMMARY_MEASURES)]
    rows += [f"  {s:<11}" + "".join(f"{v:>22.4f}" for v in ev["table"][s].values()) for s in ev["table"]]
    champion = results["promotion"]["champion"]
    return "\n".join(
        [
            f"[pipeline] done in {seconds:.0f} s",
            f"  MAE: {results['mae']['mae']} (final training loss {results['mae']['final_loss']:.4f})",
            f"  score tables: {train_table['output']} ({train_table['rows']} rows), "
            f"{test_table['output']} ({test_table['rows']} rows)",
            f"  ranker: version {ranker['version']}, validation Kendall tau "
            f"{ranker.get('val_kendall_tau', float('nan')):.3f}; champion is version {champion}",
            f"  held-out test images, {round(100 * ev['keep_ratio'])}% of patches kept:",
            *rows,
            f"  report: {report}",
            f"  figures: {figures[0]}, {figures[1]}",
            f"  MLflow: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        ]
    )
