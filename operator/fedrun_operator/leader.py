"""Leader election on a ``coordination.k8s.io/v1`` Lease: of the operator's replicas, only
the one holding the Lease runs kopf and reconciles; the others wait as standbys.

The algorithm is client-go's (``k8s.io/client-go/tools/leaderelection``), which every
Kubernetes controller manager uses:

- A standby reads the Lease every ``retry_seconds``. It never trusts the times written in
  the Lease (another node's clock): it notes, on its own monotonic clock, when it last saw
  the Lease change, and takes it over only when nobody has changed it for the holder's
  ``leaseDurationSeconds``, or at once when the Lease has no holder (released). The take-over
  is an update with the ``resourceVersion`` it read, so of two standbys racing, exactly one
  wins (the other gets 409).
- The holder renews every ``retry_seconds``. A watchdog thread ends the process
  (:data:`LOST_EXIT_CODE`) once ``renew_deadline_seconds`` have passed since the start of
  the last renewal that succeeded, even if the event loop is stuck; a renewal that finds
  another holder ends it at once. Since a standby counts from when it *saw* that renewal,
  which is later, and waits the longer ``lease_seconds``, the old holder is gone (with the
  handlers it was running) at least ``lease_seconds - renew_deadline_seconds`` before a
  standby may take over.
- On a clean stop (SIGTERM) the holder first stops kopf, then releases the Lease (clears
  its holder), so a standby takes over within ``retry_seconds`` instead of waiting for the
  Lease to expire.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedrun_operator import metrics
from fedrun_operator.kube import ApiError, ConflictError, Credentials, Kube

log = logging.getLogger("fedrun.operator.leader")

LEASE_API = "coordination.k8s.io/v1"
#: The exit status of a holder that lost its Lease (could not renew it in time, or found
#: another holder): the kubelet restarts the container, which comes back as a standby.
LOST_EXIT_CODE = 3


@dataclass(frozen=True)
class Timings:
    """How long a Lease lasts unrenewed, how long its holder keeps trying to renew it before
    it stops, and how often both sides try. Defaults are client-go's (15 s, 10 s, 2 s)."""

    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError(
                "leader election needs 0 < retry < renew deadline < lease duration, got "
                f"{self.retry_seconds}, {self.renew_deadline_seconds}, {self.lease_seconds}"
            )

    @property
    def takeover_bound_seconds(self) -> float:
        """The longest a standby takes to hold the Lease after the holder died without
        releasing it: it may see the last renewal up to one retry late, counts the lease
        duration from there, and notices the expiry at its next try."""
        return self.lease_seconds + 2 * self.retry_seconds


def identity(pod_name: str | None) -> str:
    """This process's identity in the Lease: the pod's name (else the host name) and a random
    suffix, so that a restarted container is a new holder that never trusts its old self."""
    return f"{pod_name or socket.gethostname()}_{secrets.token_hex(4)}"


def micro_time() -> str:
    """Now as a Lease's MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Competes for one Lease; :meth:`acquire` returns once this process holds it.

    `credentials` is called for the API's address and credentials, again after a 401 (a
    ServiceAccount token the kubelet rotated). `clock` is monotonic seconds.
    """

    def __init__(
        self,
        credentials: Callable[[], Credentials],
        namespace: str,
        name: str,
        holder: str,
        timings: Timings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.timings = timings
        self._credentials = credentials
        self._clock = clock
        self._kube: Kube | None = None
        # What this process last saw of the Lease, and when (on its own clock).
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        # Start of the last renewal that succeeded (monotonic), read by the watchdog.
        self._renewed_at: float | None = None
        self._watchdog_stop = threading.Event()

    @property
    def is_leader(self) -> bool:
        """Whether this process holds the Lease (as of its last successful try)."""
        return self._renewed_at is not None

    def _client(self) -> Kube:
        if self._kube is None:
            # No retries inside a request: the loops try again every retry period, and a
            # request never outlasts half the renew deadline.
            self._kube = Kube(
                self._credentials(),
                retries=0,
                timeout_s=self.timings.renew_deadline_seconds / 2,
            )
        return self._kube

    async def close(self) -> None:
        """Close the HTTP session (the Lease is left as it is: see :meth:`release`)."""
        if self._kube is not None:
            await self._kube.close()

    async def _call(self, method: str, path: str, verb: str, body: Any = None) -> Any:
        kube = self._client()
        try:
            return await kube.request(verb, method, path, body)
        except ApiError as err:
            if err.status == 401:  # a rotated token: log in again on the next try
                await kube.close()
                self._kube = None
            raise

    def _path(self, name: bool = True) -> str:
        base = f"/apis/{LEASE_API}/namespaces/{self.namespace}/leases"
        return f"{base}/{self.name}" if name else base

    async def try_acquire_or_renew(self) -> bool:
        """One try: True when this process holds the Lease afterwards. Raises the API's
        errors but 409 (another process wrote the Lease first: False)."""
        started = self._clock()
        try:
            lease: dict[str, Any] | None = await self._call("GET", self._path(), "get")
        except ApiError as err:
            if err.status != 404:
                raise
            lease = None
        now = micro_time()
        duration = max(1, math.ceil(self.timings.lease_seconds))
        if lease is None:
            body = {
                "apiVersion": LEASE_API,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.holder,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                created = await self._call("POST", self._path(name=False), "create", body)
            except ConflictError:
                return False
            self._held(created, started)
            return True
        spec: dict[str, Any] = lease.get("spec") or {}
        current = spec.get("holderIdentity") or ""
        version = lease["metadata"]["resourceVersion"]
        record = (current, spec.get("renewTime"), version)
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        if current and current != self.holder:
            if self._renewed_at is not None:
                return False  # taken over while this process thought it held it
            # The holder's own lease duration counts, not this process's setting.
            held_for = float(spec.get("leaseDurationSeconds") or self.timings.lease_seconds)
            if self._clock() - self._observed_at < held_for:
                return False
        transitions = int(spec.get("leaseTransitions") or 0)
        new_spec = dict(spec)
        new_spec.update(holderIdentity=self.holder, leaseDurationSeconds=duration, renewTime=now)
        if current != self.holder:
            new_spec.update(acquireTime=now, leaseTransitions=transitions + 1)
        body = {**lease, "spec": new_spec}
        try:
            updated = await self._call("PUT", self._path(), "update", body)
        except ConflictError:
            return False
        self._held(updated, started)
        return True

    def _held(self, lease: dict[str, Any], started: float) -> None:
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        self._observed = (spec.get("holderIdentity"), spec.get("renewTime"), version)
        self._observed_at = self._clock()
        if self._renewed_at is None:
            log.info("leading: holds Lease %s/%s as %s", self.namespace, self.name, self.holder)
            metrics.LEADER.set(1)
        self._renewed_at = started

    async def acquire(self) -> None:
        """Wait, as a standby, until this process holds the Lease."""
        log.info("standby: waiting for Lease %s/%s as %s", self.namespace, self.name, self.holder)
        metrics.LEADER.set(0)
        while True:
            try:
                if await self.try_acquire_or_renew():
                    return
            except (ApiError, OSError, TimeoutError) as err:
                log.warning("cannot read or take Lease %s/%s: %s", self.namespace, self.name, err)
            await asyncio.sleep(self.timings.retry_seconds)

    async def keep(self) -> None:
        """Renew the Lease every retry period while this process holds it; never returns
        normally. Ends the process when the Lease is lost (see the module's docstring)."""
        self._start_watchdog()
        while True:
            await asyncio.sleep(self.timings.retry_seconds)
            try:
                held = await self.try_acquire_or_renew()
            except (ApiError, OSError, TimeoutError) as err:
                log.warning("cannot renew Lease %s/%s: %s", self.namespace, self.name, err)
                continue
            if not held:
                _lost(f"Lease {self.namespace}/{self.name} has another holder")

    def _start_watchdog(self) -> None:
        deadline = self.timings.renew_deadline_seconds

        def watch() -> None:
            while not self._watchdog_stop.is_set():
                renewed = self._renewed_at
                if renewed is not None:
                    late = self._clock() - renewed
                    if late >= deadline:
                        _lost(f"Lease not renewed for {late:.1f}s (renew deadline {deadline}s)")
                    wait = deadline - late
                else:
                    wait = self.timings.retry_seconds
                self._watchdog_stop.wait(min(wait, self.timings.retry_seconds) + 0.01)

        threading.Thread(target=watch, name="lease-watchdog", daemon=True).start()

    async def release(self) -> None:
        """Give the Lease up (after kopf has stopped): clear its holder so that a standby
        takes over at its next try. Stops the watchdog; a failure is only logged (the
        Lease then expires by itself)."""
        self._watchdog_stop.set()
        if self._renewed_at is None:
            return
        self._renewed_at = None
        metrics.LEADER.set(0)
        try:
            lease = await self._call("GET", self._path(), "get")
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.holder:
                return
            spec.pop("holderIdentity", None)
            spec.update(leaseDurationSeconds=1, renewTime=micro_time())
            await self._call("PUT", self._path(), "update", {**lease, "spec": spec})
            log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiError, OSError, TimeoutError) as err:
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, err)


def _lost(why: str) -> None:
    """End the process at once: in-flight reconciles must not outlive the Lease."""
    log.critical("lost leadership (%s): exiting so that no second operator acts", why)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(LOST_EXIT_CODE)
