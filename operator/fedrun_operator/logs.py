"""Logging for every fedrun process: JSON lines in pods, plain text at a terminal.

JSON records carry ``run``, ``hospital`` and ``round`` when the process knows them
(from the FEDRUN_RUN / FEDRUN_HOSPITAL environment or a record's ``extra``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

_FIELDS = ("run", "hospital", "round")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the run's fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        env = {"run": os.environ.get("FEDRUN_RUN"), "hospital": os.environ.get("FEDRUN_HOSPITAL")}
        # kopf's per-object loggers name the object they log about (the operator's lines).
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("kind") == "FederatedRun":
            env["run"] = ref.get("name")
            if ref.get("namespace"):
                payload["namespace"] = ref["namespace"]
        for key in _FIELDS:
            value = getattr(record, key, None) or env.get(key)
            if value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
