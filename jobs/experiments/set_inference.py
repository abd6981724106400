"""Experiment: a ranker that learned to order sets of n patches, ranking whole images in such sets.

    python -m jobs.experiments.set_inference --model models:/ltrp-scenes-benchmark/4 \\
        --test runs/benchmark/data/test/manifest.parquet
    # a checkpoint saved before rankers recorded their set size: --set-size 19 (the table's n)

The ranker (asymmetric training, the authors') learns from sets of n scored patches, seeing CLS and
those n only; the paper then ranks seeing all L patches at once. `ltrp.core.ranker.rank` can instead
rank as it learned: R random partitions of the L positions into sets of n, each set's scores
standardised, averaged per position. For each R of --rounds (0 is the one pass), on held-out scenes
with object masks: object recall at 25% keep (pooled, with its 95% bootstrap interval, and per
background kind), its paired difference from the one pass, and the wall time of ranking the scenes
relative to the one pass (measured in turn in this process: a ratio, not a throughput).

Prints a table; writes OUTPUT/set_inference.json and OUTPUT/set_inference.png (recall against rounds).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

from ltrp.core.ranker import keep_top, rank
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES
from ltrp.evaluation.objects import measure
from ltrp.evaluation.protocol import interval
from ltrp.evaluation.scene_eval import PRIMARY_RATIO, kind_order, load_scene_set
from ltrp.pipeline.registry import load_ranker_ref

RESAMPLES = 1000  # bootstrap resamples of each interval


@dataclass
class SetInferenceConfig:
    """Object recall and cost of ranking in sets of n, against the rounds averaged."""

    model: str  # the ranker: models:/NAME/VERSION, models:/NAME@ALIAS, or a training checkpoint (state.pt)
    test: str  # held-out scene manifest with object masks (e.g. runs/benchmark/data/test/manifest.parquet)
    rounds: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # rounds measured; 0: one pass seeing every patch
    set_size: int | None = None  # n, for a ranker saved before rankers recorded it (None: its own)
    batch_size: int = 64  # scenes ranked at a time
    seed: int = 0  # seed of the bootstrap
    threads: int = 2  # torch threads
    output: str = "runs/bench/set-inference"  # folder of set_inference.json and set_inference.png


def main(argv: list[str] | None = None) -> dict:
    prog = "python -m jobs.experiments.set_inference"
    cfg = tyro.cli(SetInferenceConfig, args=argv, prog=prog, description=__doc__)
    torch.set_num_threads(cfg.threads)
    model, _ = load_ranker_ref(cfg.model)
    if cfg.set_size is not None:
        model = _with_set_size(model, cfg.set_size)
    if model.cfg.set_size is None:
        raise SystemExit(f"--model {cfg.model}: no set size recorded (trained symmetric?); give --set-size")
    test = load_scene_set(cfg.test, model.cfg.img_size, model.cfg.patch_size)
    if test.objects is None:
        raise SystemExit(f"--test {cfg.test}: no object masks in the manifest")
    images, kinds = test.inputs(), np.asarray(test.backgrounds)

    recalls, seconds = {}, {}
    for rounds in sorted(set(cfg.rounds) | {0}):  # the one pass is every difference's reference
        started = time.perf_counter()
        scores = torch.cat([rank(model, b, rounds) for b in images.split(cfg.batch_size)])
        seconds[rounds] = time.perf_counter() - started
        keep = keep_top(scores, PRIMARY_RATIO).numpy()
        recalls[rounds] = measure(test.objects, keep, SEEN_CLASSES, UNSEEN_CLASSES).recall
        print(f"[set_inference] rounds {rounds}: {np.nanmean(recalls[rounds]):.3f}", flush=True)

    result = {
        "args": asdict(cfg), "set_size": model.cfg.set_size, "patches": model.cfg.num_patches,
        "scenes": len(images), "kinds": {k: int((kinds == k).sum()) for k in kind_order(kinds)},
        "rounds": [_measures(recalls, r, seconds, kinds, cfg.seed) for r in recalls],
    }  # fmt: skip
    from jobs.experiments.figures import write_result

    write_result(result, cfg.output, "set_inference", plot)
    print(table(result))
    return result


def _with_set_size(model: torch.nn.Module, set_size: int) -> torch.nn.Module:
    """The same weights, recorded as a ranker that learned from sets of `set_size`."""
    copy = type(model)(replace(model.cfg, set_size=set_size))
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def _measures(recalls: dict, rounds: int, seconds: dict, kinds: np.ndarray, seed: int) -> dict:
    """One row: recall pooled [95% CI] and per kind, minus the one pass (paired), relative time."""
    ours, ok = recalls[rounds], ~np.isnan(recalls[rounds])
    return {
        "rounds": rounds,
        "recall": asdict(interval(ours[ok], RESAMPLES, seed)),
        "minus_one_pass": asdict(interval((ours - recalls[0])[ok], RESAMPLES, seed)),
        "kinds": {k: float(np.nanmean(ours[kinds == k])) for k in kind_order(kinds)},
        "time_vs_one_pass": seconds[rounds] / seconds[0],
    }


def table(result: dict) -> str:
    kinds = list(result["kinds"])
    lines = [
        f"Object recall at 25% keep on {result['scenes']} held-out scenes, ranking in sets of "
        f"{result['set_size']} of {result['patches']} patches (rounds 0: one pass seeing every patch)",
        "| rounds | recall [95% CI] | minus one pass (paired) [95% CI] | "
        + " | ".join(kinds)
        + " | time / one pass |",
        "|---" * (len(kinds) + 4) + "|",
    ]
    for row in result["rounds"]:
        cells = " | ".join(f"{row['kinds'][k]:.3f}" for k in kinds)
        lines.append(
            f"| {row['rounds']} | {_estimate(row['recall'])} | {_estimate(row['minus_one_pass'])} | "
            f"{cells} | {row['time_vs_one_pass']:.1f}x |"
        )
    return "\n".join(lines)


def _estimate(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def plot(result: dict, path: Path) -> None:
    """Pooled recall (95% interval) and each kind's against the rounds; the one pass at rounds 0."""
    from jobs.experiments.figures import plt, save

    fig, ax = plt.subplots(figsize=(7, 4.8))
    rows = result["rounds"]
    x = [r["rounds"] for r in rows]
    pooled = [r["recall"] for r in rows]
    error = [[p["mean"] - p["lo"] for p in pooled], [p["hi"] - p["mean"] for p in pooled]]
    ax.errorbar(x, [p["mean"] for p in pooled], yerr=error, fmt="o-", color="k", capsize=3, label="pooled")
    for kind, colour in zip(result["kinds"], plt.cm.tab10.colors, strict=False):
        ax.plot(x, [r["kinds"][kind] for r in rows], ".--", color=colour, lw=1, label=kind)
    ax.set_xscale("symlog", linthresh=1)
    ax.set(
        xlabel="rounds of sets averaged (0: one pass seeing every patch)",
        ylabel="object recall at 25% keep (higher is better)",
        title=f"{result['scenes']} held-out scenes, sets of {result['set_size']}",
    )
    save(fig, (ax,), path)


if __name__ == "__main__":
    main()
