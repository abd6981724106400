"""Experiment: how faithful are cheap pseudo-scores and the ranker to the full-coverage oracle, on scenes?

    python -m jobs.experiments.fidelity                             # the table of docs/fidelity.md
    python -m jobs.experiments.fidelity --train-scenes 200 --test-scenes 40 --views 1 4 --passes 4  # quick

On held-out scenes, per image, Kendall tau against the full-coverage oracle (`--cover` rounds of
disjoint visible sets: one score per position) of:
- one random draw's leave-one-out scores (what a single-view score table holds), at its n positions;
- the ranker trained on K views per training scene (K in --views), asymmetric and symmetric, at the
  same n positions and at all L positions (the ranker sees every patch, as at inference);
- the oracle against itself (first half of its rounds against the second): the ceiling.
Every ranker trains for the same number of steps (--passes views per training scene: epochs =
passes / K), so only the variety of views differs. Also prints the scoring cost per training image for
each K against the authors' 400 online draws (one fresh visible set per epoch for 400 epochs).
Means with 95% bootstrap intervals over test scenes. Runs the real jobs on a local Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import tyro

from ltrp.core.options import Training
from ltrp.core.ranker import rank
from ltrp.data.images import to_model_input
from ltrp.data.scenes import SHIPPED_MAE, SceneConfig, write_scenes
from ltrp.data.tables import read_job_metadata, read_scores
from ltrp.evaluation import fidelity
from ltrp.evaluation.protocol import interval
from ltrp.pipeline import runtime, train_job, trainer, training_data
from ltrp.pipeline.configs import ScoreConfig, TrainConfig
from ltrp.pipeline.score_job import ScoreJob

AUTHORS_DRAWS = 400  # the authors draw a fresh visible set every step, for 400 epochs


@dataclass
class FidelityArgs:
    root: str = "runs/fidelity"  # everything goes here; existing score tables and checkpoints are reused
    mae: str = str(SHIPPED_MAE)  # the MAE that scores (default: the shipped scenes MAE)
    train_scenes: int = 800  # training scenes (train split)
    test_scenes: int = 200  # held-out scenes (test split)
    views: tuple[int, ...] = (1, 2, 4, 8, 16)  # K values: views per training scene
    trainings: tuple[Training, ...] = ("asymmetric", "symmetric")
    passes: int = 16  # training views per scene, whatever K (epochs = passes / K): equal steps
    cover: int = 2  # rounds of the oracle (2: the split-half ceiling compares one round with the other)
    mask_ratio: float = 0.9  # 19 of 196 patches visible, the paper's
    ranker: str = "ltrp_vit_scenes_patch4"
    batch_size: int = 64
    lr: float = 1e-3
    threads: int = 2  # torch threads of the training worker
    resamples: int = 1000
    seed: int = 0


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(FidelityArgs, args=argv)
    root = Path(args.root)
    scenes = SceneConfig(seed=args.seed)
    train_manifest = write_scenes(root / "scenes-train", "train", args.train_scenes, scenes)
    test_manifest = write_scenes(root / "scenes-test", "test", args.test_scenes, scenes)
    runtime.start(None, workers=1, worker_cpus=1.0)

    def score(name: str, source: Path, **settings: object) -> tuple[str, float]:
        cfg = ScoreConfig(
            source=str(source), mae=args.mae, output=str(root / name), mask_ratio=args.mask_ratio,
            seed=args.seed, batch_size=64, **settings,
        )  # fmt: skip
        summary = ScoreJob(cfg).write()
        print(f"[fidelity] {name}: {summary.rows_written} rows in {summary.seconds:.0f} s", flush=True)
        return cfg.output, summary.seconds / max(summary.rows_written, 1)

    cover_uri, _ = score("scores-test-cover", test_manifest, cover=args.cover)
    draw_uri, _ = score("scores-test-draw", test_manifest)
    train_uri, seconds_per_view = score("scores-train", train_manifest, views=max(args.views), flip=True)

    cover = read_scores(cover_uri)
    ids = sorted(set(cover.column("image_id").to_pylist()))
    mae = read_job_metadata(cover_uri)["mae_config"]
    size, L, n = mae["img_size"], (mae["img_size"] // mae["patch_size"]) ** 2, len(cover.column("visible")[0])
    oracle = fidelity.oracle(cover, L, ids)
    half_a, half_b = fidelity.split_half_oracles(cover, L, ids, sets_per_round=-(-L // n))
    visible, draw = fidelity.draw_rows(read_scores(draw_uri), ids)
    images = _test_images(read_scores(draw_uri), ids, size)

    rows: dict[str, dict[str, np.ndarray]] = {
        "oracle, half vs half": {"all L": fidelity.tau(half_a, half_b)},
        "one random draw": {"n drawn": fidelity.tau(draw, fidelity.at_positions(oracle, visible))},
    }
    for training in args.trainings:
        for k in args.views:
            scores = rank(_train(args, train_uri, k, training), images).double().numpy()  # (B, L)
            rows[f"ranker {training}, K={k}"] = {
                "n drawn": fidelity.tau(
                    fidelity.at_positions(scores, visible), fidelity.at_positions(oracle, visible)
                ),
                "all L": fidelity.tau(scores, oracle),
            }
    results = {
        name: {col: asdict(interval(v, args.resamples, args.seed)) for col, v in cols.items()}
        for name, cols in rows.items()
    }
    cost = {k: k * seconds_per_view for k in args.views} | {AUTHORS_DRAWS: AUTHORS_DRAWS * seconds_per_view}
    print(_table(results, len(ids), n, L))
    print(_cost_table(cost, n))
    out = {"args": asdict(args), "tau": results, "seconds_per_image": cost, "test_images": len(ids)}
    (root / "fidelity.json").write_text(json.dumps(out, indent=2))
    return out


def _test_images(table: pa.Table, ids: list[str], size: int) -> torch.Tensor:
    """(B, 3, S, S) the held-out scenes as the ranker sees them: each one's view in the draw table (the
    whole scene: the centre crop of a square image, no flip), replayed as training replays views."""
    order = {i: k for k, i in enumerate(table.column("image_id").to_pylist())}
    pixels = training_data.load_views(table.take([order[i] for i in ids]), size)["image"]
    return to_model_input(pixels)


def _train(args: FidelityArgs, scores: str, k: int, training: Training):
    cfg = TrainConfig(
        scores=scores, name=f"k{k}-{training}", storage=str(Path(args.root).resolve() / "train"),
        ranker=args.ranker, training=training, views=k, epochs=max(1, args.passes // k), warmup_epochs=0,
        batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed,
    )  # fmt: skip
    start = time.perf_counter()
    result = train_job.fit(cfg, *train_job.check_inputs(cfg))
    checkpoint, best = trainer.best_checkpoint(result)
    metrics = {k: round(float(v), 4) for k, v in best.items() if k.startswith("val_")}
    print(f"[fidelity] trained {cfg.name} in {time.perf_counter() - start:.0f} s: {metrics}", flush=True)
    return train_job.load_ranker_checkpoint(checkpoint)


def _table(results: dict, images: int, n: int, L: int) -> str:
    lines = [
        f"Kendall tau with the full-coverage oracle, {images} held-out scenes (higher is better; mean "
        f"[95% CI]); 'n drawn': at one random draw's {n} positions, 'all L': at all {L}.",
        "| scores | n drawn | all L |",
        "|---|---|---|",
    ]
    for name, cols in results.items():
        cells = [cols.get(c) for c in ("n drawn", "all L")]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(e: dict | None) -> str:
    return "" if e is None else f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _cost_table(cost: dict[int, float], n: int) -> str:
    lines = [
        f"Scoring cost per training image (MAE passes: K x ({n} leave-one-out + 1 anchor) decoder runs; "
        "seconds: measured on this machine, from the K-view score job)",
        "| views | decoder passes | seconds |",
        "|---|---|---|",
    ]
    for k, seconds in cost.items():
        label = f"{k} (the authors' online draws)" if k == AUTHORS_DRAWS else str(k)
        lines.append(f"| {label} | {k * (n + 1)} | {seconds:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
