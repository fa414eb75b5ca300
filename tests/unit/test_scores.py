"""The pooled AUROC from per-bin score counts (fedrun_trainer.common.scores)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedrun_trainer.common.scores import BINS, auroc_from_counts, checked_counts, score_counts
from fedrun_trainer.server.coordinator import pooled_auroc


def hospital(rng: np.random.Generator, n: int, prevalence: float, shift: float):  # type: ignore[no-untyped-def]
    y = (rng.random(n) < prevalence).astype(np.float64)
    logits = rng.normal(-3.0 + shift, 1.2, n) + 1.5 * y
    return logits, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summed_counts_give_the_pooled_auroc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = [
        hospital(rng, n, p, s)
        for n, p, s in ((1500, 0.07, 0.0), (900, 0.03, 0.8), (400, 0.1, -0.5))
    ]
    scores = {}
    examples = {}
    for i, (logits, y) in enumerate(sites):
        neg, pos = score_counts(logits, y)
        scores[f"h{i}"] = {
            "negatives": [float(v) for v in neg],
            "positives": [float(v) for v in pos],
        }
        examples[f"h{i}"] = float(len(y))
    exact = roc_auc_score(
        np.concatenate([y for _, y in sites]), np.concatenate([x for x, _ in sites])
    )
    pooled = pooled_auroc(scores, examples)
    assert pooled == pytest.approx(exact, abs=0.005)
    # ...which is not the mean of the hospitals' own AUROCs.
    mean = np.average([roc_auc_score(y, x) for x, y in sites], weights=[len(y) for _, y in sites])
    assert abs(mean - exact) > 0.01


def test_ties_and_single_class() -> None:
    assert auroc_from_counts([1, 0], [0, 1]) == 1.0
    assert auroc_from_counts([0, 1], [1, 0]) == 0.0
    assert auroc_from_counts([2, 0], [2, 0]) == 0.5  # all in one bin: ties
    assert auroc_from_counts([3, 1], [0, 0]) is None


def test_counts_from_a_reply_are_checked() -> None:
    good = [0.0] * BINS
    good[3] = 5.0
    assert checked_counts(good, limit=5) is not None
    assert checked_counts(good[:-1], limit=5) is None  # wrong length
    assert checked_counts([*good[:-1], 0.5], limit=5) is None  # not whole
    assert checked_counts([*good[:-1], 6.0], limit=5) is None  # more than the test rows
    assert checked_counts([*good[:-1], -1.0], limit=5) is None
    zeros = [0.0] * BINS
    counts = {
        "ok": {"negatives": good, "positives": [0.0] * (BINS - 1) + [1.0]},
        "lies": {"negatives": good, "positives": good},  # more rows than it tested
    }
    assert pooled_auroc(counts, {"ok": 6.0, "lies": 6.0}) == 1.0  # "lies" left out
    assert pooled_auroc({"x": {"negatives": zeros}}, {"x": 0.0}) is None


def test_a_bad_example_count_leaves_a_hospital_out_without_a_crash() -> None:
    good = [0.0] * BINS
    good[3] = 5.0
    counts = {"h": {"negatives": good, "positives": good}}
    for bad in (float("nan"), float("inf"), -1.0):
        assert pooled_auroc(counts, {"h": bad}) is None
