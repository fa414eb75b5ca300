"""JSON log lines carry the run (and namespace) they are about."""

from __future__ import annotations

import json
import logging

import pytest

from fedrun_core.logs import JsonFormatter


def _line(**extra: object) -> dict[str, object]:
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "Timer ok", (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_a_kopf_object_line_names_the_run_and_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDRUN_RUN", raising=False)
    ref = {"kind": "FederatedRun", "name": "stroke", "namespace": "fedrun", "uid": "u"}
    line = _line(k8s_ref=ref)
    assert line["run"] == "stroke" and line["namespace"] == "fedrun"
    assert line["message"] == "Timer ok" and line["level"] == "info"


def test_pod_lines_take_run_and_hospital_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDRUN_RUN", "stroke")
    monkeypatch.setenv("FEDRUN_HOSPITAL", "hospital-a")
    line = _line(round=3)
    assert (line["run"], line["hospital"], line["round"]) == ("stroke", "hospital-a", 3)
    assert "namespace" not in line
