"""Shared test fixtures: the real Kaggle stroke file, when this machine has it; an emulated
Kubernetes API server (tests/kube/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.kube.cluster import EmulatedCluster

REPO = Path(__file__).resolve().parents[1]
STROKE_CSV = REPO.parent / "shared" / "data" / "stroke" / "healthcare-dataset-stroke-data.csv"


@pytest.fixture
def stroke_csv() -> Path:
    """The real Kaggle stroke data; the test is skipped, saying why, when it is absent."""
    if not STROKE_CSV.is_file():
        pytest.skip(f"real stroke data not found at {STROKE_CSV} (it lives beside the repo)")
    return STROKE_CSV


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    """A fresh emulated Kubernetes API server (tests/kube/cluster.py) for this test.

    Its kubeconfig is `cluster.kubeconfig`; nothing global is set.
    """
    from tests.kube.cluster import EmulatedCluster  # kmock and aiohttp only when used

    with EmulatedCluster(tmp_path / "kube") as running:
        yield running
