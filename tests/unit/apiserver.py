"""The API server stand-in now lives in tests/apiserver.py (shared with tests/kube/)."""

from __future__ import annotations

from ..apiserver import prune_nulls, to_jsonschema

__all__ = ["prune_nulls", "to_jsonschema"]
