"""Fixtures of the operator's integration tests (see tests/integration/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.helpers import FakeServer


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A stand-in for the run server's status port (the operator is pointed at its URL)."""
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
