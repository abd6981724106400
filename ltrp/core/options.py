"""The vocabulary of choices shared by the library and the jobs' configs, as `Literal` types.

Torch-free on purpose: the launchers parse and validate their options with these before anything
heavy is imported. Each name set that mirrors a registry (geometries, losses) is tested equal to it.
"""

from typing import Literal

#: Leave-one-out: cut the patch out of the decoder only (the paper), or out of the encoder too.
Mode = Literal["decoder", "encoder"]
#: Distance between the anchor and the leave-one-out reconstructions.
Metric = Literal["l1", "l2"]
#: How a view is cut from an image: the central square, or RandomResizedCrop's geometry.
Crop = Literal["center", "random"]
#: Scoring arithmetic: fp32, or autocast to fp16 / bf16 (fp16 ranks closer to fp32 at the same speed).
Precision = Literal["fp32", "fp16", "bf16"]
#: Ranker head: a Linear on CLS scoring every position (the paper), or one score per token.
Head = Literal["cls", "token"]
#: Ranking losses of `ltrp.core.losses.LOSSES`.
Loss = Literal["listmle", "listnet", "ranknet", "mse"]
#: Where a job computes: GPUs when the cluster (or machine) has them, or forced either way.
Device = Literal["auto", "gpu", "cpu"]
#: What pre-training learns: the patches hidden from the encoder (MAE), or the frequencies a filter
#: removed from an image the encoder sees whole (FOLK, MFM: `ltrp.core.folk`).
Objective = Literal["mae", "frequency"]
#: A frequency filter of `ltrp.core.folk`: image-adaptive (com, rcom: FOLK) or a fixed disc (MFM).
FrequencyFilter = Literal["com", "rcom", "lowpass", "highpass"]
#: Names of `ltrp.core.mae.GEOMETRIES`.
MAEGeometry = Literal[
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_demo_patch16",
    "mae_vit_tiny_patch8",
    "mae_vit_fmnist_patch4",
    "mae_vit_scenes_patch4",
]
#: Names of `ltrp.core.ranker.RANKER_GEOMETRIES`.
RankerGeometry = Literal[
    "ltrp_vit_small_patch16",
    "ltrp_vit_tiny_patch16",
    "ltrp_vit_micro_patch8",
    "ltrp_vit_fmnist_patch4",
    "ltrp_vit_scenes_patch4",
    "ltrp_vit_fmnist_tiny_patch4",
    "ltrp_vit_scenes_tiny_patch4",
    "ltrp_vit_scenes_mae_patch4",
]
#: Where a ranker's backbone starts: a fresh initialisation, or the encoder of the MAE that scored its
#: training table (the ranker's geometry must then match that encoder).
Init = Literal["scratch", "mae"]
#: What the ranker sees in training: CLS + the n scored patches (the authors'), or all L patches with
#: the loss at the n scored positions (as at inference).
Training = Literal["asymmetric", "symmetric"]
#: A scene's background (`ltrp.data.scenes`, docs/scenes.md): black, a low-contrast texture,
#: non-object clutter, an object-free photo crop, object-scale distractor shapes, or faint objects on a
#: texture. New kinds go last: a scene draws its kind from this order, so old scenes stay the same.
Background = Literal["black", "texture", "clutter", "photo", "shapes", "faint"]
#: Rounds of a ranker's set inference (`ltrp.core.ranker.rank`; 0: one pass seeing every patch): the
#: full-coverage oracle's rounds on the benchmark (cover 8); docs/method.md gives recall against rounds.
ROUNDS = 8
#: A data split: which Fashion-MNIST images a scene's objects come from.
Split = Literal["train", "test"]
