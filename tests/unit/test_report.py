"""The run's PNG report: written, non-empty, a real PNG, even with missing figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from fedrun_core.schema import ColumnCounts, DataCounts
from fedrun_local.plot import plot_report
from fedrun_local.report import data_counts_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def coloured_pixels(path: Path) -> int:
    """Pixels that are clearly not white, grey or black: the plotted curves and lines."""
    rgb = imread(path)[..., :3]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return int(np.count_nonzero(spread > 0.3))


def sample_history() -> dict[str, Any]:
    rounds = []
    for r in (1, 2, 3):
        rounds.append(
            {
                "round": r,
                "durationSeconds": 2.5,
                "hospitalsTrained": ["hospital-a", "hospital-b"],
                "trainLoss": 0.6 - 0.05 * r,
                # The last round's evaluation can be missing (a run that stopped early).
                "evaluation": {"auroc": 0.6 + 0.05 * r, "loss": 0.5} if r < 3 else {},
                "hospitalEvaluation": {
                    "hospital-a": {"auroc": 0.62 + 0.05 * r},
                    "hospital-b": {"auroc": None},  # one-class test split
                },
                "epsilon": {"hospital-a": 0.3 * r, "hospital-b": 0.28 * r},
            }
        )
    return {"run": "stroke-demo", "phase": "Succeeded", "targetEpsilon": 1.0, "rounds": rounds}


@pytest.mark.parametrize(
    "status",
    [{"phase": "Succeeded", "privacy": {"targetEpsilon": 1.0}}, {"phase": "Failed"}],
    ids=["with-privacy", "without-privacy"],
)
def test_plot_report_writes_a_png(tmp_path: Path, status: dict[str, Any]) -> None:
    path = tmp_path / "nested" / "report.png"
    assert plot_report(sample_history(), status, path) == path
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert imread(path).shape[:2] == (462, 1210)  # 11 x 4.2 inches at 110 dpi
    assert coloured_pixels(path) > 1_000  # curves were drawn, not just axes


@pytest.mark.filterwarnings("ignore:No artists with labels found:UserWarning")
def test_plot_report_of_a_run_without_rounds(tmp_path: Path) -> None:
    path = plot_report({"run": "r", "rounds": []}, {}, tmp_path / "empty.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert coloured_pixels(path) < 100  # axes only: the check above can tell the difference


def test_data_counts_table_rows() -> None:
    status = {
        "hospitals": [
            {"name": "a", "state": "Done"},  # reported nothing: no row
            {
                "name": "b",
                "data": DataCounts(
                    100, 90, 10, (ColumnCounts("bmi", 12, imputed=2, dropped=10),)
                ).to_status(),
            },
            {"name": "c", "data": DataCounts(50, 50, 0).to_status()},
        ]
    }
    assert data_counts_rows(status) == [
        ["b", "100", "90", "10", "bmi: 12 missing, 2 imputed, 10 dropped"],
        ["c", "50", "50", "0", "-"],
    ]
