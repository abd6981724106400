"""Experiment: cheaper vision transformers. A timm ViT's accuracy against its measured throughput on this
machine, when it runs on the top-k patches of a tiny LTRP ranker (about a tenth of the ViT's parameters,
its forward counted in the cost), random, the centre prior, patch variance and FOLK, merges tokens with
ToMe, or merges among the ranker's top-k (prune, then merge); off the shelf (trained on all tokens) and
fine-tuned as each method runs it. The ViT starts from the MAE's encoder (--init mae, as MAE's
fine-tuning does) and trains on as many generated images as --train-images asks, its held-out score
recorded after every epoch, so the run shows whether it stopped improving. On scenes (multi-label mAP;
the shipped MAE, which also scores the ranker's table) and on Fashion-MNIST (top-1 accuracy; an MAE
pre-trained here). Also the ranking job's images/s next to the ranker kernel's on the same machine.
With --init mae, one more selector separates what LTRP's scores teach from what the labels taught the
ViT's features: a token scorer on the MAE encoder's first block (ltrp-mae-block), trained on the same
table and run ahead of the ViT. --fine-tune-seeds repeats every fine-tuning with more seeds and pairs
each method with each LTRP point at that point's throughput, seed by seed.

    python -m jobs.experiments.pruned                            # scenes (runs/bench-pruned-scenes/)
    python -m jobs.experiments.pruned --dataset fashion_mnist    # Fashion-MNIST
    python -m jobs.experiments.pruned --train-images 300 --test-images 100 --epochs 1 --fine-tune-epochs 1
    python -m jobs.experiments.pruned --keep-ratios 0.5 0.75 --tome-r 36 48 --fine-tune-seeds 3 \
        --fine-tuned ltrp-shared center variance folk tome   # the contested points, 3 seeds, paired

Self-contained and reusing what exists under --root: the images, the MAE, a score table of the ranker's
training images (--views views each), the ranker trained on it, the ViT. Logs the table, the figures
and every figure's number to MLflow (experiment ltrp-bench-pruned).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import torch
import tyro
from timm.models.vision_transformer import VisionTransformer

from jobs.experiments.figures import plt, save
from ltrp.core.baselines import CenterScorer, FolkRComScorer, RankerScorer, VarianceScorer
from ltrp.core.options import Background
from ltrp.core.pruned import FirstBlockSelector, TokenScorer, vit_from_mae
from ltrp.core.ranker import Ranker, rank
from ltrp.data.checkpoints import load_mae
from ltrp.data.datasets import write_fashion_mnist
from ltrp.data.images import to_model_input
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.data.tables import read_scores
from ltrp.evaluation import efficiency
from ltrp.evaluation.efficiency import FitSettings, Method
from ltrp.evaluation.objects import ImageObjects, object_recalls
from ltrp.evaluation.protocol import LabelledImages, format_interval, load_labelled, t_interval
from ltrp.evaluation.scene_eval import SceneSet, load_scene_set
from ltrp.pipeline import pretrain_job, runtime, train_job, trainer
from ltrp.pipeline.configs import PretrainConfig, RankConfig, ScoreConfig, TrainConfig
from ltrp.pipeline.rank_job import RankJob
from ltrp.pipeline.score_job import ScoreJob
from ltrp.pipeline.training_data import load_views, select_split

Dataset = Literal["scenes", "fashion_mnist"]


@dataclass(frozen=True)
class DatasetSetting:
    """What the experiment fixes per dataset: the input, the ranker, ToMe's r values."""

    size: int  # input side in pixels (4-px patches)
    ranker: str  # the ranker's geometry for that grid: about a tenth of the ViT's compute per image
    tome_r: tuple[int, ...]  # tokens merged per block, spanning the top-k methods' speeds at depth 4
    #: (keep, r): ToMe merging r tokens per block among the ranker's top `keep` (prune, then merge)
    prune_then_merge: tuple[tuple[float, int], ...]
    mask_ratio: float  # the scoring's, as the pipeline scores this dataset
    measure: str  # the accuracy's name


DATASETS: dict[str, DatasetSetting] = {
    "scenes": DatasetSetting(
        56, "ltrp_vit_scenes_tiny_patch4", (12, 24, 36, 48), ((0.75, 24), (0.5, 12)), 0.9, "mAP"
    ),
    "fashion_mnist": DatasetSetting(
        32, "ltrp_vit_fmnist_tiny_patch4", (4, 8, 12, 15), ((0.75, 6), (0.5, 4)), 0.75, "top-1"
    ),
}
PATCH = 4
VAL_FRACTION = 0.1  # the score table's images (by id) that validate the ranker and the token scorer
#: ltrp-mae-block (--init mae): a token scorer on the MAE encoder's first block, before any labels, run
#: ahead of the ViT: what LTRP's scores teach without the features the labels shaped
SELECTORS = ("ltrp", "ltrp-shared", "ltrp-mae-block", "random", "center", "variance", "folk")
LTRP = SELECTORS[:3]  # the selectors that learned LTRP's scores
BY_SEED = "accuracy_fine_tuned_by_seed"  # a row's fine-tuned accuracy with each seed (its mean: without)


@dataclass
class PrunedArgs:
    dataset: Dataset = "scenes"
    #: scenes: the background kinds of every split, drawn equally often (shapes and faint: edges mislead)
    backgrounds: tuple[Background, ...] = ("black", "texture", "clutter", "photo")
    root: str | None = None  # everything goes here, what exists is reused; None: runs/bench-pruned-DATASET
    #: the ViT: mae starts from the MAE's encoder, in its shape (MAE's fine-tuning); scratch: --width,
    #: --depth and --heads, randomly initialised
    init: Literal["mae", "scratch"] = "mae"
    #: --init mae: the MAE file whose encoder the ViT starts from, e.g. one pre-trained with
    #: `jobs.pretrain_mae --objective frequency` (FOLK); None: the MAE that scores the ranker's table
    backbone: str | None = None
    train_images: int = 20000  # images that train the ViT (the first --ranker-images also train the ranker)
    val_images: int = 1000  # more training-split images, never trained on: the ViT's score after each epoch
    ranker_images: int = 1500  # training images scored for the ranker
    test_images: int = 500  # held-out images: accuracy and throughput
    views: int = 4  # scored views per ranker training image
    ranker_epochs: int = 24  # at most: training stops when validation Kendall tau stops improving
    scorer_epochs: int = 10  # the shared first block's token scorer, on the same score table
    mae_epochs: int = 3  # Fashion-MNIST: pre-training of its MAE on the ranker's images
    width: int | None = None  # --init scratch: the ViT's width, depth and heads (None: 128, 4, 4)
    depth: int | None = None
    heads: int | None = None
    epochs: int = 8  # ViT training on all tokens
    fine_tune_epochs: int = 1  # fine-tuning as each method runs, per method and setting
    #: each fine-tuning repeated with seeds --seed, --seed + 1, ...: the mean, and paired intervals
    #: against the LTRP points at matched throughput
    fine_tune_seeds: int = 1
    keep_ratios: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    tome_r: tuple[int, ...] | None = None  # tokens ToMe merges per block (None: the dataset's)
    #: methods fine-tuned as they run, beside their off-the-shelf score: selectors (SELECTORS), tome,
    #: ltrp+tome, and full: the full model given the same extra training, the fair reference
    fine_tuned: tuple[str, ...] = (*SELECTORS, "tome", "ltrp+tome", "full")
    batch_size: int = 128
    lr: float | None = None  # the ViT's peak learning rate (None: 5e-4 from the MAE, 1e-3 from scratch)
    rounds: int = 3  # timing rounds (median)
    threads: int = 2  # torch threads for training and timing
    device: str = "cpu"  # where the ViT, the selectors and ToMe train and are timed (cuda: a GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        shape = {"--width": self.width, "--depth": self.depth, "--heads": self.heads}
        if self.dataset != "scenes" and self.backgrounds != PrunedArgs.backgrounds:
            raise ValueError(f"--backgrounds: scenes only, not {self.dataset}")
        if self.init == "scratch" and self.backbone is not None:
            raise ValueError("--backbone: a ViT with --init scratch starts from no MAE; use --init mae")
        if self.init == "mae" and any(v is not None for v in shape.values()):
            given = ", ".join(k for k, v in shape.items() if v is not None)
            raise ValueError(
                f"{given}: the ViT's shape is the MAE encoder's with --init mae; use --init scratch"
            )
        if self.fine_tune_seeds < 1:
            raise ValueError(f"--fine-tune-seeds: at least 1, not {self.fine_tune_seeds}")
        unknown = set(self.fine_tuned) - {*SELECTORS, "tome", "ltrp+tome", "full"}
        if unknown:
            raise ValueError(
                f"--fine-tuned: unknown method(s) {sorted(unknown)}; choose from {SELECTORS}, tome, "
                "ltrp+tome, full"
            )


@dataclass
class Data:
    """The experiment's images: model inputs (N, 3, S, S), targets (N,) classes or (N, C) multi-hot."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ranker_source: str  # the ranker's training images (scored, then learned from)
    corpus: str  # the ViT's training and validation images, which the ranking job ranks
    test_objects: list[ImageObjects] | None = None  # scenes: each test image's objects, per patch


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PrunedArgs, args=argv)
    torch.set_num_threads(args.threads)
    setting = DATASETS[args.dataset]
    root = Path(args.root or f"runs/bench-pruned-{args.dataset}")
    data = _scenes(args, root) if args.dataset == "scenes" else _fashion_mnist(args, root)
    runtime.start(None, workers=1, worker_cpus=1.0)
    mae = _mae(args, root, data.ranker_source)
    ranker, ranker_tau = _ranker(args, setting, root, data.ranker_source, mae)

    device = torch.device(args.device)
    data = replace(data, **{k: v.to(device) for k, v in vars(data).items() if isinstance(v, torch.Tensor)})
    backbone = Path(args.backbone) if args.backbone else mae
    vit, curve = _vit(args, root, data, backbone)
    scorer, scorer_tau = _token_scorer(args, setting, root, vit, "shared-block token scorer")
    num_patches = (setting.size // PATCH) ** 2
    selectors = {
        "ltrp": RankerScorer(ranker.to(device), rounds=0),  # one pass: the ranker trained on all L patches
        "random": efficiency.random_selector(num_patches, args.seed),
        "center": CenterScorer(PATCH),
        "variance": VarianceScorer(PATCH),
        "folk": FolkRComScorer(PATCH),
    }
    taus = {"ltrp": ranker_tau, "ltrp-shared": scorer_tau}
    if args.init == "mae":
        before = vit_from_mae(load_mae(str(backbone)), _classes(data)).to(device)  # the ViT before labels
        mae_scorer, taus["ltrp-mae-block"] = _token_scorer(args, setting, root, before, "MAE-block scorer")
        selectors["ltrp-mae-block"] = FirstBlockSelector(before, mae_scorer)
    methods = [Method("full", "full")]
    methods += [Method(name, "top-k", s, keep) for name, s in selectors.items() for keep in args.keep_ratios]
    methods += [Method("ltrp-shared", "shared", scorer, keep) for keep in args.keep_ratios]
    methods += [Method("tome", "tome", r=r) for r in args.tome_r or setting.tome_r]
    methods += [
        Method("ltrp+tome", "top-k+tome", selectors["ltrp"], keep, r) for keep, r in setting.prune_then_merge
    ]
    speed = efficiency.throughputs(
        {m.label: partial(m, vit) for m in methods}, data.x_test, rounds=args.rounds
    )
    _progress(f"timed {len(methods)} methods")
    settings = FitSettings(args.fine_tune_epochs, args.batch_size, _lr(args) / 2)
    seeds = range(args.seed, args.seed + args.fine_tune_seeds)
    rows = []
    for m in methods:
        row = {"label": m.label, "method": m.name, "kind": m.kind, "keep": m.keep, "r": m.r}
        row["images_per_s"] = speed[m.label]
        row["accuracy_off_the_shelf"] = efficiency.score(efficiency.outputs(vit, data.x_test, m), data.y_test)
        if data.test_objects and m.kind in ("top-k", "shared"):
            row["object_recall"] = object_recall(m, vit, data.x_test, data.test_objects)
        if m.name in args.fine_tuned:
            row[BY_SEED] = [_fine_tuned_score(data, vit, replace(settings, seed=seed), m) for seed in seeds]
            row["accuracy_fine_tuned"] = float(np.mean(row[BY_SEED]))
        rows.append(row)
        _progress(f"{m.label}: {_fmt(row, setting.measure)}")
    job_rate, kernel_rate = _ranking_job_rates(args, root, data.corpus, ranker, data.x_test.cpu())
    result = {
        "args": asdict(args),
        "dataset": args.dataset,
        "measure": setting.measure,
        "chance": efficiency.chance(data.y_test.cpu()),
        "vit": {"parameters": _parameters(vit), "val_curve": curve, "val_images": len(data.y_val)},
        "ranker": {
            "geometry": setting.ranker,
            "parameters": _parameters(ranker),
            "val_kendall_tau": ranker_tau,
        },
        "shared_scorer": {"parameters": _parameters(scorer), "val_kendall_tau": scorer_tau},
        "val_kendall_tau": taus,
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
    _curve_figure(result, root / "vit_curve.png")
    _log(result, root)
    return result


def _scenes(args: PrunedArgs, root: Path) -> Data:
    scenes = SceneConfig(backgrounds=Counter(args.backgrounds), seed=args.seed)
    corpus = write_scenes(root / "scenes-train", "train", args.train_images + args.val_images, scenes)
    test = write_scenes(root / "scenes-test", "test", args.test_images, scenes)
    ranker_source = write_scenes(root / "scenes-ranker", "train", args.ranker_images, scenes)
    train, test = (load_scene_set(str(m), DATASETS["scenes"].size, PATCH) for m in (corpus, test))
    return replace(_data(args, train, test, ranker_source, corpus), test_objects=test.objects)


def _fashion_mnist(args: PrunedArgs, root: Path) -> Data:
    corpus = write_fashion_mnist(root / "fmnist-train", "train", args.train_images + args.val_images)
    test = write_fashion_mnist(root / "fmnist-test", "test", args.test_images)
    ranker_source = write_fashion_mnist(root / "fmnist-ranker", "train", args.ranker_images)
    size = DATASETS["fashion_mnist"].size
    train, classes, _ = load_labelled(str(corpus), size)
    test, _, _ = load_labelled(str(test), size, classes)
    return _data(args, train, test, ranker_source, corpus)


def _data(
    args: PrunedArgs,
    train: SceneSet | LabelledImages,
    test: SceneSet | LabelledImages,
    ranker_source: Path,
    corpus: Path,
) -> Data:
    """The training images split at random (seeded) into --train-images and --val-images."""
    x, y = train.inputs(), torch.from_numpy(train.labels)
    if len(x) != args.train_images + args.val_images:
        raise ValueError(
            f"{corpus}: {len(x)} training images, --train-images + --val-images ask for "
            f"{args.train_images + args.val_images}"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    fit, val = order[: args.train_images], order[args.train_images :]
    return Data(
        x[fit], y[fit], x[val], y[val], test.inputs(), torch.from_numpy(test.labels), str(ranker_source),
        str(corpus),
    )  # fmt: skip


def _mae(args: PrunedArgs, root: Path, source: str) -> Path:
    """The MAE that scores the ranker's table and that the ViT starts from: the shipped one for scenes;
    for Fashion-MNIST one pre-trained here on the ranker's images (the pipeline's settings for it),
    kept under --root."""
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


def _ranker(
    args: PrunedArgs, setting: DatasetSetting, root: Path, source: str, mae: Path
) -> tuple[Ranker, float]:
    """The tiny ranker and its validation Kendall tau, trained on a score table of the ranker's images:
    on all L patches (symmetric), so that one pass over a whole image is what it learned, until
    validation Kendall tau stops improving (a ranker needs the training budget: docs/LTRP.md section 7)."""
    cfg = ScoreConfig(
        source=source, mae=str(mae), output=str(root / "scores-train"), views=args.views, flip=True,
        mask_ratio=setting.mask_ratio, batch_size=64, seed=args.seed,
    )  # fmt: skip
    ScoreJob(cfg).write()
    train_cfg = TrainConfig(
        scores=cfg.output, name=f"{setting.ranker}-{args.ranker_epochs}ep",
        storage=str(root.resolve() / "train"), ranker=setting.ranker, training="symmetric",
        epochs=args.ranker_epochs, warmup_epochs=1, validate_every=2, patience=3, batch_size=64, lr=1e-3,
        val_fraction=VAL_FRACTION, threads=args.threads, seed=args.seed,
    )  # fmt: skip
    result = train_job.fit(train_cfg, *train_job.check_inputs(train_cfg))
    checkpoint, metrics = trainer.best_checkpoint(result)
    ranker = train_job.load_ranker_checkpoint(checkpoint).eval()
    tau = metrics["val_kendall_tau"]
    _progress(
        f"ranker {setting.ranker}: {_parameters(ranker):,} parameters, validation Kendall tau {tau:.3f}"
    )
    return ranker, tau


def _token_scorer(
    args: PrunedArgs, setting: DatasetSetting, root: Path, vit: VisionTransformer, name: str
) -> tuple[TokenScorer, float]:
    """A token scorer on `vit`'s first block (the ViT's own: the ranker that shares it), trained on the
    ranker's score table (its training views; the ranker's validation views, by image id), and its
    validation Kendall tau."""
    table = read_scores(str(root / "scores-train"))
    device = next(vit.parameters()).device
    split = {}
    for part, validation in (("train", False), ("val", True)):
        views = load_views(select_split(table, VAL_FRACTION, validation, None), setting.size)
        split[part] = [
            to_model_input(views["image"]).to(device),
            *(torch.from_numpy(views[k]).to(device) for k in ("visible", "scores")),
        ]
    torch.manual_seed(args.seed)
    scorer = TokenScorer(vit.embed_dim).to(device)
    settings = FitSettings(args.scorer_epochs, args.batch_size, 1e-3, seed=args.seed)
    efficiency.fit_token_scorer(vit, scorer, *split["train"], settings)
    tau = efficiency.token_scorer_tau(vit, scorer, *split["val"])
    _progress(f"{name}: {_parameters(scorer):,} parameters, validation Kendall tau {tau:.3f}")
    return scorer, tau


def object_recall(
    method: Method, vit: VisionTransformer, images: torch.Tensor, objects: list[ImageObjects]
) -> float:
    """The share of the objects' pixels in the patches `method` keeps: per image over its objects, then
    the mean over images (why a selector helps or fails a classifier: does it keep what the labels name)."""
    keep = torch.cat([method.kept(vit, x) for x in images.split(256)]).cpu().numpy()
    return float(np.mean([np.nanmean(object_recalls(o, k)) for o, k in zip(objects, keep, strict=True)]))


def _fine_tuned_score(data: Data, vit: VisionTransformer, settings: FitSettings, method: Method) -> float:
    tuned = efficiency.fine_tuned(vit, data.x_train, data.y_train, settings, method)
    score = efficiency.score(efficiency.outputs(tuned, data.x_test, method), data.y_test)
    _progress(f"{method.label}: fine-tuned with seed {settings.seed}: {score:.3f}")
    return score


def _classes(data: Data) -> int:
    return data.y_train.shape[1] if data.y_train.dim() == 2 else int(data.y_train.max()) + 1


def _lr(args: PrunedArgs) -> float:
    return args.lr or (5e-4 if args.init == "mae" else 1e-3)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _vit(args: PrunedArgs, root: Path, data: Data, mae: Path) -> tuple[VisionTransformer, list[float]]:
    """The ViT trained on all tokens, and its validation score after each epoch (both reused from
    --root when the settings match)."""
    torch.manual_seed(args.seed)
    classes = _classes(data)
    if args.init == "mae":
        model, shape = vit_from_mae(load_mae(str(mae)), classes), Path(mae).stem
    else:
        width, depth, heads = args.width or 128, args.depth or 4, args.heads or 4
        model = VisionTransformer(
            img_size=DATASETS[args.dataset].size, patch_size=PATCH, num_classes=classes, embed_dim=width,
            depth=depth, num_heads=heads, global_pool="avg",
        )  # fmt: skip
        shape = f"{width}x{depth}x{heads}"
    model.to(data.x_train.device)
    name = f"vit-{args.init}-{shape}-{args.epochs}ep-{len(data.x_train)}-lr{_lr(args):g}-{args.seed}"
    weights, curve_file = root / f"{name}.pt", root / f"{name}.curve.json"
    if weights.exists() and curve_file.exists():
        model.load_state_dict(torch.load(weights, weights_only=True, map_location=data.x_train.device))
        return model.eval(), json.loads(curve_file.read_text())
    curve: list[float] = []

    def validate(epoch: int, model: VisionTransformer) -> None:
        curve.append(
            efficiency.score(efficiency.outputs(model, data.x_val, Method("full", "full")), data.y_val)
        )
        _progress(
            f"ViT epoch {epoch}/{args.epochs}: validation {DATASETS[args.dataset].measure} {curve[-1]:.3f}"
        )

    fit = FitSettings(args.epochs, args.batch_size, _lr(args), seed=args.seed)
    efficiency.fit(model, data.x_train, data.y_train, fit, after_epoch=validate)
    torch.save(model.state_dict(), weights)
    curve_file.write_text(json.dumps(curve))
    _progress(f"trained the ViT ({_parameters(model):,} parameters)")
    return model.eval(), curve


def _ranking_job_rates(
    args: PrunedArgs, root: Path, corpus: str, ranker: Ranker, images: torch.Tensor
) -> tuple[float, float]:
    """The ranking job's images/s on the ViT's training images (decode, rank, commit, on Ray: the
    larger corpus, so that starting the actors weighs less) and the kernel's (the ranker's forward on
    decoded tensors, in one pass) on this machine."""
    ranker = ranker.cpu()  # the ranking job and its kernel rate: on this machine's CPUs
    checkpoint = root / "ranker.state.pt"
    torch.save({"model": ranker.state_dict(), "ranker_config": asdict(ranker.cfg)}, checkpoint)
    out = root / f"ranks-{os.getpid()}"  # a fresh output: the job's full cost, nothing resumed
    job = RankJob(RankConfig(source=corpus, model=str(checkpoint), output=str(out), batch_size=256, rounds=0))
    summary = job.write(progress=lambda _: None)
    kernel = efficiency.throughputs({"kernel": partial(rank, ranker, rounds=0)}, images, rounds=args.rounds)
    return summary.images_per_second, kernel["kernel"]


def _fmt(row: dict, measure: str) -> str:
    tuned = f", fine-tuned {row['accuracy_fine_tuned']:.3f}" if "accuracy_fine_tuned" in row else ""
    return f"{row['images_per_s']:.0f} img/s, {measure} {row['accuracy_off_the_shelf']:.3f}{tuned}"


def _table(result: dict) -> str:
    rows, measure, vit = result["rows"], result["measure"], result["vit"]
    full = next(r for r in rows if r["kind"] == "full")
    curve = ", ".join(f"{v:.3f}" for v in vit["val_curve"])
    ranker = result["ranker"]
    recall = any("object_recall" in r for r in rows)  # scenes: their objects' masks are known
    lines = [
        f"{measure} on {result['test_images']} held-out {result['dataset']} images (higher is better; chance "
        f"{result['chance']:.3f}) against throughput (images/s, selector included; {result['machine']}). "
        "Speed-up: against the full model in the same run.",
        "",
        f"The ViT ({vit['parameters']:,} parameters, init {result['args']['init']}): {measure} "
        f"{full['accuracy_off_the_shelf']:.3f} on all tokens; on {vit['val_images']} validation images after "
        f"each epoch: {curve}. The ranker ({ranker['geometry']}, {ranker['parameters']:,} parameters) ranks "
        f"in one pass; validation Kendall tau {ranker['val_kendall_tau']:.3f}. The token scorer on the "
        f"ViT's first block (ltrp-shared, {result['shared_scorer']['parameters']:,} parameters): validation "
        f"Kendall tau {result['shared_scorer']['val_kendall_tau']:.3f}." + _mae_block_sentence(result),
        "",
        f"| method | keep / r | images/s | speed-up | {measure} off the shelf | {measure} fine-tuned |"
        + (" object recall |" if recall else ""),
        "|---|---|---|---|---|---|" + ("---|" if recall else ""),
    ]
    for r in rows:
        setting = {"tome": f"r={r['r']}", "top-k+tome": f"{r['keep']:.0%}, r={r['r']}"}.get(
            r["kind"], f"{r['keep']:.0%}"
        )
        tuned = f"{r['accuracy_fine_tuned']:.3f}" if "accuracy_fine_tuned" in r else "-"
        speed_up = r["images_per_s"] / full["images_per_s"]
        lines.append(
            f"| {r['method']} | {setting} | {r['images_per_s']:.0f} | {speed_up:.2f}x "
            f"| {r['accuracy_off_the_shelf']:.3f} | {tuned} |"
            + (f" {_fmt_or_dash(r.get('object_recall'))} |" if recall else "")
        )
    job, kernel = result["rank_job"]["job_images_per_s"], result["rank_job"]["kernel_images_per_s"]
    lines += [
        "",
        f"Ranking job (decode, rank, commit, on a local Ray): {job:.0f} images/s; the ranker kernel alone "
        f"on decoded tensors: {kernel:.0f} images/s; ratio {job / kernel:.2f}.",
        "",
        *_matched_table(result),
        *_paired_table(result, "throughput"),
        *_paired_table(result, "keep"),
    ]
    return "\n".join(lines)


def _mae_block_sentence(result: dict) -> str:
    tau = result.get("val_kendall_tau", {}).get("ltrp-mae-block")
    if tau is None:
        return ""
    return (
        " The token scorer on the MAE encoder's first block, before the ViT learned the labels, run ahead "
        f"of the ViT (ltrp-mae-block): validation Kendall tau {tau:.3f}."
    )


def _matched_table(result: dict) -> list[str]:
    """Every method against each LTRP point at the same throughput: its best accuracy (fine-tuned where
    it was) interpolated in log images/s between its two measured points around that speed."""
    rows, measure = result["rows"], result["measure"]
    full = next(r for r in rows if r["kind"] == "full")
    names = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "full"))
    curves = {name: _curve(rows, name, full) for name in names}
    lines = [
        f"At matched throughput: each method's {measure} (fine-tuned where it was) at the images/s of an "
        "LTRP point, interpolated in log images/s between its two measured points around that speed, the "
        "full model counting as every method's slowest point; - where the method was not measured that "
        "fast or that slow.",
        "",
        f"| LTRP point | images/s | its {measure} | {' | '.join(names)} |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        if r["method"] not in LTRP:
            continue
        speed, own = r["images_per_s"], _best(r)
        cells = [_fmt_or_dash(_at_speed(curves[name], speed)) for name in names]
        lines.append(f"| {r['method']} {r['keep']:.0%} | {speed:.0f} | {own:.3f} | {' | '.join(cells)} |")
    return lines


def _paired_table(result: dict, matched: Literal["throughput", "keep"]) -> list[str]:
    """With several fine-tuning seeds: each seeded method less each seeded LTRP point, seed by seed, at
    that point's throughput (interpolated as `_matched_table` does) or at its keep ratio, as the mean and
    its 95% t-interval over seeds; above 0, the method beat that LTRP point."""
    rows = result["rows"]
    seeded = [r for r in rows if len(r.get(BY_SEED, ())) > 1]
    if not seeded:
        return []
    names = list(dict.fromkeys(r["method"] for r in seeded))
    where = {"throughput": "at its throughput", "keep": "at its keep ratio, the same number of tokens"}
    lines = [
        "",
        f"Paired over {len(seeded[0][BY_SEED])} fine-tuning seeds, {where[matched]}: each method's "
        f"fine-tuned {result['measure']} less the LTRP point's, seed by seed (mean [95% t-interval]; above "
        "0: the method beats the LTRP point).",
        "",
        f"| LTRP point | images/s | its {result['measure']} | {' | '.join(names)} |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for point in (r for r in seeded if r["method"] in LTRP):
        own = point[BY_SEED]
        cells = []
        for name in names:
            theirs = None if name == point["method"] else _seeded_at(rows, name, point, matched)
            gaps = None if theirs is None else [t - o for t, o in zip(theirs, own, strict=True)]
            cells.append("-" if gaps is None else format_interval(t_interval(gaps), "+"))
        lines.append(
            f"| {point['method']} {point['keep']:.0%} | {point['images_per_s']:.0f} | "
            f"{format_interval(t_interval(own))} | {' | '.join(cells)} |"
        )
    return lines


def _seeded_at(
    rows: list[dict], name: str, point: dict, matched: Literal["throughput", "keep"]
) -> list[float] | None:
    """Method `name`'s fine-tuned accuracy with each seed at `point`'s throughput or keep ratio; None
    where it was not measured there. The full model is every point's reference, at any speed."""
    full = next(r for r in rows if r["kind"] == "full")
    if name == "full":
        return full[BY_SEED]
    if matched == "keep":
        row = next((r for r in rows if r["method"] == name and r["kind"] in ("top-k", "shared")
                    and r["keep"] == point["keep"]), None)  # fmt: skip
        return None if row is None else row[BY_SEED]
    seeds = range(len(point[BY_SEED]))
    at = [_at_speed(_curve(rows, name, full, seed), point["images_per_s"]) for seed in seeds]
    return None if None in at else at


def _best(row: dict, seed: int | None = None) -> float:
    """The row's accuracy: fine-tuned where it was (with `seed`'s fine-tuning, or their mean)."""
    if seed is not None and BY_SEED in row:
        return row[BY_SEED][seed]
    return row.get("accuracy_fine_tuned", row["accuracy_off_the_shelf"])


def _curve(rows: list[dict], name: str, full: dict, seed: int | None = None) -> list[tuple[float, float]]:
    """(images/s, accuracy) of a method's points and the full model's, by speed."""
    return sorted(
        [(full["images_per_s"], _best(full, seed))]
        + [(r["images_per_s"], _best(r, seed)) for r in rows if r["method"] == name]
    )


def _at_speed(curve: list[tuple[float, float]], speed: float) -> float | None:
    for (s0, a0), (s1, a1) in itertools.pairwise(curve):
        if s0 <= speed <= s1:
            return a0 + (a1 - a0) * (math.log(speed / s0) / math.log(s1 / s0) if s1 > s0 else 0.0)
    return None


def _fmt_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _figure(result: dict, path: Path) -> None:
    """Each method's accuracy against its throughput: off the shelf (solid) and fine-tuned (dashed)."""
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
    if "accuracy_fine_tuned" in full:
        ax.plot([full["images_per_s"]], [full["accuracy_fine_tuned"]], "k*", markersize=14, fillstyle="none",
                label="full model, fine-tuned as the others")  # fmt: skip
    ax.axhline(result["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("images/s on this machine, selector included (higher is better)")
    ax.set_ylabel(f"{measure} on held-out {result['dataset']} images (higher is better)")
    ax.set_title(f"{result['dataset']}: accuracy against throughput, top-k patches and ToMe")
    save(fig, [ax], path, legend_columns=2)


def _curve_figure(result: dict, path: Path) -> None:
    """The ViT's validation score after each epoch of training on all tokens, against chance."""
    curve, measure = result["vit"]["val_curve"], result["measure"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(curve) + 1), curve, "o-", label=f"validation {measure}")
    ax.axhline(result["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xlabel(f"epoch ({result['args']['train_images']:,} training images each)")
    ax.set_ylabel(f"{measure} on {result['vit']['val_images']:,} validation images")
    ax.set_title(f"{result['dataset']}: the ViT on all tokens, init {result['args']['init']}")
    save(fig, [ax], path)


def _log(result: dict, root: Path) -> None:
    runtime.track("ltrp-bench-pruned")
    with mlflow.start_run(run_name=f"pruned ViT vs ToMe, {result['dataset']}"):
        mlflow.log_params({k: str(v) for k, v in result["args"].items()})
        for r in result["rows"]:
            key = r["label"].replace("%", "pct").replace("=", "").replace("+", "and")  # MLflow's metric names
            mlflow.log_metrics(
                {f"{key}.{k}": r[k] for k in r if k.startswith(("images", "accuracy")) and k != BY_SEED}
            )
        mlflow.log_metrics(
            {f"rank_job.{k}": v for k, v in result["rank_job"].items()} | {"chance": result["chance"]}
        )
        for epoch, value in enumerate(result["vit"]["val_curve"], start=1):
            mlflow.log_metric("vit.val_score", value, step=epoch)
        for name in ("pruned.md", "pruned.png", "vit_curve.png", "pruned.json"):
            mlflow.log_artifact(str(root / name))


if __name__ == "__main__":
    main()
