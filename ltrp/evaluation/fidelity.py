"""How faithful cheap scores are to the full-coverage oracle: Kendall tau per image, against the
oracle's one score per patch position (`ltrp.data.tables.position_scores` of a `--cover` table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ltrp.core.ranking_metrics import kendall_tau
from ltrp.data.tables import position_scores


def oracle(cover_table: pa.Table, num_patches: int, ids: Sequence[str]) -> np.ndarray:
    """(B, L) the oracle's position scores of `ids`, from a cover table.

    Raises:
        ValueError: an image has a position no row scored (the table is not a full cover).
    """
    scores = position_scores(cover_table, num_patches)
    missing = [i for i in ids if i not in scores or np.isnan(scores[i]).any()]
    if missing:
        raise ValueError(f"{len(missing)} images lack a score at some position (first: {missing[0]})")
    return np.stack([scores[i] for i in ids])


def split_half_oracles(
    cover_table: pa.Table, num_patches: int, ids: Sequence[str], sets_per_round: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent oracles of `ids` from the first and second half of the cover rounds: their
    agreement is the oracle's own reliability (the most any cheap score can reach, at half its rounds)."""
    rounds = cover_rounds(cover_table, sets_per_round)
    if rounds < 2:
        raise ValueError("a split-half oracle needs a cover table of at least 2 rounds")
    round_of = pc.divide(pc.cast(cover_table.column("view"), pa.int32()), sets_per_round)
    first = cover_table.filter(pc.less(round_of, rounds // 2))
    second = cover_table.filter(pc.greater_equal(round_of, rounds // 2))
    return oracle(first, num_patches, ids), oracle(second, num_patches, ids)


def cover_rounds(cover_table: pa.Table, sets_per_round: int) -> int:
    """The rounds of a cover table: its "view" numbers its visible sets, round r's from r * sets_per_round
    (`ltrp.core.masking.cover_sets`)."""
    return int(pc.max(cover_table.column("view")).as_py()) // sets_per_round + 1


def sets_per_round(cover_table: pa.Table, num_patches: int) -> int:
    """ceil(L / n): the disjoint visible sets of n that cover L positions once (one round)."""
    return -(-num_patches // len(cover_table.column("visible")[0]))


def spearman_brown(half: float, factor: float = 2.0) -> float:
    """The agreement predicted at `factor` times the rounds from `half`, the agreement of two oracles
    of one half each: factor * r / (1 + (factor - 1) * r). Derived for correlations of sums (Pearson);
    on a Kendall tau it is indicative, not exact. NaN where it is undefined (halves in full disagreement
    at factor 2: no reliability to predict from)."""
    denominator = 1 + (factor - 1) * half
    return factor * half / denominator if denominator else float("nan")


def tau(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Kendall tau-a of matching rows: (B, m), (B, m) -> (B,)."""
    return kendall_tau(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(reference)).numpy()


def at_positions(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(B, L) scores -> (B, n) those at each row's `positions` (B, n)."""
    return np.take_along_axis(scores, positions, axis=1)


def draw_rows(table: pa.Table, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(visible (B, n), scores (B, n)) of view 0 of each of `ids`, from a score table."""
    view0 = table.filter(pc.equal(table.column("view"), 0))
    by_id: Mapping[str, int] = {i: k for k, i in enumerate(view0.column("image_id").to_pylist())}
    rows = [by_id[i] for i in ids]
    visible = np.asarray(view0.column("visible").take(rows).to_pylist(), dtype=np.int64)
    return visible, np.asarray(view0.column("scores").take(rows).to_pylist(), dtype=np.float64)
