"""Synthetic stroke-like patients, and demo/benchmark hospital files.

Everything :func:`synthetic_stroke` produces is SYNTHETIC: drawn from hand-set
distributions shaped after the public Kaggle stroke data set's published marginals (age
roughly uniform over 0-82 years, ~59 % female, ~10 % hypertension, ~5 % heart disease,
glucose mostly 60-140 mg/dL with a diabetic tail, BMI ~29 ± 7 for adults with ~4 % written
as ``N/A``, children with ``work_type=children`` and mostly ``Unknown`` smoking). No real
patient is behind any row.

The label comes from a known logistic ground truth: the log-odds of stroke rise with age
(the dominant factor, as in the real data), hypertension, heart disease, high glucose,
smoking and a missing BMI; the intercept is solved so that the expected prevalence is the
requested one (default 5 %). A logistic model fitted on these columns reaches AUROC ≈ 0.8-0.85,
close to what the same model reaches on the real data.

:func:`write_demo_hospitals` writes three synthetic hospitals with a label skew (different
prevalences and sizes). :func:`split_real_stroke` splits the real Kaggle file (which the
project never ships) into three hospitals with a label skew, for benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedrun_core.schema import STROKE_COLUMNS
from fedrun_trainer.common.data import DataError, load_table

__all__ = [
    "DEMO_HOSPITALS",
    "DEMO_PREVALENCE",
    "REAL_POSITIVE_SHARES",
    "split_real_stroke",
    "synthetic_stroke",
    "write_demo_hospitals",
]

DEMO_HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
#: Stroke prevalence of the three synthetic demo hospitals (the label skew).
DEMO_PREVALENCE = (0.03, 0.05, 0.08)
#: Shares of the real file's positives given to hospitals a, b, c; negatives are split evenly.
REAL_POSITIVE_SHARES = (0.5, 0.3, 0.2)


def _sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-z))
    return out


def _choice(
    rng: np.random.Generator, options: Sequence[str], p: Sequence[float], n: int
) -> npt.NDArray[np.str_]:
    probs = np.asarray(p, dtype=np.float64)
    return np.asarray(rng.choice(np.asarray(options), size=n, p=probs / probs.sum()))


def _solve_intercept(score: npt.NDArray[np.float64], prevalence: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(score + mid).mean() < prevalence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def synthetic_stroke(n: int, seed: int, prevalence: float = 0.05) -> pd.DataFrame:
    """``n`` synthetic patients with the Kaggle stroke columns (strings, as read from CSV).

    ``bmi`` is ``"N/A"`` for about 4 % of rows; ``stroke`` is drawn from the logistic ground
    truth with expected prevalence ``prevalence``. Deterministic for a given ``seed``.
    """
    if n < 1 or not 0.0 < prevalence < 1.0:
        raise ValueError("need n >= 1 and 0 < prevalence < 1")
    rng = np.random.default_rng(seed)
    age = rng.uniform(0.08, 82.0, n)
    age = np.where(age < 2, np.round(age, 2), np.round(age))
    child = age < 16
    gender = _choice(rng, ["Female", "Male", "Other"], [0.586, 0.4138, 0.0002], n)
    married_p = np.where(child, 0.0, _sigmoid((age - 30.0) / 5.0) * 0.9)
    married = np.where(rng.random(n) < married_p, "Yes", "No")
    work_adult = _choice(
        rng, ["Private", "Self-employed", "Govt_job", "Never_worked"], [0.64, 0.2, 0.155, 0.005], n
    )
    work = np.where(child, "children", work_adult)
    residence = _choice(rng, ["Urban", "Rural"], [0.51, 0.49], n)
    hypertension = (rng.random(n) < _sigmoid(-5.2 + 0.055 * age)).astype(int)
    heart = (rng.random(n) < _sigmoid(-7.0 + 0.065 * age)).astype(int)
    diabetic = rng.random(n) < _sigmoid(-4.5 + 0.04 * age)
    glucose = np.where(diabetic, rng.normal(205.0, 35.0, n), rng.lognormal(np.log(90.0), 0.17, n))
    glucose = np.round(np.clip(glucose, 55.0, 272.0), 2)
    bmi = np.where(
        age < 18, rng.normal(16.0 + 0.5 * age, 3.0, n), rng.normal(29.5 + 0.04 * age, 6.5, n)
    )
    bmi = np.round(np.clip(bmi, 10.3, 97.6), 1)
    smoking_adult = _choice(
        rng, ["never smoked", "Unknown", "formerly smoked", "smokes"], [0.42, 0.2, 0.2, 0.18], n
    )
    smoking_child = _choice(rng, ["Unknown", "never smoked"], [0.85, 0.15], n)
    smoking = np.where(child, smoking_child, smoking_adult)

    # Ground truth. Missingness of BMI depends on the outcome-relevant risk, as in the real
    # data (where strokes are 4x as common among rows with N/A BMI).
    score = (
        0.065 * age
        + 0.45 * hypertension
        + 0.4 * heart
        + 0.004 * (glucose - 100.0)
        + 0.25 * (smoking == "smokes")
        + 0.1 * (smoking == "formerly smoked")
    )
    bmi_missing = rng.random(n) < _sigmoid(-4.2 + 0.02 * age + 0.6 * hypertension)
    score = score + 0.8 * bmi_missing
    score = score + rng.normal(0.0, 0.8, n)  # unobserved risk factors
    b0 = _solve_intercept(score, prevalence)
    stroke = (rng.random(n) < _sigmoid(score + b0)).astype(int)

    ids = rng.choice(np.arange(1, 73000), size=n, replace=False)
    frame = pd.DataFrame(
        {
            "id": ids.astype(str),
            "gender": gender,
            "age": [f"{a:g}" for a in age],
            "hypertension": hypertension.astype(str),
            "heart_disease": heart.astype(str),
            "ever_married": married,
            "work_type": work,
            "Residence_type": residence,
            "avg_glucose_level": [f"{g:.2f}" for g in glucose],
            "bmi": np.where(bmi_missing, "N/A", [f"{b:.1f}" for b in bmi]),
            "smoking_status": smoking,
            "stroke": stroke.astype(str),
        },
        columns=list(STROKE_COLUMNS),
    )
    return frame


def write_demo_hospitals(
    out_dir: str | Path,
    n_per_hospital: Sequence[int] = (1800, 1700, 1600),
    seed: int = 42,
    prevalence: Sequence[float] = DEMO_PREVALENCE,
) -> dict[str, Path]:
    """Write SYNTHETIC ``hospital-a.csv``, ``hospital-b.csv``, ``hospital-c.csv`` to ``out_dir``.

    Label skew: hospital i has ``prevalence[i]`` strokes (default 3 %, 5 %, 8 %). Returns
    ``{hospital name: path}``.
    """
    if len(n_per_hospital) != len(DEMO_HOSPITALS) or len(prevalence) != len(DEMO_HOSPITALS):
        raise ValueError(f"need {len(DEMO_HOSPITALS)} sizes and prevalences")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for i, (name, n, prev) in enumerate(
        zip(DEMO_HOSPITALS, n_per_hospital, prevalence, strict=True)
    ):
        path = out / f"{name}.csv"
        synthetic_stroke(n, seed + 1000 * i, prev).to_csv(path, index=False)
        paths[name] = path
    return paths


def split_real_stroke(
    csv_path: str | Path,
    out_dir: str | Path,
    seed: int = 42,
    positive_shares: Sequence[float] = REAL_POSITIVE_SHARES,
) -> dict[str, Path]:
    """Split the real Kaggle stroke CSV into three hospitals with a label skew.

    Negatives are shuffled and split into three equal parts; positives are shuffled and
    split by ``positive_shares`` (default 50 % / 30 % / 20 %), giving hospitals of ~1,700
    patients with roughly 7 %, 4.5 % and 3 % strokes. Rows are written unchanged (``N/A``
    and ``id`` included). Deterministic for a given ``seed``.
    """
    if len(positive_shares) != len(DEMO_HOSPITALS) or abs(sum(positive_shares) - 1.0) > 1e-9:
        raise ValueError("positive_shares needs one share per hospital, summing to 1")
    df = load_table(str(csv_path), "csv")
    if "stroke" not in df.columns:
        raise DataError(f"{csv_path}: no 'stroke' column")
    rng = np.random.default_rng(seed)
    positives = rng.permutation(np.flatnonzero(df["stroke"].str.strip() == "1"))
    negatives = rng.permutation(np.flatnonzero(df["stroke"].str.strip() != "1"))
    cuts = np.round(np.cumsum(positive_shares)[:-1] * len(positives)).astype(int)
    pos_parts = np.split(positives, cuts)
    neg_parts = np.array_split(negatives, len(DEMO_HOSPITALS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, pos, neg in zip(DEMO_HOSPITALS, pos_parts, neg_parts, strict=True):
        rows = np.sort(np.concatenate([pos, neg]))
        path = out / f"{name}.csv"
        df.iloc[rows].to_csv(path, index=False)
        paths[name] = path
    return paths
