"""The whole pipeline on real images, one command: pre-train an MAE on Fashion-MNIST -> score -> train the
ranker -> evaluate it against the baselines -> register and promote -> a summary.

    python -m jobs.pipeline                   # jobs/pipeline.yaml: local Ray, runs/pipeline, SQLite MLflow
    python -m jobs.pipeline --config my.yaml  # another size or registry name

Each step is the job you would run by hand (python -m jobs.pretrain_mae, jobs.score, jobs.train,
jobs.evaluate, jobs.promote), called with the config file's section for it and the paths this command
derives from `root`. A step whose settings are unchanged and whose outputs exist is not run again
(ROOT/_pipeline.json records them), so a second run only repeats what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import ray
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs import evaluate, pretrain_mae, promote, score, train
from jobs._cli import local_resources, tracking_uri
from ltrp.data.datasets import write_fashion_mnist
from ltrp.evaluation.measures import metric_key

DEFAULT_CONFIG = Path(__file__).with_name("pipeline.yaml")
SUMMARY_SCORERS = ("ltrp", "random", "center", "folk_rcom", "supervised")


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


def _flags(**values: object) -> list[str]:
    """_flags(train_source="x") -> ["--train-source", "x"]"""
    return [item for k, v in values.items() for item in ("--" + k.replace("_", "-"), str(v))]


def _version_exists(name: str, version: str) -> bool:
    try:
        MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return True


def run_pipeline(config: Path) -> dict:
    spec = yaml.safe_load(config.read_text())
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    steps, cfg, checkpoints = Steps(root), ["--config", str(config)], root / "checkpoints"
    section = {name: spec.get(name) or {} for name in ("data", "pretrain", "score", "train", "evaluate")}
    model_name, seed = spec["registered_model"], spec.get("seed", 0)

    data_digest = Steps.digest(section["data"])
    train_dir, test_dir = root / "data" / "train", root / "data" / "test"
    steps.run(
        "data",
        data_digest,
        lambda: {
            "train": str(write_fashion_mnist(train_dir, "train", section["data"]["train_images"])),
            "test": str(write_fashion_mnist(test_dir, "test", section["data"]["test_images"])),
        },
        lambda r: train_dir.exists() and test_dir.exists(),
    )

    mae_digest = Steps.digest(data_digest, section["pretrain"], seed)
    mae_path = root / f"mae-{mae_digest}.pth"

    def pretrain_step() -> dict:
        history = pretrain_mae.main(
            cfg + _flags(source=train_dir, output=mae_path, name=f"mae-{mae_digest}", storage=checkpoints)
        )
        return {"mae": str(mae_path), "final_loss": history[-1]}

    mae = steps.run("pretrain", mae_digest, pretrain_step, lambda r: mae_path.exists())

    tables, score_digests = {}, {}
    for split, source in (("train", train_dir), ("test", test_dir)):
        digest = score_digests[split] = Steps.digest(mae_digest, section["score"], split, seed)
        output = root / f"scores-{split}-{digest}"

        def score_step(source: Path = source, output: Path = output) -> dict:
            s = score.main(cfg + _flags(source=source, mae=mae_path, output=output))
            return {
                "output": str(output),
                "images": s.images_scored,
                "rows": s.rows_written,
                "errors": s.errors,
            }

        tables[split] = steps.run(
            f"score-{split}", digest, score_step, lambda r, o=output: (o / "_SUCCESS").exists()
        )

    train_digest = Steps.digest(score_digests["train"], section["train"], model_name)

    def train_step() -> dict:
        version = train.main(
            cfg + _flags(scores=tables["train"]["output"], name=f"ranker-{train_digest}", storage=checkpoints)
        )
        return {
            "version": str(version.version),  # the SQLite store gives an int, a server a str
            **{k: float(v) for k, v in version.tags.items() if k.startswith("val_")},
        }

    ranker = steps.run("train", train_digest, train_step, lambda r: _version_exists(model_name, r["version"]))

    eval_digest = Steps.digest(train_digest, ranker["version"], score_digests["test"], section["evaluate"])
    report_dir = root / f"evaluation-{eval_digest}"

    def evaluate_step() -> dict:
        flags = _flags(
            model=f"models:/{model_name}/{ranker['version']}",
            mae=mae_path,
            scores=tables["test"]["output"],
            train_source=train_dir,
            test_source=test_dir,
            output=report_dir,
        )
        result = evaluate.main(cfg + flags)
        r = result.figure_ratio
        table = {
            s: {m: result.estimates[s][metric_key(m, r)].mean for m in _SUMMARY_MEASURES}
            for s in SUMMARY_SCORERS
        }
        return {"report": str(report_dir / "report.md"), "keep_ratio": r, "table": table}

    evaluation = steps.run(
        "evaluate", eval_digest, evaluate_step, lambda r: (report_dir / "report.md").exists()
    )
    code = promote.main(["--model", model_name, "--candidate", ranker["version"]])
    champion = MlflowClient().get_registered_model(model_name).aliases.get("champion")
    return {
        "mae": mae,
        "tables": tables,
        "ranker": ranker,
        "evaluation": evaluation,
        "promotion": {"exit_code": code, "champion": champion},
    }


_SUMMARY_MEASURES = ("reconstruction_error", "accuracy", "accuracy_seen", "accuracy_unseen")


def summary(results: dict, seconds: float) -> str:
    ev, ranker = results["evaluation"], results["ranker"]
    report = Path(ev["report"])
    train_table, test_table = results["tables"]["train"], results["tables"]["test"]
    figures = [report.parent / "measures_vs_keep_ratio.png", report.parent / "kept_patches.png"]
    rows = [f"  {'scorer':<11}" + "".join(f"{m:>22}" for m in _SUMMARY_MEASURES)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="pipeline YAML (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(**local_resources(1, 1.0))
    mlflow.set_tracking_uri(tracking_uri())
    results = run_pipeline(args.config)
    print(summary(results, time.perf_counter() - start))


if __name__ == "__main__":
    main()
