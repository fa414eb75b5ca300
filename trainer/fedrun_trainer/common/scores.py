"""The pooled AUROC without pooling rows: per-class counts of test scores in fixed bins.

Each hospital counts its test rows' model scores (logits) per class in the same fixed
bins (:data:`EDGES`, agreed by everyone, from no one's data) and sends the two count
vectors; the server adds them up and computes the AUROC of all hospitals' test rows as
if they had been pooled, from the summed counts alone (:func:`auroc_from_counts`). Rows
and scores never leave a hospital; only how many of each class fell in each bin. Scores
in one bin count as ties, so the figure is within about one bin's share of pairs of the
exact pooled AUROC: bins are 0.25 wide on the logit scale over [-8, 8], the end bins open.

Like the hospitals' own test metrics, the counts are evaluation figures outside the DP
guarantee of training: they say how many test rows of each class scored in each bin.
Bins this wide keep them coarse; a hospital's split of a few rows is as visible in them
as in its own test AUROC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["BINS", "EDGES", "auroc_from_counts", "checked_counts", "score_counts"]

#: Bin edges on the logit scale; the first and last bins also take everything beyond.
EDGES = np.linspace(-8.0, 8.0, 65)
BINS = len(EDGES) - 1


def score_counts(
    logits: npt.NDArray[np.floating], y: npt.NDArray[np.floating]
) -> tuple[list[int], list[int]]:
    """How many negatives and positives of a test split fall in each bin."""
    index = np.clip(np.searchsorted(EDGES, logits, side="right") - 1, 0, BINS - 1)
    negatives = np.bincount(index[y == 0.0], minlength=BINS)
    positives = np.bincount(index[y == 1.0], minlength=BINS)
    return [int(n) for n in negatives], [int(n) for n in positives]


def checked_counts(values: Iterable[float], limit: int) -> list[int] | None:
    """A count vector read from a hospital's reply, or None when it is not one
    (:data:`BINS` whole numbers between 0 and ``limit``)."""
    out = [float(v) for v in values]
    if len(out) != BINS or not all(v.is_integer() and 0 <= v <= limit for v in out):
        return None
    return [int(v) for v in out]


def auroc_from_counts(negatives: Sequence[int], positives: Sequence[int]) -> float | None:
    """The AUROC of scores given as per-bin counts (ties within a bin count one half);
    None without both classes."""
    n_neg, n_pos = sum(negatives), sum(positives)
    if n_neg == 0 or n_pos == 0:
        return None
    below = 0
    wins = 0.0
    for neg, pos in zip(negatives, positives, strict=True):
        wins += pos * (below + 0.5 * neg)
        below += neg
    return wins / (n_neg * n_pos)
