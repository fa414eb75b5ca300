"""Flower's SuperNode, with its idle poll made adaptive (:data:`IDLE_POLL_S` backing off to
Flower's 3 s), its reply check shortened to :data:`REPLY_POLL_S` and its heartbeat to
:data:`HEARTBEAT_S`.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none it
sleeps a hard-coded 3 s before asking again (``start_client_internal``); once a message
is handled it checks for the reply every 0.5 s. Neither is a setting. In a federated
round the server waits for its slowest hospital, so each round paid up to 3 s (about
2.3 s on average for 3 hospitals) in that sleep, and again in the reply check: more than
the training itself on the demo.

Here the first idle wait after a message is :data:`IDLE_POLL_S` and each further one
:data:`IDLE_GROWTH` times longer, up to Flower's 3 s (:data:`IDLE_MAX_S`): a hospital
that just replied asks again within a fraction of a second, when the next round is
likely, while one that waits for others to join (minutes, with many hospitals) asks
every 3 s, as stock Flower does. A constant short poll made every idle hospital a few
requests a second: 24 hospitals on one small server overloaded its SuperLink
(docs/benchmarks.md).

The SuperNode also tells the SuperLink to expect a heartbeat every 30 s (a constant), and
the SuperLink holds a node online for two intervals after its last one, refusing a new
SuperNode with the same key until then: a restarted hospital waited about 60 s to rejoin.
At :data:`HEARTBEAT_S` (10 s, the least the SuperLink accepts) that is about 20 s, for one
small request every 4 s or so.

``python -m fedrun_trainer.supernode ARGS`` runs Flower's own ``flower-supernode`` with
``ARGS``; the only changes are the ``time`` module its loop sees (:class:`PollClock`, whose
``sleep`` maps those two waits), and the heartbeat interval its connection and heartbeat
sender read. Like the warm executor, it relies on Flower's internals: flwr is pinned
exactly and :func:`check_hook` (run at start and by the tests) refuses any other version
or a loop that no longer sleeps those amounts.
"""

from __future__ import annotations

import inspect
import sys
import time
from types import ModuleType
from typing import Any

from fedrun_trainer.common import flwr_env

PINNED_FLWR = "1.41.0"
#: Flower's idle wait and reply check, as its loop calls ``time.sleep``.
FLOWER_IDLE_S = 3
FLOWER_REPLY_S = 0.5
#: Seconds before the first request of an idle SuperNode after it handled a message.
IDLE_POLL_S = 0.1
#: Each further idle wait is this many times the one before...
IDLE_GROWTH = 1.25
#: ...up to Flower's own idle wait.
IDLE_MAX_S = float(FLOWER_IDLE_S)
#: Seconds between two checks for the ClientApp's reply.
REPLY_POLL_S = 0.05
#: Seconds between the SuperNode's heartbeats as it declares them (Flower's own: 30).
HEARTBEAT_S = 10


class PollClock:
    """The ``time`` module as Flower's SuperNode loop sees it, with its two waits mapped.

    ``sleep(3)`` (no message) waits :data:`IDLE_POLL_S`, growing by :data:`IDLE_GROWTH`
    with each idle poll in a row up to :data:`IDLE_MAX_S`; ``sleep(0.5)`` (a message is
    being handled: the loop waits for its reply) waits :data:`REPLY_POLL_S` and starts the
    idle waits over. Other sleeps are real.
    """

    def __init__(self, real: ModuleType = time) -> None:
        self._real = real
        self._idle_polls = 0

    def wait_for(self, seconds: float) -> float:
        """What Flower's ``sleep(seconds)`` becomes (and the count of idle polls moves)."""
        if seconds == FLOWER_IDLE_S:
            wait = min(IDLE_MAX_S, IDLE_POLL_S * IDLE_GROWTH**self._idle_polls)
            self._idle_polls += 1
            return wait
        if seconds == FLOWER_REPLY_S:
            self._idle_polls = 0
            return REPLY_POLL_S
        return seconds

    def sleep(self, seconds: float) -> None:
        self._real.sleep(self.wait_for(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def check_hook() -> None:
    """Raise ``RuntimeError`` unless Flower's SuperNode loop is the one this was built on."""
    import flwr
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fleet
    from flwr.supernode import start_client_internal as loop

    problems = []
    version = getattr(flwr, "__version__", "")
    if version != PINNED_FLWR:
        problems.append(f"flwr is {version}, fedrun's SuperNode wrapper is for {PINNED_FLWR}")
    source = inspect.getsource(loop)
    for wait in ("time.sleep(3)", "time.sleep(0.5)"):
        if wait not in source:
            problems.append(f"the SuperNode loop no longer calls {wait}")
    if getattr(loop, "time", None) is not time:
        problems.append("the SuperNode loop no longer uses the time module by that name")
    for module in (fleet, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            problems.append(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL")
    if not constant.HEARTBEAT_MIN_INTERVAL <= HEARTBEAT_S <= constant.HEARTBEAT_MAX_INTERVAL:
        problems.append(f"the SuperLink no longer accepts a {HEARTBEAT_S} s heartbeat")
    if problems:
        raise RuntimeError("SuperNode hook check failed: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` with ``argv`` (default: this process's arguments)."""
    check_hook()
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fleet
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    loop.time = PollClock()  # type: ignore[attr-defined,assignment]
    flwr_env.shorten_object_pull_backoff()
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # type: ignore[attr-defined,misc]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # type: ignore[attr-defined,misc]
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
