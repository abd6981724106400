"""Experiment: which pre-training makes the better encoder here, at equal compute? MAE, FOLK, MFM or none.

For each arm and seed, an encoder of the dataset's MAE geometry is pre-trained in this process with the
job's own task and epoch (`pretrain_job.MAETask` or `FrequencyTask`, `training_loop.train_epoch`) on the
unlabelled training images, for as many steps as MAE's --mae-epochs cost in FLOPs: each arm's FLOPs per
image are counted on one training step (torch's FlopCounterMode: matmuls and attention, the teacher's
forward included; the FFTs are not counted). Every arm has the same batch, peak learning rate and
schedule shape (warm-up for the first 5%, then cosine), untuned. Then each encoder is trained on a
seeded sample of --labelled-images of those images with their labels, and tested on --test-images
held-out ones:
- linear: a linear classifier on the frozen encoder's standardised features (patch tokens mean-pooled,
  then the encoder's final norm, as `vit_from_mae` pools);
- fine-tuned: the whole encoder as a timm ViT (`vit_from_mae`) with a new head.
The linear probe also at four points of the pre-training: its score against compute. Scenes: multi-label
mAP; Fashion-MNIST: top-1. Means over the seeds with 95% t-intervals, and each arm's paired difference
from MAE (same seed, same images).

    python -m jobs.experiments.pretraining --dataset scenes            # runs/bench-pretraining-scenes/
    python -m jobs.experiments.pretraining --dataset fashion_mnist
    python -m jobs.experiments.pretraining --pretrain-images 64 --labelled-images 32 --test-images 32 \\
        --mae-epochs 1 --seeds 0 --fine-tune-epochs 1 --linear-epochs 2 --no-tracking   # a smoke run

Writes ROOT/pretraining.{json,md,png}; with --tracking (the default) logs them and every arm's figures to
MLflow (experiment ltrp-bench-pretraining).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jobs.experiments.figures import plt, save
from ltrp.core.folk import Folk
from ltrp.core.mae import GEOMETRIES, MAE
from ltrp.core.optim import param_groups
from ltrp.core.pruned import vit_from_mae
from ltrp.data.checkpoints import load_mae
from ltrp.data.datasets import write_fashion_mnist
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.evaluation import efficiency
from ltrp.evaluation.efficiency import FitSettings, Method
from ltrp.evaluation.protocol import format_interval, load_labelled, t_interval
from ltrp.evaluation.scene_eval import load_scene_set
from ltrp.pipeline import runtime
from ltrp.pipeline.configs import PretrainConfig
from ltrp.pipeline.pretrain_job import FrequencyTask, MAETask
from ltrp.pipeline.training_loop import TrainerConfig, Worker, train_epoch

Dataset = Literal["scenes", "fashion_mnist"]
Arm = Literal["none", "mae", "folk", "mfm", "folk-no-teacher", "shipped"]
#: Each arm's pre-training options (`jobs.pretrain_mae`'s). Outside the budget: "none", the MAE's
#: initialisation, and "shipped" (scenes), the MAE that ships with the package, pre-trained far longer:
#: the check that the probes can tell a good pre-training at all.
ARMS: dict[str, dict] = {
    "none": {},
    "shipped": {},
    "mae": {"objective": "mae"},
    "folk": {"objective": "frequency"},  # Com/RCom, taus 0.005/0.01/0.05, the EMA teacher
    "mfm": {"objective": "frequency", "filters": ("lowpass", "highpass"), "distill_weight": 0.0},
    "folk-no-teacher": {"objective": "frequency", "distill_weight": 0.0},  # FOLK's filters alone
}
#: The dataset's MAE geometry and image size.
GEOMETRY = {"scenes": ("mae_vit_scenes_patch4", 56), "fashion_mnist": ("mae_vit_fmnist_patch4", 32)}
FULL = Method("full", "full")  # a probe runs on every token
UNITS = 20  # the schedule's units (the loop's "epochs"): warm-up for one, the linear probe every fifth
WARMUP_UNITS = 1


@dataclass(frozen=True)
class PretrainingArgs:
    dataset: Dataset = "scenes"
    arms: tuple[Arm, ...] = ("none", "mae", "folk", "mfm")
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_images: int = 4000  # unlabelled training images (--labelled-images of them also labelled)
    labelled_images: int = 1000  # the probes' training images
    test_images: int = 1000  # held-out images the probes are scored on
    mae_epochs: int = 8  # MAE's pre-training epochs over --pretrain-images: the FLOPs every arm gets
    batch_size: int = 128  # pre-training images per step, every arm
    lr: float = 1.5e-3  # pre-training peak learning rate, every arm
    fine_tune_epochs: int = 8
    fine_tune_lr: float = 5e-4
    linear_epochs: int = 30
    root: str | None = None  # default runs/bench-pretraining-DATASET
    threads: int = 2
    tracking: bool = True  # log to MLflow (experiment ltrp-bench-pretraining)


@dataclass
class Data:
    pixels: torch.Tensor  # (N, S, S, 3) uint8, the pre-training images
    x_labelled: torch.Tensor  # (M, 3, S, S) model inputs of a seeded sample of M of them
    y_labelled: torch.Tensor  # (M,) classes or (M, C) multi-hot
    x_test: torch.Tensor
    y_test: torch.Tensor


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PretrainingArgs, args=argv)
    if "mae" not in args.arms:
        raise SystemExit("--arms: the compute budget is MAE's, so the arms must include mae")
    if "shipped" in args.arms and args.dataset != "scenes":
        raise SystemExit("--arms shipped: the shipped MAE is a scenes MAE")
    if args.labelled_images > args.pretrain_images:
        raise SystemExit("--labelled-images: at most --pretrain-images (they are some of them)")
    torch.set_num_threads(args.threads)
    root = Path(args.root or f"runs/bench-pretraining-{args.dataset}")
    data = _data(args, root)
    flops = {arm: _flops_per_image(args, arm, data.pixels[: args.batch_size]) for arm in args.arms}
    budget = args.mae_epochs * len(data.pixels) * flops["mae"]
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            started = time.perf_counter()
            run = _run(args, arm, seed, data, flops[arm], budget)
            run["seconds"] = time.perf_counter() - started
            runs.append(run)
            _progress(f"{arm} seed {seed}: fine-tuned {run['fine_tuned']:.3f}, linear {run['linear']:.3f} "
                      f"({run['seconds']:.0f} s)")  # fmt: skip
    result = {
        "args": asdict(args),
        "measure": "mAP" if args.dataset == "scenes" else "top-1",
        "chance": efficiency.chance(data.y_test),
        "gflops_per_image": {arm: f / 1e9 for arm, f in flops.items()},
        "budget_pflops": budget / 1e15,
        "runs": runs,
        "summary": _summary(runs, args.arms),
        "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}",
    }
    table = _table(result)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pretraining.json").write_text(json.dumps(result, indent=2))
    (root / "pretraining.md").write_text(table + "\n")
    _figure(result, root / "pretraining.png")
    if args.tracking:
        _log(result, root)
    return result


def _progress(message: str) -> None:
    print(f"[pretraining] {message}", flush=True)


# -- data -------------------------------------------------------------------------------------------------
def _data(args: PretrainingArgs, root: Path) -> Data:
    """The dataset's training images (the pre-training's; a seeded sample of --labelled-images of them the
    probes') and test images, written under `root` as the jobs read them, loaded at the geometry's size."""
    size = GEOMETRY[args.dataset][1]
    if args.dataset == "scenes":
        scenes = SceneConfig()
        train = load_scene_set(
            str(write_scenes(root / "train", "train", args.pretrain_images, scenes)), size, 4
        )
        test = load_scene_set(str(write_scenes(root / "test", "test", args.test_images, scenes)), size, 4)
    else:
        train, classes, _ = load_labelled(
            str(write_fashion_mnist(root / "train", "train", args.pretrain_images)), size
        )
        test, _, _ = load_labelled(
            str(write_fashion_mnist(root / "test", "test", args.test_images)), size, classes
        )
    # A seeded sample: an ImageFolder's images come sorted by class, so its first ones are a few classes.
    labelled = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[
        : args.labelled_images
    ]
    return Data(
        torch.from_numpy(train.pixels), train.inputs()[labelled], torch.from_numpy(train.labels)[labelled],
        test.inputs(), torch.from_numpy(test.labels),
    )  # fmt: skip


# -- pre-training -----------------------------------------------------------------------------------------
class _FromMemory:
    """A pre-training task fed from pixels in memory: each of the loop's epochs (a schedule unit) takes
    the next `images` images of an endless stream of seeded shuffles, in `steps` batches of nearly equal
    size (about --batch-size): every arm then spends its FLOPs exactly, with the same schedule."""

    pixels: torch.Tensor  # (N, S, S, 3) uint8
    images: int  # images per unit
    steps: int  # batches per unit

    def batches(self, epoch: int, worker: Worker) -> Iterator[dict]:
        self.begin_epoch(epoch, worker)
        n, per = len(self.pixels), self.images
        first, last = epoch * per // n, ((epoch + 1) * per - 1) // n
        shuffles = [torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + p))
                    for p in range(first, last + 1)]  # fmt: skip
        order = torch.cat(shuffles)[epoch * per - first * n :][:per]
        for idx in order.tensor_split(self.steps):
            yield {"image": self.pixels[idx], "skipped": []}


class _MAEFromMemory(_FromMemory, MAETask):
    pass


class _FrequencyFromMemory(_FromMemory, FrequencyTask):
    pass


def _task(args: PretrainingArgs, arm: str, seed: int, pixels: torch.Tensor, images: int) -> MAETask:
    """The arm's task, fed `images` images a unit in batches of about --batch-size."""
    cfg = PretrainConfig(
        source="memory", output="memory", geometry=GEOMETRY[args.dataset][0], batch_size=args.batch_size,
        lr=args.lr, seed=seed, sample_images=0, **ARMS[arm],
    )  # fmt: skip
    task = (_FrequencyFromMemory if cfg.objective == "frequency" else _MAEFromMemory)(cfg, [], pixels[:0])
    task.pixels, task.images, task.steps = pixels, images, max(1, round(images / args.batch_size))
    return task


def _flops_per_image(args: PretrainingArgs, arm: str, batch: torch.Tensor) -> float:
    """FLOPs of one training step (forward and backward, the teacher's forward), per image."""
    if arm in ("none", "shipped"):
        return 0.0
    task, worker = _task(args, arm, 0, batch, len(batch)), Worker(0, 1, torch.device("cpu"))
    model = task.build(worker)
    task.begin_epoch(0, worker)
    with FlopCounterMode(display=False) as counter:
        loss, count = task.loss(model, {"image": batch, "skipped": []}, worker)
        loss.backward()
    return counter.get_total_flops() / count


def _run(args: PretrainingArgs, arm: str, seed: int, data: Data, flops: float, budget: float) -> dict:
    """Pre-trains one arm under the budget, measuring the linear probe every fifth unit; then both probes."""
    torch.manual_seed(seed)  # as the training loop seeds every worker before building
    if arm in ("none", "shipped"):
        mae = load_mae(str(SHIPPED_MAE)) if arm == "shipped" else MAE(GEOMETRIES[GEOMETRY[args.dataset][0]])
        return {"arm": arm, "seed": seed, "steps": 0, "curve": []} | _probes(args, mae, data, seed)
    task = _task(args, arm, seed, data.pixels, images=max(1, round(budget / flops / UNITS)))
    worker = Worker(0, 1, torch.device("cpu"))
    model = task.build(worker)
    settings = TrainerConfig(
        name=arm, storage="-", workers=1, worker_cpus=1.0, use_gpu=False, max_failures=0, keep_checkpoints=1,
        epochs=UNITS, warmup_epochs=WARMUP_UNITS, steps_per_epoch=task.steps, lr=args.lr, weight_decay=0.05,
        seed=seed,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    mae = model.student if isinstance(model, Folk) else model
    curve, losses = [], []
    for unit in range(UNITS):
        losses.append(train_epoch(settings, task, worker, model, optimizer, unit)["train_loss"])
        if (unit + 1) % (UNITS // 4) == 0:
            done = (unit + 1) * task.images * flops / budget
            curve.append((done, _linear_probe(args, mae, data, seed)))
            loss, linear = losses[-1], curve[-1][1]
            _progress(f"{arm} seed {seed}: {done:.0%} of the budget, loss {loss:.4f}, linear {linear:.3f}")
    images = UNITS * task.images
    spent = {"steps": UNITS * task.steps, "images": images, "budget_used": images * flops / budget}
    probes = {"linear": curve[-1][1], "fine_tuned": _fine_tuned(args, mae, data, seed)}
    return {"arm": arm, "seed": seed, **spent, "train_loss": losses, "curve": curve, **probes}


# -- probes -----------------------------------------------------------------------------------------------
def _probes(args: PretrainingArgs, mae: MAE, data: Data, seed: int) -> dict:
    return {"linear": _linear_probe(args, mae, data, seed), "fine_tuned": _fine_tuned(args, mae, data, seed)}


def _classes(data: Data) -> int:
    return data.y_test.shape[1] if data.y_test.dim() == 2 else int(data.y_labelled.max()) + 1


@torch.no_grad()
def _features(mae: MAE, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, D): the frozen encoder's pooled features, as its fine-tuning pools them."""
    vit = vit_from_mae(mae, 1).eval()
    return torch.cat([vit.forward_head(vit.forward_features(x), pre_logits=True) for x in images.split(256)])


def _linear_probe(args: PretrainingArgs, mae: MAE, data: Data, seed: int) -> float:
    """A linear classifier on standardised frozen features (MAE's linear probe normalises them too)."""
    train, test = _features(mae, data.x_labelled), _features(mae, data.x_test)
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    head = nn.Linear(train.shape[1], _classes(data))
    settings = FitSettings(args.linear_epochs, 256, lr=1e-2, weight_decay=0.0, seed=seed)
    efficiency.fit(head, (train - mean) / std, data.y_labelled, settings)
    return efficiency.score(efficiency.outputs(head, (test - mean) / std, FULL), data.y_test)


def _fine_tuned(args: PretrainingArgs, mae: MAE, data: Data, seed: int) -> float:
    vit = vit_from_mae(mae, _classes(data))
    settings = FitSettings(args.fine_tune_epochs, 128, lr=args.fine_tune_lr, seed=seed)
    efficiency.fit(vit, data.x_labelled, data.y_labelled, settings)
    return efficiency.score(efficiency.outputs(vit, data.x_test, FULL), data.y_test)


# -- summary ----------------------------------------------------------------------------------------------
def _summary(runs: list[dict], arms: tuple[str, ...]) -> dict:
    """Per arm and probe: the mean over seeds with its interval, and the paired difference from MAE."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    summary = {}
    for arm in arms:
        summary[arm] = {}
        for probe in ("fine_tuned", "linear"):
            values = [by[arm, s][probe] for s in seeds]
            gaps = [by[arm, s][probe] - by["mae", s][probe] for s in seeds]
            summary[arm][probe] = t_interval(values)
            summary[arm][f"{probe}_minus_mae"] = t_interval(gaps)
    return summary


def _table(result: dict) -> str:
    args, measure = result["args"], result["measure"]
    steps = {r["arm"]: r["steps"] for r in result["runs"]}
    budget = f"the budget MAE's {args['mae_epochs']} epochs ({result['budget_pflops'] * 1e3:.1f} TFLOP)"
    probes = f"probes on {args['labelled_images']} labelled, tested on {args['test_images']}"
    lines = [
        f"{args['dataset']}: {args['pretrain_images']} pre-training images, {budget}; {probes}; {measure}, "
        f"chance {result['chance']:.3f}; seeds {args['seeds']} (mean [95% t-interval], differences paired)",
        "",
        f"| arm | GFLOP/image step | steps | fine-tuned {measure} | linear {measure} | fine-tuned - MAE "
        "| linear - MAE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, s in result["summary"].items():
        cells = [arm, f"{result['gflops_per_image'][arm]:.2f}", str(steps[arm])]
        probes = ("fine_tuned", "linear", "fine_tuned_minus_mae", "linear_minus_mae")
        cells += [format_interval(s[k]) for k in probes]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> None:
    """Left: each arm's probes with their intervals. Right: the linear probe against the share of the
    compute budget spent, each seed a line; the untrained encoder's level dashed."""
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    arms = list(result["summary"])
    for offset, probe in ((-0.18, "fine_tuned"), (0.18, "linear")):
        e = [result["summary"][a][probe] for a in arms]
        errors = [[x["mean"] - x["low"] for x in e], [x["high"] - x["mean"] for x in e]]
        label = probe.replace("_", "-")
        bars.bar(
            np.arange(len(arms)) + offset, [x["mean"] for x in e], 0.36, yerr=errors, capsize=3, label=label
        )
    bars.axhline(result["chance"], color="grey", linestyle=":", label="chance")
    bars.set_xticks(range(len(arms)), arms)
    bars.set_ylabel(result["measure"])
    bars.set_title(f"{result['args']['dataset']}: probes after equal pre-training compute")
    colours = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for run in result["runs"]:
        if run["curve"]:
            done, score = zip(*run["curve"], strict=True)
            label = run["arm"] if run["seed"] == result["args"]["seeds"][0] else None
            curves.plot(done, score, marker="o", color=colours[run["arm"]], label=label)
    if "none" in result["summary"]:
        level = result["summary"]["none"]["linear"]["mean"]
        curves.axhline(level, color=colours["none"], linestyle="--", label="none (mean)")
    curves.set_xlabel("share of the compute budget (MAE's epochs)")
    curves.set_ylabel(f"linear probe {result['measure']}")
    curves.set_title("linear probe during pre-training")
    save(fig, [bars, curves], path)


def _log(result: dict, root: Path) -> None:
    """A run for the comparison (its table, figure and numbers), and a nested run per arm: its options,
    its probes per seed (metric steps) and their means and intervals."""
    runtime.track("ltrp-bench-pretraining")
    with mlflow.start_run(run_name=f"pre-training arms, {result['args']['dataset']}"):
        mlflow.log_params({k: str(v) for k, v in result["args"].items()})
        for name in ("pretraining.md", "pretraining.png", "pretraining.json"):
            mlflow.log_artifact(str(root / name))
        for arm, summary in result["summary"].items():
            with mlflow.start_run(run_name=arm, nested=True):
                mlflow.log_params({"arm": arm} | {k: str(v) for k, v in ARMS[arm].items()})
                for run in (r for r in result["runs"] if r["arm"] == arm):
                    mlflow.log_metrics({p: run[p] for p in ("fine_tuned", "linear")}, step=run["seed"])
                for probe, e in summary.items():
                    mlflow.log_metrics({f"{probe}.{k}": v for k, v in e.items()})


if __name__ == "__main__":
    main()
