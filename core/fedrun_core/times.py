"""Times as Kubernetes writes them: RFC 3339, UTC, second precision (``2026-12-03T19:46:55Z``).

Every ``.status`` time (``startTime``, ``completionTime``, a condition's
``lastTransitionTime``) and every certificate expiry annotation uses this form.
"""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(t: datetime) -> str:
    """``t`` (an aware UTC time) in Kubernetes' time format."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    """The current time in Kubernetes' time format."""
    return rfc3339(datetime.now(UTC))


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from a status (``Z`` or an offset), or None for an empty value."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
