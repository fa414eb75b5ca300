"""Real stroke records exported the way real hospitals export them (tests and the bench).

The real Kaggle table split into four hospitals (stratified), each with one defect:

- ``hospital-a``: 20 % of ``avg_glucose_level`` cells empty;
- ``hospital-b``: ``gender`` written ``Male``, ``male `` or ``M`` (and so on for ``Female``);
- ``hospital-c``: exported with ``?`` for every missing value;
- ``hospital-d``: an extra free-text column, and the columns in another order.

``STRICT`` is the stroke preset's feature list as a spec's (every defect but ``?`` is an
error under it); ``DECLARED`` adds the policies that take the defects in (impute glucose
with an indicator, aliases for gender).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrun_core.schema import STROKE_FEATURES
from fedrun_trainer.common.data import load_table

__all__ = ["DECLARED", "HOSPITALS", "STRICT", "MessyHospitals", "write_messy_hospitals"]

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


def _features(**changes: dict[str, Any]) -> list[dict[str, Any]]:
    """The stroke preset's features as a spec's list, with some fields changed."""
    out = []
    for feature in STROKE_FEATURES:
        item = feature.model_dump(by_alias=True, exclude_defaults=True)
        item.update(changes.get(feature.name, {}))
        out.append(item)
    return out


STRICT = _features()  # bmi imputed as the preset does; everything else must be there
DECLARED = _features(
    avg_glucose_level={"missing": "impute", "fill": 90.0, "indicator": True},
    gender={"aliases": {"M": "Male", "F": "Female"}},
)


@dataclass(frozen=True)
class MessyHospitals:
    """The files written and what was injected into them."""

    paths: dict[str, Path]
    glucose_gap_lines: list[int]  # lines of hospital-a's file (header = line 1)
    question_marks: int  # cells of hospital-c written "?" instead of "N/A"
    rows: dict[str, int]


def write_messy_hospitals(stroke_csv: Path, out: Path, inject: bool = True) -> MessyHospitals:
    """Split the real table into four hospitals under ``out``, each with its defect
    (``inject=False``: the same rows, unchanged)."""
    out.mkdir(parents=True, exist_ok=True)
    df = load_table(str(stroke_csv), "csv").reset_index(drop=True)
    rng = np.random.default_rng(11)
    positive = df["stroke"].str.strip() == "1"
    pairs = zip(
        np.array_split(rng.permutation(np.flatnonzero(positive)), 4),
        np.array_split(rng.permutation(np.flatnonzero(~positive)), 4),
        strict=True,
    )
    parts = [np.sort(np.concatenate(pair)) for pair in pairs]
    frames = {
        name: df.iloc[rows].reset_index(drop=True)
        for name, rows in zip(HOSPITALS, parts, strict=True)
    }
    a = frames["hospital-a"]
    gaps = np.sort(rng.choice(len(a), size=len(a) // 5, replace=False))
    c = frames["hospital-c"]
    question_marks = int((c == "N/A").to_numpy().sum())
    if inject:
        a.loc[gaps, "avg_glucose_level"] = ""
        b = frames["hospital-b"]
        spellings = {"Male": ["Male", "male ", "M"], "Female": ["Female", " female", "F"]}
        b["gender"] = [
            rng.choice(spellings[g]) if g in spellings else g for g in b["gender"].str.strip()
        ]
        frames["hospital-c"] = c.replace("N/A", "?")
        d = frames["hospital-d"]
        d["notes"] = [f"seen by clinic {i % 7}, visit {i}" for i in range(len(d))]
        frames["hospital-d"] = d[list(reversed(d.columns))]
    paths = {}
    for name, frame in frames.items():
        paths[name] = out / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    return MessyHospitals(
        paths=paths,
        glucose_gap_lines=[int(i) + 2 for i in gaps] if inject else [],
        question_marks=question_marks if inject else 0,
        rows={name: len(frame) for name, frame in frames.items()},
    )
