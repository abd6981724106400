"""Experiment: is the ranker trained to convergence? Object recall against training epochs and scenes.

    python -m jobs.experiments.convergence --scores runs/benchmark/scores-train-XXXX \\
        --test runs/benchmark/data/test/manifest.parquet --mae ltrp/data/weights/mae_vit_scenes_patch4.pth
    # with the oracle's line: --oracle runs/benchmark/scores-test-cover-XXXX; a quick look:
    # --scenes 500 1000 --epochs 10 --every 2

For each count N of --scenes, a ranker trains on the first N images of the score table (by image id; the
images whose id hashes into --val-fraction are held out, as the training job holds them out), in this
process, no Ray: RankerTask's loss, batches and validation, the training loop's epoch (AdamW, its schedule per
step over --epochs). The views are decoded once, for every count. Every --every epochs and after the
last: validation Kendall tau, and object recall at 25% keep on the held-out scenes (pooled, with its 95%
bootstrap interval, and per background kind). Reference lines, measured once on the same scenes: random,
center, variance, gradient, FOLK's RCom and, with --oracle, the full-coverage oracle.

Prints the recall and the validation tau per scenes count and epoch, the best epoch of each count, the
training rate (views/s, training steps only) and the references; writes OUTPUT/convergence.png (recall
against epochs; best recall against training scenes) and OUTPUT/convergence.json; with --tracking, logs
them to MLflow (experiment ltrp-bench).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import torch
import tyro

from ltrp.core.baselines import RankerScorer
from ltrp.core.optim import param_groups
from ltrp.core.options import Init, RankerGeometry
from ltrp.core.ranker import Ranker, RankerConfig, init_from_encoder, keep_top
from ltrp.data.checkpoints import load_mae
from ltrp.data.scenes import SEEN_CLASSES, SHIPPED_MAE, UNSEEN_CLASSES
from ltrp.data.tables import read_job_metadata, read_scores
from ltrp.evaluation import fidelity
from ltrp.evaluation.measures import metric_key
from ltrp.evaluation.objects import measure
from ltrp.evaluation.protocol import baseline_scorers, interval, score_all
from ltrp.evaluation.scene_eval import PRIMARY_RATIO, SceneSet, kind_order, load_scene_set
from ltrp.pipeline import runtime, trainer
from ltrp.pipeline.configs import TrainConfig
from ltrp.pipeline.train_job import MONITOR, RankerTask, ShardViews, ranker_config
from ltrp.pipeline.training_data import load_views, select_split
from ltrp.pipeline.training_loop import Worker, train_epoch

EXPERIMENT = "ltrp-bench"
RESAMPLES = 1000  # bootstrap resamples of each pooled recall's interval
#: The options this experiment shares with the training job (ltrp.pipeline.configs.TrainConfig).
TRAINING_OPTIONS = ("scores", "ranker", "init", "epochs", "warmup_epochs", "batch_size", "lr", "weight_decay")
TRAINING_OPTIONS += ("val_fraction", "views", "seed", "threads")
Views = dict[str, torch.Tensor]  # load_views' arrays as tensors: image, visible, scores


@dataclass
class ConvergenceConfig:
    """Object recall against training epochs and training scenes, trained in this process."""

    scores: str  # the training score table: a scoring job's output folder
    test: str  # held-out scene manifest with object masks (e.g. runs/benchmark/data/test/manifest.parquet)
    oracle: str | None = None  # the held-out scenes' --cover score table: the oracle's reference line
    mae: str = str(SHIPPED_MAE)  # MAE checkpoint whose encoder starts the ranker (--init mae only)
    ranker: RankerGeometry = "ltrp_vit_scenes_mae_patch4"  # ranker size and patch grid
    init: Init = "mae"  # scratch, or mae: the backbone starts from --mae's encoder
    lr: float = 5e-4  # peak learning rate
    batch_size: int = 64  # views per step
    weight_decay: float = 0.06  # AdamW weight decay (not on norms, biases and tokens)
    warmup_epochs: int = 1  # linear warm-up epochs before the cosine decay
    epochs: int = 40  # epochs of each training (the cosine schedule spans them)
    every: int = 2  # measure every N epochs, and after the last
    scenes: tuple[int, ...] = (500, 1000, 2000, 4000, 8000)  # trainings on the table's first N images
    views: int | None = None  # train on views 0 .. N-1 of each image only (None: every view in the table)
    val_fraction: float = 0.1  # fraction of images (by id hash) held out for validation, never trained on
    seed: int = 0  # seed of the initialisation, the shuffles, the random reference and the bootstrap
    threads: int = 2  # torch threads
    output: str = "runs/bench/convergence"  # folder of convergence.png and convergence.json
    tracking: bool = False  # log params, metrics per epoch and the files to MLflow (experiment ltrp-bench)


class Decoded:
    """A split's decoded views where `ShardViews` takes a Ray Data shard: one batch of all of them, which
    a cached `ShardViews` keeps and serves shuffled per epoch, as it does in the training job."""

    def __init__(self, views: Views) -> None:
        self.views = views

    def iter_torch_batches(self, batch_size: int) -> Iterator[Views]:
        yield self.views


def main(argv: list[str] | None = None) -> dict:
    prog = "python -m jobs.experiments.convergence"
    cfg = tyro.cli(ConvergenceConfig, args=argv, prog=prog, description=__doc__)
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The training job's options, so that its RankerTask and trainer settings serve here unchanged.
    train_cfg = TrainConfig(**{k: getattr(cfg, k) for k in TRAINING_OPTIONS}, validate_every=cfg.every)
    meta = read_job_metadata(cfg.scores)
    geometry, mae = ranker_config(train_cfg, meta), meta["mae_config"]
    if mae["img_size"] // mae["patch_size"] != geometry.grid:
        raise SystemExit(f"--ranker {cfg.ranker}: not the patch grid that --scores {cfg.scores} scores")
    encoder = load_mae(cfg.mae).state_dict() if cfg.init == "mae" else None

    test = load_scene_set(cfg.test, geometry.img_size, geometry.patch_size)
    if test.objects is None:
        raise SystemExit(f"--test {cfg.test}: no object masks in the manifest")
    x_test = test.inputs().to(device)
    references = measure_references(cfg, test, x_test, geometry)
    for name, recall in references.items():
        print(f"[convergence] {name}: {_describe(recall)}", flush=True)

    table = read_scores(cfg.scores).sort_by([("image_id", "ascending"), ("view", "ascending")])
    images = len(set(table.column("image_id").to_pylist()))
    counts, skipped = [n for n in cfg.scenes if n <= images], [n for n in cfg.scenes if n > images]
    if skipped:
        print(f"[convergence] the table holds {images} images: skipping --scenes {skipped}", flush=True)
    if not counts:
        raise SystemExit(f"--scores {cfg.scores}: {images} images, fewer than any of --scenes")
    started = time.perf_counter()
    train, order = decoded_split(table, cfg, False, geometry.img_size, max(counts))
    val, _ = decoded_split(table, cfg, True, geometry.img_size, images)
    print(
        f"[convergence] decoded {len(train['scores'])} training and {len(val['scores'])} validation views "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    result = {
        "args": asdict(cfg), "device": str(device), "table_images": images, "test_scenes": len(test.pixels),
        "kinds": {k: test.backgrounds.count(k) for k in kind_order(test.backgrounds)},
        "references": references, "runs": [],
    }  # fmt: skip
    with mlflow_run(cfg, references):
        for n in counts:
            rows = torch.as_tensor(order < n)
            run = train_and_measure(
                cfg,
                train_cfg,
                geometry,
                encoder,
                {k: v[rows] for k, v in train.items()},
                val,
                test,
                x_test,
                n,
            )
            run["train_scenes"] = len(np.unique(order[order < n]))
            result["runs"].append(run)
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "convergence.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "convergence.png")
        if cfg.tracking:
            for name in ("convergence.json", "convergence.png"):
                mlflow.log_artifact(str(out / name))
    print(tables(result))
    return result


def decoded_split(
    table: pa.Table, cfg: ConvergenceConfig, validation: bool, size: int, first: int
) -> tuple[Views, np.ndarray]:
    """One side of the training job's split (`select_split`), of the table's first `first` images by id,
    decoded with the training job's `load_views`. Also returns each view's image, as its place among
    the table's images by id (the table is sorted by id)."""
    place = {i: k for k, i in enumerate(dict.fromkeys(table.column("image_id").to_pylist()))}
    rows = select_split(table, cfg.val_fraction, validation, cfg.views)
    order = np.array([place[i] for i in rows.column("image_id").to_pylist()], dtype=np.int64)
    rows, order = rows.filter(pa.array(order < first)), order[order < first]
    views = {k: torch.from_numpy(v) for k, v in load_views(rows, size).items()}
    return views, order


def train_and_measure(
    cfg: ConvergenceConfig,
    train_cfg: TrainConfig,
    geometry: RankerConfig,
    encoder: dict[str, torch.Tensor] | None,
    train: Views,
    val: Views,
    test: SceneSet,
    x_test: torch.Tensor,
    scenes: int,
) -> dict:
    """Trains a ranker on `train` as the training job does, measuring it on the epochs that the job
    would validate (`TrainerConfig.validates`). Returns the run's points (one per measurement) and its
    training rate."""
    device = x_test.device
    torch.manual_seed(cfg.seed)  # as the training loop seeds before the task builds the model
    model = Ranker(geometry)
    if encoder is not None:
        init_from_encoder(model, encoder)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    count = len(train["scores"])
    settings = trainer.settings(
        train_cfg, steps_per_epoch=max(1, math.ceil(count / cfg.batch_size)), lr=cfg.lr
    )
    task = RankerTask(train_cfg, {}, {"train": True, "val": True})
    task.views = {"train": ShardViews(Decoded(train), True), "val": ShardViews(Decoded(val), True)}
    worker, seconds, points = Worker(0, 1, device), 0.0, []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        metrics = train_epoch(settings, task, worker, model, optimizer, epoch)  # the job's epoch
        seconds += time.perf_counter() - started
        if not settings.validates(epoch):
            continue
        point = {
            "epoch": epoch + 1,
            "object_recall": object_recall(score_all(RankerScorer(model), x_test).cpu(), test, cfg.seed),
            "train_loss": metrics["train_loss"],
            "train_seconds": seconds,
            "views_per_second": count * (epoch + 1) / seconds,
        } | task.end_epoch(model, epoch, worker)
        points.append(point)
        print(
            f"[convergence] {scenes} scenes ({count} views), epoch {epoch + 1}/{cfg.epochs}: object recall "
            f"{_describe(point['object_recall'])}; {MONITOR} {point[MONITOR]:.3f}, train_loss "
            f"{point['train_loss']:.3f}, {point['views_per_second']:.0f} views/s",
            flush=True,
        )
        if cfg.tracking:
            mlflow.log_metrics(_metrics(f"scenes{scenes}", point), step=epoch + 1)
    return {
        "scenes": scenes,
        "train_views": count,
        "views_per_second": points[-1]["views_per_second"],
        "points": points,
        "best": max(points, key=lambda p: p["object_recall"]["pooled"]["mean"])["epoch"],
        "val_pick": max(points, key=lambda p: p[MONITOR])["epoch"],  # what the training job registers
    }


def object_recall(scores: torch.Tensor, test: SceneSet, seed: int) -> dict:
    """Object recall at 25% keep of the (N, L) `scores`: pooled over the scenes, its mean and 95%
    bootstrap interval; per background kind, its mean."""
    keep = keep_top(scores, PRIMARY_RATIO).numpy()
    recall = measure(test.objects, keep, SEEN_CLASSES, UNSEEN_CLASSES).recall
    kinds = np.asarray(test.backgrounds)
    return {
        "pooled": asdict(interval(recall[~np.isnan(recall)], RESAMPLES, seed)),
        "kinds": {k: float(np.nanmean(recall[kinds == k])) for k in kind_order(kinds)},
    }


def measure_references(
    cfg: ConvergenceConfig, test: SceneSet, x_test: torch.Tensor, geometry: RankerConfig
) -> dict:
    """Object recall of the training-free selectors and, with --oracle, of the full-coverage oracle
    (built from the cover table as the evaluation job builds it)."""
    scorers = baseline_scorers(geometry.patch_size, cfg.seed)
    scores = {name: score_all(scorer, x_test).cpu() for name, scorer in scorers.items()}
    if cfg.oracle:
        cover = read_scores(cfg.oracle, columns=["image_id", "view", "visible", "scores"])
        scores["oracle"] = torch.as_tensor(fidelity.oracle(cover, geometry.num_patches, test.image_ids))
    return {name: object_recall(s, test, cfg.seed) for name, s in scores.items()}


def mlflow_run(cfg: ConvergenceConfig, references: dict) -> mlflow.ActiveRun | nullcontext:
    """With --tracking, a run in the ltrp-bench experiment (the project's tracking URI) holding the
    options as params and the references as metrics; else nothing."""
    if not cfg.tracking:
        return nullcontext()
    runtime.track(EXPERIMENT)
    run = mlflow.start_run(run_name=f"convergence {Path(cfg.scores).name}")
    mlflow.log_params({k: str(v) for k, v in asdict(cfg).items()})
    for name, recall in references.items():
        mlflow.log_metrics(_metrics(f"reference.{name}", {"object_recall": recall}))
    return run


def _metrics(prefix: str, point: dict) -> dict[str, float]:
    """A measurement as MLflow metrics: PREFIX.object_recall.keep25 (pooled mean), the same .KIND per
    background kind, and PREFIX.NAME of its other figures."""
    recall, key = point["object_recall"], f"{prefix}.{metric_key('object_recall', PRIMARY_RATIO)}"
    out = {key: recall["pooled"]["mean"]} | {f"{key}.{k}": v for k, v in recall["kinds"].items()}
    return out | {f"{prefix}.{k}": v for k, v in point.items() if k not in ("epoch", "object_recall")}


def _describe(recall: dict) -> str:
    """'0.512 [0.498, 0.527] (black 0.61, texture 0.47)': a pooled recall and its kinds."""
    pooled, kinds = recall["pooled"], ", ".join(f"{k} {v:.3f}" for k, v in recall["kinds"].items())
    return f"{pooled['mean']:.3f} [{pooled['lo']:.3f}, {pooled['hi']:.3f}] ({kinds})"


def tables(result: dict) -> str:
    """Object recall and validation tau per scenes count (rows) and measured epoch (columns), then each
    count's best epoch and the references per background kind."""
    runs, kinds = result["runs"], list(result["kinds"])
    epochs = [p["epoch"] for p in runs[0]["points"]] if runs else []
    head = "| scenes (trained) | " + " | ".join(f"ep {e}" for e in epochs)
    rule = "|---" * (len(epochs) + 1)
    recall_lines = [
        f"Object recall at 25% keep on {result['test_scenes']} held-out scenes, pooled mean (higher is "
        f"better), against the epochs of each training on the table's first N images ({MONITOR}'s pick: "
        "the epoch the training job would register)",
        f"{head} | best [95% CI] @ epoch | {MONITOR}'s pick | views/s |",
        f"{rule}|---|---|---|",
    ]
    tau_lines = [
        f"{MONITOR} / val_full_kendall_tau on the validation views: the ranker seeing the scored patches "
        "only, as it trains / seeing every patch, as it ranks (higher is better)",
        f"{head} |",
        f"{rule}|",
    ]
    kind_lines = [
        "Object recall at 25% keep per background kind: each training at its best epoch, and the references",
        "| selector | pooled [95% CI] | " + " | ".join(kinds) + " |",
        "|---" * (len(kinds) + 2) + "|",
    ]
    for run in runs:
        label = f"{run['scenes']} ({run['train_scenes']})"
        by_epoch = {p["epoch"]: p for p in run["points"]}
        best, pick = by_epoch[run["best"]]["object_recall"], by_epoch[run["val_pick"]]["object_recall"]
        cells = " | ".join(f"{p['object_recall']['pooled']['mean']:.3f}" for p in run["points"])
        recall_lines.append(
            f"| {label} | {cells} | {_estimate(best['pooled'])} @ {run['best']} | "
            f"{pick['pooled']['mean']:.3f} @ {run['val_pick']} | {run['views_per_second']:.0f} |"
        )
        taus = (f"{p[MONITOR]:.3f} / {p['val_full_kendall_tau']:.3f}" for p in run["points"])
        tau_lines.append(f"| {label} | " + " | ".join(taus) + " |")
        kind_lines.append(_kind_row(f"ranker, {run['scenes']} scenes, epoch {run['best']}", best, kinds))
    kind_lines += [_kind_row(name, recall, kinds) for name, recall in result["references"].items()]
    return "\n\n".join("\n".join(lines) for lines in (recall_lines, tau_lines, kind_lines))


def _estimate(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _kind_row(name: str, recall: dict, kinds: list[str]) -> str:
    return (
        f"| {name} | {_estimate(recall['pooled'])} | "
        + " | ".join(f"{recall['kinds'][k]:.3f}" for k in kinds)
        + " |"
    )


def plot(result: dict, path: Path) -> None:
    """Left: object recall against epochs, a line per scenes count; right: each count's best recall
    (95% interval) against the scenes it trained on. The references as dashed lines on both."""
    from jobs.experiments.figures import plt, save

    fig, (by_epoch, by_scenes) = plt.subplots(1, 2, figsize=(12, 4.8))
    runs = result["runs"]
    for run, colour in zip(runs, plt.cm.viridis(np.linspace(0, 0.9, max(1, len(runs)))), strict=False):
        recall = [p["object_recall"]["pooled"]["mean"] for p in run["points"]]
        by_epoch.plot([p["epoch"] for p in run["points"]], recall, "o-", color=colour, ms=3,
                      label=f"{run['scenes']} scenes ({run['train_scenes']} trained)")  # fmt: skip
    best = [next(p for p in r["points"] if p["epoch"] == r["best"])["object_recall"]["pooled"] for r in runs]
    error = [[b["mean"] - b["lo"] for b in best], [b["hi"] - b["mean"] for b in best]]
    by_scenes.errorbar([r["train_scenes"] for r in runs], [b["mean"] for b in best], yerr=error, fmt="o-",
                       color="k", capsize=3, label="ranker, best epoch")  # fmt: skip
    for (name, recall), colour in zip(result["references"].items(), plt.cm.tab10.colors, strict=False):
        for ax in (by_epoch, by_scenes):
            ax.axhline(recall["pooled"]["mean"], ls="--", lw=1, color=colour, label=name)
    ylabel = "object recall at 25% keep (higher is better)"
    by_epoch.set(xlabel="epoch", ylabel=ylabel, title=f"{result['test_scenes']} held-out scenes, by epoch")
    by_scenes.set(xscale="log", xlabel="training scenes (log)", ylabel=ylabel, title="best epoch, by scenes")
    save(fig, (by_epoch, by_scenes), path)


if __name__ == "__main__":
    main()
