"""Shared test fixtures: the real Kaggle stroke file, when this machine has it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STROKE_CSV = REPO.parent / "shared" / "data" / "stroke" / "healthcare-dataset-stroke-data.csv"


@pytest.fixture
def stroke_csv() -> Path:
    """The real Kaggle stroke data; the test is skipped, saying why, when it is absent."""
    if not STROKE_CSV.is_file():
        pytest.skip(f"real stroke data not found at {STROKE_CSV} (it lives beside the repo)")
    return STROKE_CSV
