"""Benchmark: cheaper vision transformers on scenes. A timm ViT's mAP against its measured throughput on
this machine, when it runs on the top-k patches of LTRP rankers of two sizes (their forward counted in
the cost), random, the centre prior, patch variance and FOLK, or merges tokens with ToMe; off the shelf
(trained on all tokens) and fine-tuned on the kept tokens. Also the ranking job's images/s next to the
ranker kernel's on the same machine.

    python -m jobs.bench.pruned                                  # the full run (runs/bench-pruned/)
    python -m jobs.bench.pruned --train-scenes 300 --test-scenes 100 --epochs 1 --fine-tune-epochs 1

Self-contained and reusing what exists under --root: the scenes, a score table of the training scenes
(the shipped MAE, --views views each), the rankers trained on it, the ViT. Logs the table, the figure
and every figure's number to MLflow (experiment ltrp-bench-pruned).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import matplotlib
import mlflow
import torch
import tyro
from timm.models.vision_transformer import VisionTransformer

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ltrp.core.baselines import CenterScorer, FolkRComScorer, RankerScorer, VarianceScorer
from ltrp.core.ranker import Ranker, rank
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.evaluation import efficiency
from ltrp.evaluation.efficiency import FitSettings, Method
from ltrp.evaluation.scene_eval import load_scene_set
from ltrp.pipeline import rank_job, runtime, score_job, train_job
from ltrp.pipeline.configs import RankConfig, ScoreConfig, TrainConfig


@dataclass
class PrunedArgs:
    root: str = "runs/bench-pruned"  # everything goes here; what exists is reused
    train_scenes: int = 3000  # scenes that train the ViT (the first --ranker-scenes also train the rankers)
    ranker_scenes: int = 1500  # training scenes scored for the rankers
    test_scenes: int = 500  # held-out scenes: accuracy and throughput
    views: int = 4  # scored views per ranker training scene
    rankers: tuple[str, ...] = ("ltrp_vit_scenes_patch4", "ltrp_vit_scenes_tiny_patch4")
    ranker_epochs: int = 4
    width: int = 128  # the ViT: 56 px, 4-px patches (196 tokens), this width, depth and heads
    depth: int = 4
    heads: int = 2
    epochs: int = 10  # ViT training on all tokens
    fine_tune_epochs: int = 1  # fine-tuning on kept tokens, per selector and keep ratio
    keep_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    tome_r: tuple[int, ...] = (12, 24, 36, 48)  # ToMe tokens merged per block (196 tokens, depth 4)
    fine_tuned: tuple[str, ...] = (
        "ltrp_vit_scenes_patch4",
        "ltrp_vit_scenes_tiny_patch4",
        "random",
        "center",
    )
    batch_size: int = 128
    lr: float = 1e-3
    rounds: int = 3  # timing rounds (median)
    threads: int = 2  # torch threads for training and timing
    seed: int = 0


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PrunedArgs, args=argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    scenes = SceneConfig(seed=args.seed)
    train_manifest = write_scenes(root / "scenes-train", "train", args.train_scenes, scenes)
    test_manifest = write_scenes(root / "scenes-test", "test", args.test_scenes, scenes)
    runtime.start(None, workers=1, worker_cpus=1.0)
    rankers = _rankers(args, root, scenes)
    train = load_scene_set(str(train_manifest), 56, 4)
    test = load_scene_set(str(test_manifest), 56, 4)
    x_train, y_train = train.inputs(), torch.from_numpy(train.labels)
    x_test, y_test = test.inputs(), torch.from_numpy(test.labels)

    vit = _vit(args, root, x_train, y_train)
    selectors = {name: RankerScorer(model) for name, model in rankers.items()}
    selectors |= {
        "random": efficiency.random_selector(196, args.seed),
        "center": CenterScorer(4),
        "variance": VarianceScorer(4),
        "folk": FolkRComScorer(4),
    }
    methods = [Method("full", "full")]
    methods += [Method(name, "top-k", s, keep) for name, s in selectors.items() for keep in args.keep_ratios]
    methods += [Method("tome", "tome", r=r) for r in args.tome_r]
    speed = efficiency.throughputs({m.label: partial(m, vit) for m in methods}, x_test, rounds=args.rounds)
    _progress(f"timed {len(methods)} methods")
    settings = FitSettings(args.fine_tune_epochs, args.batch_size, args.lr / 2, seed=args.seed)
    rows = []
    for m in methods:
        row = {"label": m.label, "method": m.name, "kind": m.kind, "keep": m.keep, "r": m.r}
        row["images_per_s"] = speed[m.label]
        row["map_off_the_shelf"] = efficiency.score(efficiency.outputs(vit, x_test, m), y_test)
        if m.kind == "top-k" and m.name in args.fine_tuned:
            tuned = efficiency.fine_tuned(vit, x_train, y_train, settings, m)
            row["map_fine_tuned"] = efficiency.score(efficiency.outputs(tuned, x_test, m), y_test)
        rows.append(row)
        _progress(f"{m.label}: {_fmt(row)}")
    job_rate, kernel_rate = _ranking_job_rates(args, root, train_manifest, rankers, x_test)
    result = {
        "args": asdict(args),
        "rows": rows,
        "rank_job": {"job_images_per_s": job_rate, "kernel_images_per_s": kernel_rate},
        "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}, device cpu",
        "test_scenes": len(test.labels),
    }
    table = _table(result)
    print(table)
    (root / "pruned.json").write_text(json.dumps(result, indent=2))
    (root / "pruned.md").write_text(table + "\n")
    _figure(rows, root / "pruned.png")
    _log(result, root)
    return result


def _progress(message: str) -> None:
    print(f"[pruned] {message}", flush=True)


def _rankers(args: PrunedArgs, root: Path, scenes: SceneConfig) -> dict[str, Ranker]:
    """Each ranker size trained on one score table of the first --ranker-scenes training scenes."""
    manifest = write_scenes(root / "scenes-rankers", "train", args.ranker_scenes, scenes)
    cfg = ScoreConfig(
        source=str(manifest), mae=str(SHIPPED_MAE), output=str(root / "scores-train"), views=args.views,
        flip=True, batch_size=64, seed=args.seed,
    )  # fmt: skip
    score_job.score_corpus(cfg)
    rankers = {}
    for geometry in args.rankers:
        train_cfg = TrainConfig(
            scores=cfg.output, name=geometry, storage=str(root.resolve() / "train"), ranker=geometry,
            epochs=args.ranker_epochs, warmup_epochs=0, batch_size=64, lr=1e-3, threads=args.threads,
            seed=args.seed,
        )  # fmt: skip
        _, views = train_job.check_inputs(train_cfg)
        result = train_job.fit(train_cfg, views)
        rankers[geometry] = train_job.load_ranker_checkpoint(result.checkpoint).eval()
        _progress(f"ranker {geometry}: {sum(p.numel() for p in rankers[geometry].parameters()):,} parameters")
    return rankers


def _vit(args: PrunedArgs, root: Path, images: torch.Tensor, targets: torch.Tensor) -> VisionTransformer:
    """The ViT trained on all tokens (reused from --root when its settings match)."""
    torch.manual_seed(args.seed)
    model = VisionTransformer(
        img_size=56, patch_size=4, num_classes=targets.shape[1], embed_dim=args.width, depth=args.depth,
        num_heads=args.heads, global_pool="token",
    )  # fmt: skip
    key = f"vit-{args.width}x{args.depth}-{args.epochs}ep-{len(images)}-{args.seed}.pt"
    path = root / key
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    efficiency.fit(model, images, targets, FitSettings(args.epochs, args.batch_size, args.lr, seed=args.seed))
    torch.save(model.state_dict(), path)
    _progress(f"trained the ViT ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model.eval()


def _ranking_job_rates(
    args: PrunedArgs, root: Path, manifest: Path, rankers: dict[str, Ranker], images: torch.Tensor
) -> tuple[float, float]:
    """The ranking job's images/s on the ViT's training scenes (decode, rank, commit, on Ray: the
    larger corpus, so that starting the actors weighs less) and the kernel's (the first ranker's forward
    on decoded tensors) on this machine."""
    name = args.rankers[0]
    checkpoint = root / f"{name}.state.pt"
    torch.save({"model": rankers[name].state_dict(), "ranker_config": asdict(rankers[name].cfg)}, checkpoint)
    out = root / f"ranks-{os.getpid()}"  # a fresh output: the job's full cost, nothing resumed
    summary = rank_job.execute(
        rank_job.plan(
            RankConfig(source=str(manifest), model=str(checkpoint), output=str(out), batch_size=256)
        ),
        progress=lambda _: None,
    )
    kernel = efficiency.throughputs({"kernel": partial(rank, rankers[name])}, images, rounds=args.rounds)
    return summary.images_per_second, kernel["kernel"]


def _fmt(row: dict) -> str:
    tuned = f", fine-tuned {row['map_fine_tuned']:.3f}" if "map_fine_tuned" in row else ""
    return f"{row['images_per_s']:.0f} img/s, mAP {row['map_off_the_shelf']:.3f}{tuned}"


def _table(result: dict) -> str:
    rows = result["rows"]
    full = next(r for r in rows if r["kind"] == "full")
    lines = [
        f"mAP on {result['test_scenes']} held-out scenes (higher is better) against throughput (images/s, "
        f"selector included; {result['machine']}). Speed-up: against the full model in the same run.",
        "",
        "| method | keep / r | images/s | speed-up | mAP off the shelf | mAP fine-tuned |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        setting = f"r={r['r']}" if r["kind"] == "tome" else f"{r['keep']:.0%}"
        tuned = f"{r['map_fine_tuned']:.3f}" if "map_fine_tuned" in r else "-"
        lines.append(
            f"| {r['method']} | {setting} | {r['images_per_s']:.0f} "
            f"| {r['images_per_s'] / full['images_per_s']:.2f}x | {r['map_off_the_shelf']:.3f} | {tuned} |"
        )
    job, kernel = result["rank_job"]["job_images_per_s"], result["rank_job"]["kernel_images_per_s"]
    lines += [
        "",
        f"Ranking job (decode, rank, commit, on a local Ray): {job:.0f} images/s; the ranker kernel alone "
        f"on decoded tensors: {kernel:.0f} images/s; ratio {job / kernel:.2f}.",
    ]
    return "\n".join(lines)


def _figure(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    full = next(r for r in rows if r["kind"] == "full")
    names = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "full"))
    colours = dict(zip(names, plt.cm.tab10.colors, strict=False))
    for name in names:
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["images_per_s"])
        speed = [full["images_per_s"], *[r["images_per_s"] for r in mine]]
        ax.plot(speed, [full["map_off_the_shelf"], *[r["map_off_the_shelf"] for r in mine]], "o-",
                color=colours[name], label=f"{name}, off the shelf")  # fmt: skip
        tuned = [r for r in mine if "map_fine_tuned" in r]
        if tuned:
            ax.plot([r["images_per_s"] for r in tuned], [r["map_fine_tuned"] for r in tuned], "s--",
                    color=colours[name], label=f"{name}, fine-tuned")  # fmt: skip
    ax.plot([full["images_per_s"]], [full["map_off_the_shelf"]], "k*", markersize=14, label="full model")
    ax.set_xlabel("images/s on this machine, selector included (higher is better)")
    ax.set_ylabel("mAP on held-out scenes (higher is better)")
    ax.set_title("Accuracy against throughput: top-k patches (keep 25/50/75%) and ToMe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log(result: dict, root: Path) -> None:
    runtime.track("ltrp-bench-pruned")
    with mlflow.start_run(run_name="pruned ViT vs ToMe, scenes"):
        mlflow.log_params({k: str(v) for k, v in result["args"].items()})
        for r in result["rows"]:
            key = r["label"].replace("%", "pct").replace("=", "")  # MLflow's metric names
            mlflow.log_metrics({f"{key}.{k}": v for k, v in r.items() if k.startswith(("images", "map"))})
        mlflow.log_metrics({f"rank_job.{k}": v for k, v in result["rank_job"].items()})
        for name in ("pruned.md", "pruned.png", "pruned.json"):
            mlflow.log_artifact(str(root / name))


if __name__ == "__main__":
    main()
