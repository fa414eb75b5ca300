"""Logging for every fedrun process: JSON lines in pods, plain text at a terminal.

JSON lines are written by python-json-logger. Each carries ``time`` (UTC, milliseconds),
``level``, ``logger`` and ``message``, and ``run``, ``hospital`` and ``round`` when the
process knows them (from the FEDRUN_RUN / FEDRUN_HOSPITAL environment or a record's
``extra``). kopf's per-object lines name the run and its ``namespace``.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonLines

from fedrun_core import names as c

_FIELDS = ("run", "hospital", "round")
# kopf's own record attributes: read below, never copied into the line as they are.
_KOPF_ATTRS = ("k8s_ref", "k8s_skip", "settings", "taskName")


class JsonFormatter(_JsonLines):
    """One JSON object per line: time, level, logger, message and the run's fields."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            reserved_attrs=[*RESERVED_ATTRS, *_KOPF_ATTRS],
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """The library's fields, then the time first, the level in lower case, the run's fields."""
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()
        time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields = {"time": time, **log_data}
        log_data.clear()
        log_data.update(fields)
        env = {"run": os.environ.get(c.ENV_RUN), "hospital": os.environ.get(c.ENV_HOSPITAL)}
        # kopf's per-object loggers name the object they log about (the operator's lines).
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("kind") == c.KIND:
            env["run"] = ref.get("name")
            if ref.get("namespace"):
                log_data["namespace"] = ref["namespace"]
        for key in _FIELDS:
            value = getattr(record, key, None) or env.get(key)
            if value is not None:
                log_data[key] = value


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


def setup_app_logging(level: int = logging.INFO) -> None:
    """Give fedrun's loggers a JSON handler of their own in a process Flower started (the
    ServerApp), whose root logger is Flower's and lets only warnings through; idempotent."""
    logger = logging.getLogger("fedrun")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
