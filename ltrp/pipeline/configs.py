"""Every job's config: one dataclass per job, whose fields are its options and whose comments are their
help (`python -m jobs.<job> --help` shows them, with defaults), and which checks its own values.

A config is valid or cannot be built: `__post_init__` checks every value against its type (choices of a
`Literal`, numbers that must be numbers) and the job's ranges and combinations, so a bad option fails
here, before a job starts Ray, opens an MLflow run or writes anything.

One resume rule for every job that resumes (scoring, ranking, training, pre-training): a field a later
launch may change is marked `may_change()` (how the job runs: workers, batch sizes, where it logs; and,
for the trainings, how long and how fast they learn); every other field is the job's identity
(`identity_fields`): a resume must agree on it, and it is the corpus jobs' output fingerprint. A new
field is identity unless marked, so forgetting to mark one refuses a resume, never mixes results.

Torch-, Ray- and MLflow-free, so that launchers parse and refuse quickly.
"""

from __future__ import annotations

import re
import types
import typing
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tyro
import yaml

from ltrp.core.options import (
    ROUNDS,
    Background,
    Crop,
    Device,
    FrequencyFilter,
    Head,
    Init,
    Loss,
    MAEGeometry,
    Metric,
    Mode,
    Objective,
    Precision,
    RankerGeometry,
    Split,
    Training,
)
from ltrp.evaluation.measures import KEEP_RATIOS

if TYPE_CHECKING:
    from ltrp.data.scenes import SceneConfig

#: models:/NAME, the registered model a job writes to or promotes in.
REGISTERED_MODEL = re.compile(r"^models:/(?P<name>[^/@]+)$")
#: models:/NAME/VERSION or models:/NAME@ALIAS, one registered version.
MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
_MAY_CHANGE = "may_change"


def may_change(default: Any) -> Any:
    """A field that a resumed job may take a new value of (left out of `identity_fields`)."""
    return field(default=default, metadata={_MAY_CHANGE: True})


def identity_fields(cfg: object) -> dict[str, Any]:
    """The fields of `cfg` that a resume must agree on: all but the `may_change()` ones."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if not f.metadata.get(_MAY_CHANGE)}


def option(name: str) -> str:
    """A field's command-line spelling: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _is_missing(value: Any) -> bool:
    # A launcher's defaults leave the required options it has yet to parse as tyro.MISSING.
    return value is tyro.MISSING


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple | list) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if hint is type(None):
        return "None"
    return ("an " if hint.__name__[0] in "aeiou" else "a ") + hint.__name__


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the option."""


class InputError(ValueError):
    """An input a job cannot use (a missing source, checkpoint or score table, an output of another
    job), found by its up-front checks: before Ray starts, an MLflow run opens or anything is written."""


@contextmanager
def checking_inputs() -> Iterator[None]:
    """A job's up-front checks: what fails in them (a missing file, a refused checkpoint, ...) is an
    `InputError`, which launchers report as a usage error, without a traceback."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError) as err:
        raise InputError(str(err)) from err


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{option(name)}: {problem}")


class _Checked:
    """Base of the job configs: types first (so the job's own checks see clean values), then `check`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if _is_missing(value):
                continue
            if isinstance(value, list):  # YAML gives lists where the config keeps tuples
                value = tuple(value)
                setattr(self, f.name, value)
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{option(f.name)}: expected {_describe(hints[f.name])}, got {value!r}")
        if not any(_is_missing(getattr(self, f.name)) for f in fields(self)):  # type: ignore[arg-type]
            self.check()

    def check(self) -> None:
        """Ranges and combinations of one job's options."""


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value is None or value > 0, name, f"must be positive, got {value}")


def _at_least(cfg: object, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value is None or value >= minimum, name, f"must be at least {minimum}, got {value}")


def registered_name(uri: str) -> str:
    """NAME of a checked `models:/NAME` option (train's --register, promote's --model)."""
    return REGISTERED_MODEL.match(uri)["name"]  # type: ignore[index]


def _registered_model(uri: str, name: str = "model") -> None:
    _require(bool(REGISTERED_MODEL.match(uri)), name, f"expected models:/NAME, got {uri!r}")


def _model_version_or_file(uri: str, name: str = "model") -> None:
    """A ranker option (`name`): one registered version, or a checkpoint file."""
    _require(
        bool(MODEL_VERSION.match(uri)) or not uri.startswith("models:/"),
        name,
        f"expected models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint file, got {uri!r}",
    )


def _mask_ratio(value: float) -> None:
    _require(0.0 <= value < 1.0, "mask_ratio", f"must be in [0, 1), got {value}")


@dataclass(kw_only=True)
class CorpusConfig(_Checked):
    """What every corpus job (an image corpus -> a table, `ltrp.pipeline.corpus_job`) takes: the corpus,
    its views, the output's shards and files, and the model stage's workers."""

    source: str  # images: folder, s3:// prefix, .tar shard or .parquet/.csv manifest
    output: str = may_change(MISSING)  # output folder or s3:// prefix; re-using one resumes that job
    views: int = 1  # views per image; each has its own crop and flip
    crop: Crop = "center"  # center: the central square; random: RandomResizedCrop geometry (scale 0.2-1)
    flip: bool = False  # mirror each view with probability 1/2
    seed: int = 0  # seed of the views (crops, flips; the scoring job's visible sets too)
    batch_size: int = may_change(64)  # views per model call
    shard_size: int = 256  # images per shard: the unit of commit and of resume
    file_shards: int = 256  # shards per output file: a file combines them once all are committed
    workers: int | None = may_change(None)  # model actors (at least); None: one per GPU, else 1
    max_workers: int | None = may_change(None)  # an autoscaling cluster grows the pool up to this
    worker_cpus: float = may_change(1.0)  # CPUs reserved by each model actor
    threads: int | None = may_change(None)  # torch threads of a CPU model actor; None: its CPUs
    device: Device = may_change("auto")  # auto: GPU model actors when the cluster has GPUs
    min_side: int = 16  # images with a shorter side below this (px) are recorded as errors
    max_pixels: int = 89_478_485  # images with more pixels are recorded as errors (decompression bombs)

    def check(self) -> None:
        _at_least(self, 1, "views", "batch_size", "shard_size", "file_shards")
        _at_least(self, 1, "workers", "threads", "min_side")
        _at_least(self, self.workers or 1, "max_workers")
        _positive(self, "worker_cpus", "max_pixels")


@dataclass(kw_only=True)
class ScoreConfig(CorpusConfig):
    """Score an image corpus: leave-one-out MAE pseudo-scores of each view's visible patches."""

    mae: str = may_change(MISSING)  # MAE checkpoint with a decoder, local or s3:// (its sha256 counts)
    #: R > 0: the full-coverage oracle, R rounds of disjoint visible sets covering every patch of view 0
    cover: int = 0
    mask_ratio: float = 0.9  # fraction of patches hidden from the MAE (0.9 keeps 19 of 196)
    mode: Mode = "decoder"  # decoder: cut the patch out of the decoder (the paper); encoder: MAE-masked
    metric: Metric = "l1"  # distance between reconstructions: l1 (the paper) or l2
    precision: Precision = "fp32"  # scoring arithmetic; fp16/bf16 autocast need a GPU
    batch_size: int = may_change(32)  # views per scoring call

    def check(self) -> None:
        super().check()
        _mask_ratio(self.mask_ratio)
        _at_least(self, 0, "cover")
        _require(
            self.cover == 0 or self.views == 1,
            "cover",
            f"covers the patches of one view; it cannot be combined with --views {self.views}",
        )
        _require(
            self.precision == "fp32" or self.device != "cpu",
            "precision",
            f"{self.precision} autocast needs a GPU; use fp32 with --device cpu",
        )


@dataclass(kw_only=True)
class RankConfig(CorpusConfig):
    """Rank the patches of every image of a corpus with a trained ranker: a table of scores and order."""

    model: str = may_change(MISSING)  # ranker: models:/NAME@ALIAS, models:/NAME/VERSION or state.pt
    #: a ranker trained on sets of n patches ranks in such sets: random partitions averaged, each about
    #: one forward pass (0: one pass seeing every patch, the paper's inference)
    rounds: int = ROUNDS

    def check(self) -> None:
        super().check()
        _at_least(self, 0, "rounds")
        _model_version_or_file(self.model)


@dataclass
class PretrainConfig(_Checked):
    """Pre-train an MAE with Ray Train (DDP) on any corpus the scoring job reads: masked patches (MAE), or
    filtered frequencies (FOLK, MFM)."""

    source: str  # images: folder, s3:// prefix, .tar shard or .parquet/.csv manifest
    output: str = may_change(MISSING)  # where the final MAE goes (local or s3://), e.g. runs/mae.pth
    #: Ray Train run name: running again with the same name and storage resumes
    name: str = may_change("ltrp-mae")
    storage: str = may_change("runs/pretrain")  # checkpoints go to STORAGE/NAME (local or s3://)
    geometry: MAEGeometry = "mae_vit_base_patch16"  # MAE size and patch grid
    #: mae: reconstruct the patches hidden from the encoder; frequency: restore the frequencies a filter
    #: removed, the encoder seeing every patch of the filtered image (FOLK, MFM)
    objective: Objective = "mae"
    norm_pix: bool = False  # mae: learn per-patch standardised pixels (default raw, what LTRP scores in)
    mask_ratio: float = 0.75  # mae: fraction of patches hidden from the encoder
    #: frequency: filters drawn per image; com/rcom adapt to the image's spectrum (FOLK), lowpass/highpass
    #: are a fixed disc around DC (MFM)
    filters: tuple[FrequencyFilter, ...] = ("com", "rcom")
    taus: tuple[float, ...] = (0.005, 0.01, 0.05)  # frequency: fraction com/lowpass keep, drawn per image
    distill_weight: float = 1.0  # frequency: weight of the EMA teacher's distillation; 0: no teacher (MFM)
    teacher_momentum: float = 0.996  # frequency: the teacher's EMA momentum at the start, cosine to 1
    epochs: int = may_change(10)  # epochs
    warmup_epochs: int = may_change(1)  # linear warm-up epochs before the cosine decay
    batch_size: int = may_change(64)  # images per worker and step
    lr: float | None = may_change(None)  # peak learning rate; None: base_lr * global batch / 256, MAE's rule
    base_lr: float = may_change(1.5e-4)  # learning rate per 256 images of global batch
    weight_decay: float = may_change(0.05)  # AdamW weight decay (not on norms, biases and tokens)
    crop: Crop = "center"  # center: the largest central square; random: RandomResizedCrop, scale 0.2-1
    flip: bool = False  # mirror each view with probability 1/2
    max_images: int | None = None  # only the first N images of the source (in its sorted order)
    shard_size: int = 64  # images per read task
    shuffle_buffer: int = may_change(1024)  # images in each worker's local shuffle buffer (0: none)
    workers: int = may_change(1)  # DDP workers
    #: auto: one GPU per worker when the cluster has GPUs (NCCL), else CPU (gloo)
    device: Device = may_change("auto")
    worker_cpus: float = may_change(1.0)  # CPUs reserved per worker
    #: torch threads of a CPU worker; None: Ray's (one per reserved CPU)
    threads: int | None = may_change(None)
    max_failures: int = may_change(2)  # worker-group restarts from the last checkpoint before the run fails
    keep_checkpoints: int = may_change(2)  # checkpoints kept in STORAGE/NAME: the last N
    seed: int = 0  # seed of the initialisation, views, masks and order
    sample_images: int = may_change(8)  # fixed images in the reconstruction grid logged each epoch

    def check(self) -> None:
        _at_least(self, 1, "epochs", "batch_size", "max_images", "shard_size", "workers", "threads")
        _at_least(self, 1, "keep_checkpoints")
        _at_least(self, 0, "warmup_epochs", "shuffle_buffer", "max_failures", "sample_images")
        _positive(self, "lr", "base_lr", "worker_cpus")
        _at_least(self, 0, "weight_decay", "distill_weight")
        _mask_ratio(self.mask_ratio)
        _require(len(self.filters) > 0, "filters", "name at least one filter")
        _require(
            len(self.taus) > 0 and all(0 < t < 1 for t in self.taus),
            "taus",
            f"must be in (0, 1): {self.taus}",
        )
        momentum = self.teacher_momentum
        _require(0 <= momentum < 1, "teacher_momentum", f"must be in [0, 1), got {momentum}")
        other = {
            "mae": ("filters", "taus", "distill_weight", "teacher_momentum"),
            "frequency": ("norm_pix", "mask_ratio"),
        }
        _only_defaults(self, other[self.objective], f"not an option of --objective {self.objective}")


def _only_defaults(cfg: object, names: tuple[str, ...], problem: str) -> None:
    """Refuses a value other than its default in any of `names`: options the chosen mode has no use for."""
    defaults = {f.name: f.default for f in fields(cfg)}  # type: ignore[arg-type]
    for name in names:
        _require(getattr(cfg, name) == defaults[name], name, problem)


@dataclass
class TrainConfig(_Checked):
    """Train the LTRP ranker on a score table with Ray Train (DDP) and register it in MLflow."""

    scores: str  # output of the scoring job (local or s3://)
    #: Ray Train run name: running again with the same name and storage resumes
    name: str = may_change("ltrp-ranker")
    storage: str = may_change("runs/train")  # checkpoints go to STORAGE/NAME (local or s3://)
    ranker: RankerGeometry = "ltrp_vit_small_patch16"  # ranker size and patch grid (small: the paper's)
    head: Head = "cls"  # cls: a Linear on the CLS token scores every position (the paper); token: per token
    init: Init = "scratch"  # scratch, or mae: the backbone starts from the encoder of the table's MAE
    loss: Loss = "listmle"  # ranking loss (listmle: the paper's)
    training: Training = "asymmetric"  # asymmetric: CLS + the n scored patches (the paper); symmetric: all L
    epochs: int = may_change(10)  # epochs
    warmup_epochs: int = may_change(1)  # linear warm-up epochs before the cosine decay
    batch_size: int = may_change(64)  # views per worker and step
    #: views in each worker's local shuffle buffer (0: table order, an image's views together)
    shuffle_buffer: int = may_change(1024)
    #: peak learning rate; None: 1.5e-4 * global batch / 256, the authors' rule
    lr: float | None = may_change(None)
    weight_decay: float = may_change(0.06)  # AdamW weight decay (not on norms, biases and tokens)
    val_fraction: float = 0.1  # fraction of images (by id hash) held out for validation
    views: int | None = None  # train on views 0 .. N-1 of each image only (None: every view in the table)
    topk: int = may_change(5)  # k of NDCG@k and top-k overlap
    validate_every: int = may_change(1)  # validate (and checkpoint) every N epochs, and after the last
    #: stop after N validations without a better val_kendall_tau (None: never)
    patience: int | None = may_change(None)
    #: hold each worker's decoded views in memory across epochs when they fit in this many MiB (0: never)
    cache_mib: int = may_change(4096)
    workers: int = may_change(1)  # DDP workers
    #: auto: one GPU per worker when the cluster has GPUs (NCCL), else CPU (gloo)
    device: Device = may_change("auto")
    worker_cpus: float = may_change(1.0)  # CPUs reserved per worker
    #: torch threads of a CPU worker; None: Ray's (one per reserved CPU)
    threads: int | None = may_change(None)
    max_failures: int = may_change(2)  # worker-group restarts from the last checkpoint before the run fails
    #: checkpoints kept in STORAGE/NAME, beside the latest: the best N by validation tau (ranker)
    keep_checkpoints: int = may_change(2)
    seed: int = 0  # seed of the initialisation
    #: registered model (models:/NAME) that receives the new version
    register: str = may_change("models:/ltrp-ranker")
    alias: str | None = may_change(None)  # alias to set on the new version (e.g. candidate)

    def check(self) -> None:
        _at_least(self, 1, "epochs", "batch_size", "topk", "workers", "views", "threads")
        _at_least(self, 1, "validate_every", "patience", "keep_checkpoints")
        _at_least(self, 0, "warmup_epochs", "max_failures", "weight_decay", "shuffle_buffer", "cache_mib")
        _positive(self, "lr", "worker_cpus")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _registered_model(self.register, "register")


@dataclass
class EvaluateConfig(_Checked):
    """Evaluate a ranker against the baselines on held-out labelled images, report it, tag its version."""

    model: str  # the ranker: models:/NAME/VERSION, models:/NAME@ALIAS, or a training checkpoint (state.pt)
    mae: str  # the MAE checkpoint that scored the table (reconstruction uses it too)
    scores: tuple[str, ...]  # score tables of the held-out images' central squares (scenes: a --cover one)
    train_source: str  # labelled images that train the classifiers and the supervised selector
    test_source: str  # labelled held-out images (scored into --scores); a scene manifest with masks: scenes
    output: str = "runs/evaluate"  # folder or s3:// prefix for report.md, the PNGs and estimates.json
    #: scenes: rankers of --model's recipe trained with other seeds (same forms as --model), measured on
    #: object recall beside it (as ltrp_seed1, ...): the report gives the mean over seeds and its spread
    seed_models: tuple[str, ...] = ()
    keep_ratios: tuple[float, ...] = KEEP_RATIOS  # fractions of patches kept
    seen_classes: tuple[str, ...] | None = None  # supervised selector's classes (None: scenes' or first half)
    unseen_classes: tuple[str, ...] | None = None  # scenes: the bias test's other group (None: scenes' own)
    max_train: int = 4000  # training images used (an even spread by id hash)
    max_test: int = 1000  # held-out images measured (an even spread by id hash)
    classifier_dim: int = 64  # width of the kept-token classifiers
    classifier_depth: int = 2  # blocks of the kept-token classifiers
    classifier_epochs: int = 6  # epochs of each classifier
    probe_seeds: int = 3  # scenes: seeds of the kept-token probe per selector
    probe_epochs: int = 10  # scenes: most epochs of each probe (stops when validation mAP stops improving)
    supervised_epochs: int = 20  # scenes: most epochs of the supervised selector (likewise)
    resamples: int = 1000  # bootstrap resamples of each interval
    seed: int = 0  # seed of the classifiers, the random scorer and the bootstrap
    #: a ranker trained on sets of n patches ranks in such sets: random partitions averaged (0: one pass
    #: seeing every patch, the paper's inference)
    rounds: int = ROUNDS

    def check(self) -> None:
        _at_least(self, 0, "rounds")
        _at_least(self, 1, "max_train", "max_test", "classifier_depth", "classifier_epochs", "resamples")
        _at_least(self, 1, "probe_seeds", "probe_epochs", "supervised_epochs")
        _at_least(self, 4, "classifier_dim")
        _require(len(self.scores) > 0, "scores", "give at least one score table")
        _require(len(self.keep_ratios) > 0, "keep_ratios", "give at least one keep ratio")
        for ratio in self.keep_ratios:
            _require(0.0 < ratio <= 1.0, "keep_ratios", f"each must be in (0, 1], got {ratio}")
        _model_version_or_file(self.model)
        for uri in self.seed_models:
            _model_version_or_file(uri, "seed_models")


@dataclass
class PromoteConfig(_Checked):
    """Promote an evaluated model version to `champion` if it beats the champion, or roll back."""

    model: str  # registered model: models:/NAME
    candidate: str | None = None  # version number or alias (e.g. candidate) to compare with the champion
    rollback: bool = False  # move champion back to the version it replaced
    dry_run: bool = False  # decide and record, but move no alias
    policy: str | None = None  # YAML file of ltrp.evaluation.promotion.Policy fields (default: its defaults)

    def check(self) -> None:
        _registered_model(self.model)
        _require(self.rollback != (self.candidate is not None), "candidate", "give either it or --rollback")
        _require(not (self.rollback and self.dry_run), "dry_run", "applies to --candidate, not to --rollback")
        _require(not (self.rollback and self.policy), "policy", "applies to --candidate, not to --rollback")


@dataclass
class DataConfig(_Checked):
    """The pipeline's data step, and where its MAE comes from."""

    dataset: Literal["scenes", "fashion_mnist"] = "scenes"  # scenes: several objects, masks (docs/scenes.md)
    train_images: int = 10000  # train split: the ranker's score table, the probes and classifiers
    test_images: int = 1000  # test split, held out (scenes: the bias test set: seen and unseen objects)
    #: the judge: shipped (the package's scenes MAE), pretrain (the pretrain step), or an MAE checkpoint file
    mae: str = "shipped"
    #: scenes: the training split's background kinds, drawn evenly (name one twice to draw it twice as often)
    backgrounds: tuple[Background, ...] = ("black", "texture", "clutter", "photo")
    #: scenes: the held-out split's kinds; a kind not in `backgrounds` tests generalisation to it
    test_backgrounds: tuple[Background, ...] = ("black", "texture", "clutter", "photo")

    def check(self) -> None:
        _at_least(self, 1, "train_images", "test_images")
        _require(len(self.backgrounds) > 0, "backgrounds", "name at least one kind")
        _require(len(self.test_backgrounds) > 0, "test_backgrounds", "name at least one kind")
        _require(
            self.mae != "shipped" or self.dataset == "scenes",
            "mae",
            "the shipped MAE is the scenes one (56 px); Fashion-MNIST needs mae: pretrain (or a file)",
        )
        _require(
            self.mae in ("shipped", "pretrain") or Path(self.mae).is_file(),
            "mae",
            f"{self.mae} is not a file; give shipped, pretrain or an MAE checkpoint file",
        )


@dataclass
class ScenesConfig(_Checked):
    """Write a corpus of multi-object scenes with known object masks (PNGs + a Parquet manifest)."""

    output: str  # local folder: receives images/ and manifest.parquet (a --source for the jobs)
    split: Split = "train"  # which Fashion-MNIST split the objects come from
    count: int = 1000  # scenes 0 .. count-1 of the split
    #: background kinds, drawn evenly: name one twice to draw it twice as often
    backgrounds: tuple[Background, ...] = ("black", "texture", "clutter", "photo")
    min_objects: int = 1  # objects per scene, drawn evenly in [min_objects, max_objects]
    max_objects: int = 4  # (fewer when no room is left within the overlap bound)
    bias_test: bool = False  # every scene holds an object of a seen class and one of an unseen class
    #: a folder of photographs (.jpg, .png) the photo kind crops anywhere in; default: scikit-image's
    #: object-free regions. For pre-training corpora: object recall would count their objects as
    #: background (`make photos` fetches 25 offline, docs/scenes.md)
    photos: str = ""
    seed: int = 0  # scene seed: a scene is a pure function of (settings, split, index)

    def check(self) -> None:
        _at_least(self, 1, "count", "min_objects")
        _require(
            self.min_objects <= self.max_objects,
            "max_objects",
            f"must be at least --min-objects {self.min_objects}",
        )
        _require(len(self.backgrounds) > 0, "backgrounds", "name at least one kind")
        if self.photos:  # the generator's own rule, checked before any scene is drawn
            from ltrp.data.scenes import folder_photos

            _require(
                bool(folder_photos(self.photos)), "photos", f"no .jpg or .png image in folder {self.photos}"
            )

    def scene(self) -> SceneConfig:
        """The generator's settings (each background kind weighted by how often it is named)."""
        from ltrp.data.scenes import SEEN_CLASSES, UNSEEN_CLASSES, SceneConfig  # numpy, PIL, scikit-image

        return SceneConfig(
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            backgrounds=dict(Counter(self.backgrounds)),
            require=(SEEN_CLASSES, UNSEEN_CLASSES) if self.bias_test else (),
            photo_folder=str(Path(self.photos).resolve()) if self.photos else "",
            seed=self.seed,
        )


#: The sections of a config file (jobs/pipeline.yaml) and the config each one fills.
SECTIONS: dict[str, type] = {
    "scenes": ScenesConfig,
    "data": DataConfig,
    "pretrain": PretrainConfig,
    "score": ScoreConfig,
    "score_test": ScoreConfig,  # the pipeline: what differs when scoring the held-out split
    "rank": RankConfig,  # jobs.rank (the pipeline has no ranking step)
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "promote": PromoteConfig,
}
#: Top-level keys of a config file besides the sections: the pipeline's output root and how many rankers
#: it trains (seeds seed, seed + 1, ...), and any job option (it applies to every job that has it, e.g.
#: seed).
TOP_LEVEL = {"root", "ranker_seeds"} | {f.name for cls in SECTIONS.values() for f in fields(cls)}


def read_config_file(path: str | Path, section: str) -> dict[str, Any]:
    """The values a config file gives one job: its top-level keys that are fields of that job's config,
    then its `section`, which wins. An unknown key anywhere in the file is refused with its name.

    Raises:
        ConfigError: the file is missing or not a mapping, or holds a key no job knows.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read it: {err}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(spec).__name__}")
    for key, value in spec.items():
        if key in SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"--config {path}: section {key!r} must be a mapping")
            known = {f.name for f in fields(SECTIONS[key])}
            unknown = sorted(set(value or {}) - known)
            if unknown:
                raise ConfigError(
                    f"--config {path}: unknown key {unknown[0]!r} in section {key!r} "
                    f"(its keys: {', '.join(sorted(known))})"
                )
        elif key not in TOP_LEVEL:
            raise ConfigError(
                f"--config {path}: unknown top-level key {key!r} "
                f"(sections: {', '.join(SECTIONS)}; or any job option, such as seed)"
            )
    own = {f.name for f in fields(SECTIONS[section])}
    return {**{k: v for k, v in spec.items() if k in own}, **(spec.get(section) or {})}
