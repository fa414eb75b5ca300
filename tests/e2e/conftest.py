"""Helpers for end-to-end runs: real Flower processes started by fedrun's local runner."""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from fedrun_core.api import FederatedRun, parse_run
from fedrun_local.runner import LocalCluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "federatedrun-local.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _flower_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # The venv's executables (fedrun, flower-*) must be found by the runner's children.
    bindir = str(Path(os.sys.executable).parent)  # type: ignore[attr-defined]
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def example_run(**spec_updates: Any) -> dict[str, Any]:
    """The demo FederatedRun as a dict, with top-level spec fields replaced."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc = copy.deepcopy(doc)
    doc["spec"].update(spec_updates)
    return doc


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], LocalCluster]]:
    """Build LocalClusters under tmp_path; every process is stopped at the end of the test."""
    made: list[LocalCluster] = []

    def make(doc: dict[str, Any]) -> LocalCluster:
        run: FederatedRun = parse_run(doc)
        cluster = LocalCluster.create(run, tmp_path / f"out-{len(made)}")
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        if os.environ.get("FEDRUN_KEEP_E2E") is None:
            shutil.rmtree(cluster.out / "pods", ignore_errors=True)


T = TypeVar("T")


def wait_for(what: str, condition: Callable[[], T | None], timeout_s: float) -> T:
    """Poll ``condition`` every 0.2 s until it returns something truthy; that value.

    Raises AssertionError naming ``what`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
