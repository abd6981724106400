"""Experiment: which judge MAE teaches best? The full-coverage oracle's object recall, for each candidate.

    python -m jobs.experiments.judge --test runs/benchmark/data/test/manifest.parquet \\
        --maes ltrp/data/weights/mae_vit_scenes_patch4.pth runs/judge/pt/mix-a runs/judge/pt/mix-b
    # a quick look: --scenes 60 --rounds 2; names for the table: --labels shipped mix-a mix-b

A judge MAE is what the ranker learns from: its leave-one-out scores are the ranker's targets, and the
ranker can at best come close to the oracle built from them. So a judge is chosen by how well its oracle
keeps the objects of held-out scenes, never by its reconstruction loss: the loss does not track oracle
quality (a training mix moved the oracle by ~0.07 while the loss moved the other way; docs/LTRP.md,
section 7).

A candidate is an MAE checkpoint file (`ltrp.load_mae`), or a pre-training run folder STORAGE/NAME of
`python -m jobs.pretrain_mae` whose every `checkpoint_*/state.pt` is a candidate labelled by the epochs it
had trained: one pre-training run gives a curve of judge quality against epochs. All candidates must
share one image size and patch grid (object recall on another grid is another measure).

For each candidate, in this process (no Ray): the R-round oracle of every held-out scene, exactly what
`python -m jobs.score --cover R` with the same --seed and --mask-ratio writes (the same cover sets, the
same leave-one-out scores of the central square, the same reader `fidelity.oracle`); its object recall at
25% keep, pooled and per background kind, with 95% bootstrap intervals; its split-half reliability
(Kendall tau between the oracles of the first and second half of the rounds, and its Spearman-Brown
prediction at all of them); the final pre-training loss when the checkpoint records one; and the oracle
minus patch variance per kind, paired per scene. Reference lines, once: variance, gradient, FOLK's RCom,
centre prior and random.

Prints a progress line per candidate and the tables; writes OUTPUT/judge.json and OUTPUT/judge.png
(left: pooled oracle recall against epochs per pre-training run; right: recall per kind for each file
candidate and each run's last and best epoch); with --tracking, logs them to MLflow (experiment
ltrp-bench; a run's candidates as metric steps, their epochs).

The ablation of issue 28 (the training mix, two seeds each, a curve against epochs):

    python -m jobs.scenes --output runs/judge/scenes-a --split train --count 6000 \\
        --backgrounds black texture clutter shapes faint
    python -m jobs.scenes --output runs/judge/scenes-b --split train --count 6000 \\
        --backgrounds black texture clutter shapes faint photo
    python -m jobs.pretrain_mae --source runs/judge/scenes-a/manifest.parquet \\
        --output runs/judge/mix-a-s0.pth --storage runs/judge/pt --name mix-a-s0 \\
        --geometry mae_vit_scenes_patch4 --epochs 8 --batch-size 128 --lr 1.5e-3 --flip --seed 0 \\
        --keep-checkpoints 8  # every epoch's checkpoint, for the curve
    # ... the same with --seed 1 --name mix-a-s1, and with scenes-b as mix-b-s0 and mix-b-s1
    python -m jobs.experiments.judge --test runs/benchmark/data/test/manifest.parquet \\
        --maes ltrp/data/weights/mae_vit_scenes_patch4.pth runs/judge/pt/mix-a-s0 runs/judge/pt/mix-a-s1 \\
        runs/judge/pt/mix-b-s0 runs/judge/pt/mix-b-s1 --rounds 8 --tracking
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pyarrow as pa
import ray.train
import torch
import tyro

from ltrp.core.leave_one_out import loo_scores
from ltrp.core.mae import MAE
from ltrp.core.masking import cover_sets, visible_count
from ltrp.core.ranker import keep_top
from ltrp.data.checkpoints import load_mae
from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES
from ltrp.data.tables import SCORES_SCHEMA, arrow_filesystem
from ltrp.evaluation import fidelity
from ltrp.evaluation.measures import metric_key
from ltrp.evaluation.objects import measure
from ltrp.evaluation.protocol import baseline_scorers, interval, score_all
from ltrp.evaluation.scene_eval import (
    POOLED,
    PRIMARY_RATIO,
    SceneSet,
    kind_order,
    load_scene_set,
    paired_by_kind,
    split_half_reliability,
)
from ltrp.pipeline import runtime
from ltrp.pipeline.pretrain_job import load_pretrained
from ltrp.pipeline.training_loop import STATE_FILE

EXPERIMENT = "ltrp-bench"
RESAMPLES = 1000  # bootstrap resamples of each interval
#: The reference selectors, in report order: the edge baselines the oracle must beat first.
REFERENCES = ("variance", "gradient", "folk_rcom", "center", "random")
RECALL = metric_key("object_recall", PRIMARY_RATIO)


@dataclass
class JudgeConfig:
    """The full-coverage oracle's object recall on held-out scenes, for each candidate judge MAE."""

    test: str  # held-out scene manifest with object masks (e.g. runs/benchmark/data/test/manifest.parquet)
    maes: tuple[str, ...]  # candidates: MAE checkpoint files, or pre-training run folders STORAGE/NAME
    labels: tuple[str, ...] = ()  # a name per --maes entry (default: the file's stem, the run's folder)
    rounds: int = 8  # rounds of the oracle's cover (jobs.score --cover)
    mask_ratio: float = 0.9  # fraction of patches hidden from the MAE (jobs.score --mask-ratio)
    scenes: int | None = None  # only the manifest's first N scenes (None: all)
    seed: int = 0  # seed of the cover sets (jobs.score --seed), the random reference and the bootstrap
    threads: int = 2  # torch threads
    batch_size: int = 256  # visible sets per leave-one-out call (loo_scores chunks them to bound memory)
    output: str = "runs/bench/judge"  # folder of judge.json and judge.png
    tracking: bool = False  # log params, metrics and the files to MLflow (experiment ltrp-bench)


@dataclass(frozen=True)
class Candidate:
    """One judge to measure: an MAE file, or one checkpoint of a pre-training run."""

    label: str  # the --maes entry's label: a run's checkpoints share it
    uri: str  # the MAE file, or the checkpoint folder
    run: str | None  # the pre-training run folder, None for a file


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(JudgeConfig, args=argv, prog="python -m jobs.experiments.judge", description=__doc__)
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    candidates = list_candidates(cfg.maes, cfg.labels)
    result = {"args": asdict(cfg), "device": str(device), "candidates": []}
    test: SceneSet | None = None
    with mlflow_run(cfg):
        for candidate in candidates:
            mae, epoch, final_loss = load_candidate(candidate)
            if test is None:  # the first candidate fixes the geometry that the scenes and references use
                test = load_test(cfg, mae)
                recalls = reference_recalls(test, mae.cfg.patch_size, cfg.seed)
                result |= setup(cfg, test, mae, recalls)
                log_references(cfg, result["references"])
            elif (mae.cfg.img_size, mae.cfg.patch_size) != (result["img_size"], result["patch_size"]):
                raise SystemExit(
                    f"--maes {candidate.uri}: {mae.cfg.img_size} px in {mae.cfg.patch_size}-px patches, not "
                    f"the {result['img_size']} px in {result['patch_size']}-px patches of the first candidate"
                )
            measured = measure_candidate(cfg, mae.to(device), test, recalls["variance"])
            entry = asdict(candidate) | {"epoch": epoch, "final_loss": final_loss} | measured
            result["candidates"].append(entry)
            print(f"[judge] {_describe(entry)}", flush=True)
            log_candidate(cfg, entry)
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "judge.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "judge.png")
        if cfg.tracking:
            for name in ("judge.json", "judge.png"):
                mlflow.log_artifact(str(out / name))
    print(tables(result))
    return result


# -- candidates ---------------------------------------------------------------------------------------
def list_candidates(maes: tuple[str, ...], labels: tuple[str, ...]) -> list[Candidate]:
    """The candidates of the --maes entries, in order: a file is one; a pre-training run folder gives
    one per checkpoint, in the order they were written (Ray Train names them by time or number).

    Raises:
        SystemExit: no entry, labels that are not one per entry, or labels that repeat (MLflow's metrics
            and the figure's lines are named by them).
    """
    if not maes:
        raise SystemExit("--maes: name at least one candidate")
    if labels and len(labels) != len(maes):
        raise SystemExit(f"--labels: {len(labels)} names for {len(maes)} --maes entries")
    names = labels or tuple(_default_label(uri) for uri in maes)
    if len(set(names)) < len(names):
        raise SystemExit(f"candidate labels repeat ({', '.join(names)}): name them with --labels")
    out = []
    for uri, label in zip(maes, names, strict=True):
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            out += [Candidate(label, folder, uri) for folder in run_checkpoints(uri)]
        else:
            out.append(Candidate(label, uri, None))
    return out


def _default_label(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    return name.rsplit(".", 1)[0] if "." in name else name


def run_checkpoints(folder: str) -> list[str]:
    """The checkpoint folders of a pre-training run (`checkpoint_*` holding a `state.pt`), sorted by name.

    Raises:
        SystemExit: the folder holds none.
    """
    fs, root = fsspec.core.url_to_fs(folder)
    states = sorted(fs.glob(posixpath.join(root, "checkpoint_*", STATE_FILE)))
    if not states:
        raise SystemExit(
            f"--maes {folder}: a folder without checkpoint_*/{STATE_FILE}, not a pre-training run"
        )
    # Named under the folder as given: glob answers without the URL's scheme.
    return [posixpath.join(folder, posixpath.basename(posixpath.dirname(s))) for s in states]


def load_candidate(candidate: Candidate) -> tuple[MAE, int | None, float | None]:
    """(the MAE in eval mode, epochs trained, the last epoch's training loss); the last two are None for
    a file, which records neither."""
    if candidate.run is None:
        return load_mae(candidate.uri), None, None
    fs, path = arrow_filesystem(candidate.uri)
    try:
        mae, history = load_pretrained(ray.train.Checkpoint(path, filesystem=fs))
    except KeyError as err:  # a ranker training's checkpoint, say
        raise SystemExit(
            f"--maes {candidate.run}: {candidate.uri} is no MAE pre-training checkpoint (no {err})"
        ) from None
    return mae, len(history), float(history[-1])


# -- measures -----------------------------------------------------------------------------------------
def load_test(cfg: JudgeConfig, mae: MAE) -> SceneSet:
    """The held-out scenes at the MAE's size, with their object masks per patch of its grid."""
    test = load_scene_set(cfg.test, mae.cfg.img_size, mae.cfg.patch_size, limit=cfg.scenes)
    if test.objects is None:
        raise SystemExit(f"--test {cfg.test}: no object masks in the manifest")
    return test


def reference_recalls(test: SceneSet, patch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Each reference selector -> (N,) its object recall per scene."""
    x = test.inputs()
    scorers = baseline_scorers(patch_size, seed)
    return {name: scene_recall(score_all(scorers[name], x), test) for name in REFERENCES}


def setup(cfg: JudgeConfig, test: SceneSet, mae: MAE, recalls: dict[str, np.ndarray]) -> dict:
    """What every candidate shares: the scenes, the geometry, the cover's size and the references."""
    kinds = np.asarray(test.backgrounds)
    num_patches = mae.cfg.num_patches
    sets = -(-num_patches // visible_count(num_patches, cfg.mask_ratio))  # cover_sets' sets per round
    print(
        f"[judge] {len(test.pixels)} held-out scenes ({', '.join(kind_order(kinds))}); each oracle: "
        f"{cfg.rounds} rounds of {sets} visible sets a scene",
        flush=True,
    )
    return {
        "test_scenes": len(test.pixels),
        "kinds": {k: int(np.sum(kinds == k)) for k in kind_order(kinds)},
        "img_size": mae.cfg.img_size,
        "patch_size": mae.cfg.patch_size,
        "sets_per_round": sets,
        "references": {name: recall_summary(v, kinds, cfg.seed) for name, v in recalls.items()},
    }


def cover_table(mae: MAE, test: SceneSet, cfg: JudgeConfig) -> pa.Table:
    """The score rows that `jobs.score --cover R` writes for the scenes (columns image_id, view,
    visible, scores): the cover sets of each scene's id, scored by leave-one-out on its central square
    (the scenes are at the MAE's size: the square is the scene), "view" numbering the sets."""
    device = next(mae.parameters()).device
    grid, ids = mae.cfg.grid, test.image_ids
    visible = torch.cat(
        [cover_sets(i, grid=grid, mask_ratio=cfg.mask_ratio, seed=cfg.seed, rounds=cfg.rounds) for i in ids]
    )
    per_scene = len(visible) // len(ids)
    scene = torch.arange(len(ids)).repeat_interleave(per_scene)
    x = test.inputs().to(device)
    batches = [slice(k, k + cfg.batch_size) for k in range(0, len(visible), cfg.batch_size)]
    scores = torch.cat([loo_scores(mae, x[scene[b]], visible[b].to(device)).cpu() for b in batches])
    columns = {
        "image_id": [ids[i] for i in scene.tolist()],
        "view": np.tile(np.arange(per_scene), len(ids)),
        "visible": visible.tolist(),
        "scores": scores.tolist(),
    }
    return pa.table(columns, schema=pa.schema([SCORES_SCHEMA.field(c) for c in columns]))


def measure_candidate(cfg: JudgeConfig, mae: MAE, test: SceneSet, variance: np.ndarray) -> dict:
    """A judge's oracle on the scenes: its object recall (pooled and per kind), its split-half
    reliability (None at one round), and its recall minus variance's per kind, paired per scene."""
    started = time.perf_counter()
    table = cover_table(mae, test, cfg)
    num_patches = mae.cfg.num_patches
    # In float32, as the evaluation job ranks it: the same ties, so the same kept patches as its report.
    oracle = torch.as_tensor(fidelity.oracle(table, num_patches, test.image_ids), dtype=torch.float32)
    recall, kinds = scene_recall(oracle, test), np.asarray(test.backgrounds)
    split_half = None
    if cfg.rounds >= 2:
        sets = fidelity.sets_per_round(table, num_patches)
        first, second = fidelity.split_half_oracles(table, num_patches, test.image_ids, sets)
        split_half = asdict(split_half_reliability(first, second, cfg.rounds, RESAMPLES, cfg.seed))
    paired = paired_by_kind(recall, {"variance": variance}, kinds, RESAMPLES, cfg.seed)
    return {
        "object_recall": recall_summary(recall, kinds, cfg.seed),
        "split_half": split_half,
        "vs_variance": {kind: asdict(by["variance"]) for kind, by in paired.items()},
        "seconds": time.perf_counter() - started,
    }


def scene_recall(scores: torch.Tensor, test: SceneSet) -> np.ndarray:
    """(N,) each scene's object recall when the top 25% of the (N, L) `scores` are kept."""
    keep = keep_top(scores.cpu(), PRIMARY_RATIO).numpy()
    return measure(test.objects, keep, SEEN_CLASSES, UNSEEN_CLASSES).recall


def recall_summary(recall: np.ndarray, kinds: np.ndarray, seed: int) -> dict:
    """Per-scene recall -> {"pooled": mean [95% interval], "kinds": {kind: the same}}; scenes without an
    object (NaN) are left out."""

    def estimate(values: np.ndarray) -> dict:
        return asdict(interval(values[~np.isnan(values)], RESAMPLES, seed))

    return {"pooled": estimate(recall), "kinds": {k: estimate(recall[kinds == k]) for k in kind_order(kinds)}}


# -- tracking -----------------------------------------------------------------------------------------
def mlflow_run(cfg: JudgeConfig) -> mlflow.ActiveRun | nullcontext:
    """With --tracking, a run in the ltrp-bench experiment (the project's tracking URI) holding the
    options as params; else nothing."""
    if not cfg.tracking:
        return nullcontext()
    runtime.track(EXPERIMENT)
    run = mlflow.start_run(run_name=f"judge {Path(cfg.test).parent.name}")
    mlflow.log_params({k: str(v) for k, v in asdict(cfg).items()})
    return run


def log_references(cfg: JudgeConfig, references: dict) -> None:
    if cfg.tracking:
        for name, recall in references.items():
            mlflow.log_metrics(_recall_metrics(f"reference.{name}.{RECALL}", recall))


def log_candidate(cfg: JudgeConfig, entry: dict) -> None:
    """LABEL.object_recall.keep25 (.KIND per kind), LABEL.vs_variance.object_recall.keep25 (.KIND),
    LABEL.split_half_tau and LABEL.final_loss, at step = the epochs trained (0 for a file)."""
    if not cfg.tracking:
        return
    label = re.sub(r"[^\w\-. /]", "_", entry["label"])  # what MLflow accepts in a metric name
    metrics = _recall_metrics(f"{label}.{RECALL}", entry["object_recall"])
    metrics[f"{label}.vs_variance.{RECALL}"] = entry["vs_variance"][POOLED]["mean"]
    kinds = {k: v for k, v in entry["vs_variance"].items() if k != POOLED}
    metrics |= {f"{label}.vs_variance.{RECALL}.{k}": v["mean"] for k, v in kinds.items()}
    if entry["split_half"] is not None:
        metrics[f"{label}.split_half_tau"] = entry["split_half"]["tau"]["mean"]
    if entry["final_loss"] is not None:
        metrics[f"{label}.final_loss"] = entry["final_loss"]
    mlflow.log_metrics(metrics, step=entry["epoch"] or 0)


def _recall_metrics(key: str, recall: dict) -> dict[str, float]:
    return {key: recall["pooled"]["mean"]} | {f"{key}.{k}": v["mean"] for k, v in recall["kinds"].items()}


# -- report -------------------------------------------------------------------------------------------
def _estimate(e: dict) -> str:
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _name(entry: dict) -> str:
    return entry["label"] if entry["epoch"] is None else f"{entry['label']} @ epoch {entry['epoch']}"


def _tau(split_half: dict | None) -> str:
    if split_half is None:
        return "- (1 round)"
    return f"{_estimate(split_half['tau'])} (SB {split_half['corrected']:.3f})"


def _describe(entry: dict) -> str:
    """'mix-a @ epoch 3 (final loss 0.1234): oracle object recall 0.612 [0.590, 0.633] (black 0.701,
    ...); split-half tau ...; 12 s'."""
    loss = "" if entry["final_loss"] is None else f" (final loss {entry['final_loss']:.4f})"
    kinds = ", ".join(f"{k} {v['mean']:.3f}" for k, v in entry["object_recall"]["kinds"].items())
    return (
        f"{_name(entry)}{loss}: oracle object recall {_estimate(entry['object_recall']['pooled'])} "
        f"({kinds}); split-half tau {_tau(entry['split_half'])}; minus variance "
        f"{_estimate(entry['vs_variance'][POOLED])}; {entry['seconds']:.0f} s"
    )


def tables(result: dict) -> str:
    """The oracle's object recall per candidate (rows) with the references, and the oracle minus
    variance per kind, paired per scene."""
    kinds = list(result["kinds"])
    heads = " | ".join(f"{k} ({n})" for k, n in result["kinds"].items())  # the kind's scene count
    recall_lines = [
        f"Oracle object recall at 25% keep on {result['test_scenes']} held-out scenes, "
        f"{result['args']['rounds']} rounds (higher is better); split-half tau: Kendall tau between the "
        "two halves' oracles [95% CI] and its Spearman-Brown prediction at all rounds (SB)",
        f"| candidate | epoch | final loss | pooled [95% CI] | {heads} | split-half tau |",
        "|---" * (len(kinds) + 5) + "|",
    ]
    for entry in result["candidates"]:
        recall = entry["object_recall"]
        loss = "-" if entry["final_loss"] is None else f"{entry['final_loss']:.4f}"
        recall_lines.append(
            f"| {entry['label']} | {entry['epoch'] or '-'} | {loss} | {_estimate(recall['pooled'])} | "
            + " | ".join(f"{recall['kinds'][k]['mean']:.3f}" for k in kinds)
            + f" | {_tau(entry['split_half'])} |"
        )
    for name, recall in result["references"].items():
        recall_lines.append(
            f"| {name} (reference) | - | - | {_estimate(recall['pooled'])} | "
            + " | ".join(f"{recall['kinds'][k]['mean']:.3f}" for k in kinds)
            + " | - |"
        )
    paired_lines = [
        "Oracle minus patch variance, object recall at 25% keep, paired per scene [95% CI] (positive: the "
        "oracle keeps more of the objects)",
        f"| candidate | epoch | {heads} | {POOLED} |",
        "|---" * (len(kinds) + 3) + "|",
    ]
    for entry in result["candidates"]:
        cells = " | ".join(_estimate(entry["vs_variance"][k]) for k in [*kinds, POOLED])
        paired_lines.append(f"| {entry['label']} | {entry['epoch'] or '-'} | {cells} |")
    return "\n\n".join("\n".join(lines) for lines in (recall_lines, paired_lines))


def bar_candidates(candidates: list[dict]) -> list[dict]:
    """The candidates of the per-kind bars: every file, and each run's last epoch and best (by pooled
    recall) epoch; every epoch of a curve would crowd the bars."""
    shown = [c for c in candidates if c["run"] is None]
    for run in dict.fromkeys(c["run"] for c in candidates if c["run"] is not None):
        points = [c for c in candidates if c["run"] == run]
        best = max(points, key=lambda c: c["object_recall"]["pooled"]["mean"])
        shown += [best] if best is points[-1] else [best, points[-1]]
    return shown


def plot(result: dict, path: Path) -> None:
    """Left: pooled oracle recall (95% band) against epochs, a line per pre-training run; files as
    dash-dotted lines, the references dashed. Right: recall per kind and pooled, a bar (95% interval) per
    `bar_candidates`, variance's recall as black ticks."""
    from jobs.experiments.figures import plt, save

    fig, (by_epoch, by_kind) = plt.subplots(1, 2, figsize=(13, 4.8))
    candidates, colours = result["candidates"], iter(plt.cm.tab10.colors)
    for label in dict.fromkeys(c["label"] for c in candidates):
        points = [c for c in candidates if c["label"] == label]
        pooled = [c["object_recall"]["pooled"] for c in points]
        colour = next(colours, "k")
        if points[0]["run"] is None:
            by_epoch.axhline(pooled[0]["mean"], ls="-.", lw=1.5, color=colour, label=f"{label} (file)")
            continue
        epochs = [c["epoch"] for c in points]
        by_epoch.plot(epochs, [p["mean"] for p in pooled], "o-", ms=3, color=colour, label=label)
        by_epoch.fill_between(
            epochs, [p["lo"] for p in pooled], [p["hi"] for p in pooled], color=colour, alpha=0.15
        )
    for name, colour in zip(result["references"], plt.cm.Set2.colors, strict=False):
        by_epoch.axhline(
            result["references"][name]["pooled"]["mean"], ls="--", lw=1, color=colour, label=name
        )

    groups = [*result["kinds"], POOLED]
    shown = bar_candidates(candidates)
    width = 0.8 / max(1, len(shown))
    for i, entry in enumerate(shown):
        recall = entry["object_recall"]
        values = [recall["kinds"][k] for k in result["kinds"]] + [recall["pooled"]]
        error = [[v["mean"] - v["lo"] for v in values], [v["hi"] - v["mean"] for v in values]]
        at = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        by_kind.bar(at, [v["mean"] for v in values], width, yerr=error, capsize=2, label=_name(entry))
    variance = result["references"]["variance"]
    ticks = [variance["kinds"][k]["mean"] for k in result["kinds"]] + [variance["pooled"]["mean"]]
    by_kind.scatter(np.arange(len(groups)), ticks, marker="_", s=900, color="k", zorder=3, label="variance")

    ylabel = "oracle object recall at 25% keep (higher is better)"
    title = f"{result['test_scenes']} held-out scenes, {result['args']['rounds']}-round oracle"
    by_epoch.set(xlabel="pre-training epochs", ylabel=ylabel, title=f"{title}, by epoch")
    by_kind.set(xticks=np.arange(len(groups)), xticklabels=groups, ylabel=ylabel, title=f"{title}, by kind")
    save(fig, (by_epoch, by_kind), path)


if __name__ == "__main__":
    main()
