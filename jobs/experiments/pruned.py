"""Experiment: cheaper vision transformers. A timm ViT's accuracy against its measured throughput on this
machine, when it runs on the top-k patches of LTRP rankers of two sizes (their forward counted in the
cost), random, the centre prior, patch variance and FOLK, or merges tokens with ToMe; off the shelf
(trained on all tokens) and fine-tuned on the kept tokens. On scenes (multi-label mAP; the shipped MAE
scores the rankers' table) and on Fashion-MNIST (top-1 accuracy; an MAE pre-trained here scores it).
Also the ranking job's images/s next to the ranker kernel's on the same machine.

    python -m jobs.experiments.pruned                            # scenes (runs/bench-pruned-scenes/)
    python -m jobs.experiments.pruned --dataset fashion_mnist    # Fashion-MNIST
    python -m jobs.experiments.pruned --train-images 300 --test-images 100 --epochs 1 --fine-tune-epochs 1

Self-contained and reusing what exists under --root: the images, the MAE, a score table of the rankers'
training images (--views views each), the rankers trained on it, the ViT. Logs the table, the figure
and every figure's number to MLflow (experiment ltrp-bench-pruned).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import mlflow
import torch
import tyro
from timm.models.vision_transformer import VisionTransformer

from jobs.experiments.figures import plt, save
from ltrp.core.baselines import CenterScorer, FolkRComScorer, RankerScorer, VarianceScorer
from ltrp.core.ranker import Ranker, rank
from ltrp.data.datasets import write_fashion_mnist
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.evaluation import efficiency
from ltrp.evaluation.efficiency import FitSettings, Method
from ltrp.evaluation.protocol import LabelledImages, load_labelled
from ltrp.evaluation.scene_eval import SceneSet, load_scene_set
from ltrp.pipeline import pretrain_job, runtime, train_job, trainer
from ltrp.pipeline.configs import PretrainConfig, RankConfig, ScoreConfig, TrainConfig
from ltrp.pipeline.rank_job import RankJob
from ltrp.pipeline.score_job import ScoreJob

Dataset = Literal["scenes", "fashion_mnist"]


@dataclass(frozen=True)
class DatasetSetting:
    """What the experiment fixes per dataset: the input, the two ranker sizes, ToMe's r values."""

    size: int  # input side in pixels (4-px patches)
    rankers: tuple[str, str]  # the ranker geometries for that grid, large and tiny
    tome_r: tuple[int, ...]  # tokens merged per block, spanning the top-k methods' speeds at depth 4
    mask_ratio: float  # the scoring's, as the pipeline scores this dataset
    measure: str  # the accuracy's name


DATASETS: dict[str, DatasetSetting] = {
    "scenes": DatasetSetting(
        56, ("ltrp_vit_scenes_patch4", "ltrp_vit_scenes_tiny_patch4"), (12, 24, 36, 48), 0.9, "mAP"
    ),
    "fashion_mnist": DatasetSetting(
        32, ("ltrp_vit_fmnist_patch4", "ltrp_vit_fmnist_tiny_patch4"), (4, 8, 12, 15), 0.75, "top-1"
    ),
}
PATCH = 4


@dataclass
class PrunedArgs:
    dataset: Dataset = "scenes"
    root: str | None = None  # everything goes here, what exists is reused; None: runs/bench-pruned-DATASET
    train_images: int = 3000  # images that train the ViT (the first --ranker-images also train the rankers)
    ranker_images: int = 1500  # training images scored for the rankers
    test_images: int = 500  # held-out images: accuracy and throughput
    views: int = 4  # scored views per ranker training image
    ranker_epochs: int = 4
    mae_epochs: int = 3  # Fashion-MNIST: pre-training of its MAE on the rankers' images
    width: int = 128  # the ViT: 4-px patches, this width, depth and heads
    depth: int = 4
    heads: int = 2
    epochs: int = 10  # ViT training on all tokens
    fine_tune_epochs: int = 1  # fine-tuning on kept tokens, per selector and keep ratio
    keep_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    fine_tuned: tuple[str, ...] = ("random", "center")  # baselines fine-tuned too (the rankers always are)
    batch_size: int = 128
    lr: float = 1e-3
    rounds: int = 3  # timing rounds (median)
    threads: int = 2  # torch threads for training and timing
    device: str = "cpu"  # where the ViT, the selectors and ToMe train and are timed (cuda: a GPU)
    seed: int = 0


@dataclass
class Data:
    """The experiment's images: model inputs (N, 3, S, S), targets (N,) classes or (N, C) multi-hot."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ranker_source: str  # the rankers' training images (scored, then learned from)
    corpus: str  # the ViT's training images, which the ranking job ranks


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PrunedArgs, args=argv)
    torch.set_num_threads(args.threads)
    setting = DATASETS[args.dataset]
    root = Path(args.root or f"runs/bench-pruned-{args.dataset}")
    data = _scenes(args, root) if args.dataset == "scenes" else _fashion_mnist(args, root)
    runtime.start(None, workers=1, worker_cpus=1.0)
    rankers = _rankers(args, setting, root, data.ranker_source, _mae(args, root, data.ranker_source))

    device = torch.device(args.device)
    data = replace(
        data, **{k: getattr(data, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
    )
    vit = _vit(args, root, data)
    num_patches = (setting.size // PATCH) ** 2
    selectors = {name: RankerScorer(model.to(device)) for name, model in rankers.items()}
    selectors |= {
        "random": efficiency.random_selector(num_patches, args.seed),
        "center": CenterScorer(PATCH),
        "variance": VarianceScorer(PATCH),
        "folk": FolkRComScorer(PATCH),
    }
    methods = [Method("full", "full")]
    methods += [Method(name, "top-k", s, keep) for name, s in selectors.items() for keep in args.keep_ratios]
    methods += [Method("tome", "tome", r=r) for r in setting.tome_r]
    speed = efficiency.throughputs(
        {m.label: partial(m, vit) for m in methods}, data.x_test, rounds=args.rounds
    )
    _progress(f"timed {len(methods)} methods")
    settings = FitSettings(args.fine_tune_epochs, args.batch_size, args.lr / 2, seed=args.seed)
    fine_tuned = {*rankers, *args.fine_tuned}
    rows = []
    for m in methods:
        row = {"label": m.label, "method": m.name, "kind": m.kind, "keep": m.keep, "r": m.r}
        row["images_per_s"] = speed[m.label]
        row["accuracy_off_the_shelf"] = efficiency.score(efficiency.outputs(vit, data.x_test, m), data.y_test)
        if m.kind == "top-k" and m.name in fine_tuned:
            tuned = efficiency.fine_tuned(vit, data.x_train, data.y_train, settings, m)
            row["accuracy_fine_tuned"] = efficiency.score(
                efficiency.outputs(tuned, data.x_test, m), data.y_test
            )
        rows.append(row)
        _progress(f"{m.label}: {_fmt(row, setting.measure)}")
    job_rate, kernel_rate = _ranking_job_rates(args, root, data.corpus, rankers, data.x_test.cpu())
    result = {
        "args": asdict(args),
        "dataset": args.dataset,
        "measure": setting.measure,
        "rows": rows,
        "rank_job": {"job_images_per_s": job_rate, "kernel_images_per_s": kernel_rate},
        "machine": _machine(args),
        "test_images": len(data.y_test),
    }
    table = _table(result)
    print(table)
    (root / "pruned.json").write_text(json.dumps(result, indent=2))
    (root / "pruned.md").write_text(table + "\n")
    _figure(result, root / "pruned.png")
    _log(result, root)
    return result


def _scenes(args: PrunedArgs, root: Path) -> Data:
    scenes = SceneConfig(seed=args.seed)
    corpus = write_scenes(root / "scenes-train", "train", args.train_images, scenes)
    test = write_scenes(root / "scenes-test", "test", args.test_images, scenes)
    ranker_source = write_scenes(root / "scenes-rankers", "train", args.ranker_images, scenes)
    train, test = (load_scene_set(str(m), DATASETS["scenes"].size, PATCH) for m in (corpus, test))
    return _data(train, test, ranker_source, corpus)


def _fashion_mnist(args: PrunedArgs, root: Path) -> Data:
    corpus = write_fashion_mnist(root / "fmnist-train", "train", args.train_images)
    test = write_fashion_mnist(root / "fmnist-test", "test", args.test_images)
    ranker_source = write_fashion_mnist(root / "fmnist-rankers", "train", args.ranker_images)
    size = DATASETS["fashion_mnist"].size
    train, classes, _ = load_labelled(str(corpus), size)
    test, _, _ = load_labelled(str(test), size, classes)
    return _data(train, test, ranker_source, corpus)


def _data(
    train: SceneSet | LabelledImages, test: SceneSet | LabelledImages, ranker_source: Path, corpus: Path
) -> Data:
    return Data(
        train.inputs(), torch.from_numpy(train.labels), test.inputs(), torch.from_numpy(test.labels),
        str(ranker_source), str(corpus),
    )  # fmt: skip


def _mae(args: PrunedArgs, root: Path, source: str) -> Path:
    """The MAE that scores the rankers' table: the shipped one for scenes; for Fashion-MNIST one
    pre-trained here on the rankers' images (the pipeline's settings for it), kept under --root."""
    if args.dataset == "scenes":
        return SHIPPED_MAE
    mae = root / f"mae-fmnist-{args.ranker_images}-{args.mae_epochs}ep-{args.seed}.pth"
    if not mae.exists():
        cfg = PretrainConfig(
            source=source, output=str(mae), name=mae.stem, storage=str(root.resolve() / "pretrain"),
            geometry="mae_vit_fmnist_patch4", epochs=args.mae_epochs, warmup_epochs=1, batch_size=128,
            lr=1e-3, threads=args.threads, seed=args.seed,
        )  # fmt: skip
        pretrain_job.run(cfg)
    return mae


def _machine(args: PrunedArgs) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(args.device))}, {torch.__version__}"
    return f"{os.cpu_count()} CPUs, torch threads {args.threads}"


def _progress(message: str) -> None:
    print(f"[pruned] {message}", flush=True)


def _rankers(
    args: PrunedArgs, setting: DatasetSetting, root: Path, source: str, mae: Path
) -> dict[str, Ranker]:
    """Each ranker size trained on one score table of the rankers' images."""
    cfg = ScoreConfig(
        source=source, mae=str(mae), output=str(root / "scores-train"), views=args.views, flip=True,
        mask_ratio=setting.mask_ratio, batch_size=64, seed=args.seed,
    )  # fmt: skip
    ScoreJob(cfg).write()
    rankers = {}
    for geometry in setting.rankers:
        train_cfg = TrainConfig(
            scores=cfg.output, name=geometry, storage=str(root.resolve() / "train"), ranker=geometry,
            epochs=args.ranker_epochs, warmup_epochs=0, batch_size=64, lr=1e-3, threads=args.threads,
            seed=args.seed,
        )  # fmt: skip
        result = train_job.fit(train_cfg, *train_job.check_inputs(train_cfg))
        checkpoint, _ = trainer.best_checkpoint(result)
        rankers[geometry] = train_job.load_ranker_checkpoint(checkpoint).eval()
        _progress(f"ranker {geometry}: {sum(p.numel() for p in rankers[geometry].parameters()):,} parameters")
    return rankers


def _vit(args: PrunedArgs, root: Path, data: Data) -> VisionTransformer:
    """The ViT trained on all tokens (reused from --root when its settings match)."""
    torch.manual_seed(args.seed)
    classes = data.y_train.shape[1] if data.y_train.dim() == 2 else int(data.y_train.max()) + 1
    model = VisionTransformer(
        img_size=DATASETS[args.dataset].size, patch_size=PATCH, num_classes=classes, embed_dim=args.width,
        depth=args.depth, num_heads=args.heads, global_pool="token",
    )  # fmt: skip
    model.to(data.x_train.device)
    path = root / f"vit-{args.width}x{args.depth}-{args.epochs}ep-{len(data.x_train)}-{args.seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True, map_location=data.x_train.device))
        return model.eval()
    fit = FitSettings(args.epochs, args.batch_size, args.lr, seed=args.seed)
    efficiency.fit(model, data.x_train, data.y_train, fit)
    torch.save(model.state_dict(), path)
    _progress(f"trained the ViT ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model.eval()


def _ranking_job_rates(
    args: PrunedArgs, root: Path, corpus: str, rankers: dict[str, Ranker], images: torch.Tensor
) -> tuple[float, float]:
    """The ranking job's images/s on the ViT's training images (decode, rank, commit, on Ray: the
    larger corpus, so that starting the actors weighs less) and the kernel's (the first ranker's forward
    on decoded tensors) on this machine."""
    name, ranker = next(iter(rankers.items()))
    ranker = ranker.cpu()  # the ranking job and its kernel rate: on this machine's CPUs
    checkpoint = root / f"{name}.state.pt"
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, checkpoint)
    out = root / f"ranks-{os.getpid()}"  # a fresh output: the job's full cost, nothing resumed
    job = RankJob(RankConfig(source=corpus, model=str(checkpoint), output=str(out), batch_size=256))
    summary = job.write(progress=lambda _: None)
    kernel = efficiency.throughputs({"kernel": partial(rank, ranker)}, images, rounds=args.rounds)
    return summary.images_per_second, kernel["kernel"]


def _fmt(row: dict, measure: str) -> str:
    tuned = f", fine-tuned {row['accuracy_fine_tuned']:.3f}" if "accuracy_fine_tuned" in row else ""
    return f"{row['images_per_s']:.0f} img/s, {measure} {row['accuracy_off_the_shelf']:.3f}{tuned}"


def _table(result: dict) -> str:
    rows, measure = result["rows"], result["measure"]
    full = next(r for r in rows if r["kind"] == "full")
    lines = [
        f"{measure} on {result['test_images']} held-out {result['dataset']} images (higher is better) "
        f"against throughput (images/s, selector included; {result['machine']}). Speed-up: against the "
        "full model in the same run.",
        "",
        f"| method | keep / r | images/s | speed-up | {measure} off the shelf | {measure} fine-tuned |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        setting = f"r={r['r']}" if r["kind"] == "tome" else f"{r['keep']:.0%}"
        tuned = f"{r['accuracy_fine_tuned']:.3f}" if "accuracy_fine_tuned" in r else "-"
        speed_up = r["images_per_s"] / full["images_per_s"]
        lines.append(
            f"| {r['method']} | {setting} | {r['images_per_s']:.0f} | {speed_up:.2f}x "
            f"| {r['accuracy_off_the_shelf']:.3f} | {tuned} |"
        )
    job, kernel = result["rank_job"]["job_images_per_s"], result["rank_job"]["kernel_images_per_s"]
    lines += [
        "",
        f"Ranking job (decode, rank, commit, on a local Ray): {job:.0f} images/s; the ranker kernel alone "
        f"on decoded tensors: {kernel:.0f} images/s; ratio {job / kernel:.2f}.",
    ]
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> None:
    rows, measure = result["rows"], result["measure"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    full = next(r for r in rows if r["kind"] == "full")
    names = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "full"))
    colours = dict(zip(names, plt.cm.tab10.colors, strict=False))
    for name in names:
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["images_per_s"])
        speed = [full["images_per_s"], *[r["images_per_s"] for r in mine]]
        ax.plot(speed, [full["accuracy_off_the_shelf"], *[r["accuracy_off_the_shelf"] for r in mine]], "o-",
                color=colours[name], label=f"{name}, off the shelf")  # fmt: skip
        tuned = [r for r in mine if "accuracy_fine_tuned" in r]
        if tuned:
            ax.plot([r["images_per_s"] for r in tuned], [r["accuracy_fine_tuned"] for r in tuned], "s--",
                    color=colours[name], label=f"{name}, fine-tuned")  # fmt: skip
    ax.plot([full["images_per_s"]], [full["accuracy_off_the_shelf"]], "k*", markersize=14, label="full model")
    ax.set_xlabel("images/s on this machine, selector included (higher is better)")
    ax.set_ylabel(f"{measure} on held-out {result['dataset']} images (higher is better)")
    ax.set_title(f"{result['dataset']}: accuracy against throughput, top-k patches and ToMe")
    save(fig, [ax], path, legend_columns=2)


def _log(result: dict, root: Path) -> None:
    runtime.track("ltrp-bench-pruned")
    with mlflow.start_run(run_name=f"pruned ViT vs ToMe, {result['dataset']}"):
        mlflow.log_params({k: str(v) for k, v in result["args"].items()})
        for r in result["rows"]:
            key = r["label"].replace("%", "pct").replace("=", "")  # MLflow's metric names
            mlflow.log_metrics(
                {f"{key}.{k}": v for k, v in r.items() if k.startswith(("images", "accuracy"))}
            )
        mlflow.log_metrics({f"rank_job.{k}": v for k, v in result["rank_job"].items()})
        for name in ("pruned.md", "pruned.png", "pruned.json"):
            mlflow.log_artifact(str(root / name))


if __name__ == "__main__":
    main()
