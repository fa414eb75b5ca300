"""Peak memory of ``fedrun local``'s pods, sampled from ``/proc`` while a run goes on.

``fedrun local`` starts each pod as its own session and process group (as a container
runtime gives a container its own), so a pod's processes are the processes in the group
of one of its children. A pod's memory is the sum of its processes' proportional set size
(PSS, ``/proc/PID/smaps_rollup``): pages shared between a warm parent and the children it
forked are split among them rather than counted once per process, as summed RSS would.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PodMemory", "PodMemorySampler"]

_PROC = Path("/proc")


@dataclass
class PodMemory:
    """One pod: its leader's command line, the largest PSS sum seen and the largest RSS of
    one of its processes (MiB)."""

    argv: list[str]
    peak_mib: float = 0.0
    peak_process_rss_mib: float = 0.0

    @property
    def role(self) -> str:
        """``server`` or ``hospital``: the pod's ``fedrun`` subcommand (``server``, ``client``)."""
        command = next((a for a in self.argv if a in ("server", "client")), "client")
        return "server" if command == "server" else "hospital"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of ``pid``, or None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)"
    return int(fields[1]), int(fields[2])


def _pss_rss_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of ``pid`` in KiB; zeros if it is gone."""
    found = {"Pss:": 0, "Rss:": 0}
    try:
        for line in (_PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return found["Pss:"], found["Rss:"]


def _argv(pid: int) -> list[str]:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [os.path.basename(a) if i == 0 else a for i, a in enumerate(raw.decode().split("\0"))]


@dataclass
class PodMemorySampler:
    """Samples the pods under ``fedrun local`` (pid ``root``) every ``interval_s``.

    ``start(root)`` begins, ``stop()`` ends; ``pods`` maps each pod leader's pid to its
    :class:`PodMemory`, ``peak_total_mib`` is the largest sum over every pod at once.
    """

    interval_s: float = 0.25
    pods: dict[int, PodMemory] = field(default_factory=dict)
    peak_total_mib: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, root: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, root: int) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample(root)

    def sample(self, root: int) -> None:
        """One sample: every pod's PSS sum now; peaks updated."""
        groups: dict[int, list[int]] = {}
        leaders: set[int] = set()
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = _stat(pid)
            if stat is None:
                continue
            parent, group = stat
            if parent == root and group == pid:
                leaders.add(pid)
            groups.setdefault(group, []).append(pid)
        total = 0.0
        for leader in leaders:
            pod = self.pods.get(leader)
            if pod is None:
                pod = self.pods[leader] = PodMemory(_argv(leader))
            sizes = [_pss_rss_kib(pid) for pid in groups.get(leader, [])]
            mib = sum(pss for pss, _ in sizes) / 1024
            pod.peak_mib = max(pod.peak_mib, mib)
            largest = max((rss for _, rss in sizes), default=0) / 1024
            pod.peak_process_rss_mib = max(pod.peak_process_rss_mib, largest)
            total += mib
        self.peak_total_mib = max(self.peak_total_mib, total)

    def peaks(self, role: str) -> list[float]:
        """Peak PSS MiB of each pod with ``role`` (``server`` or ``hospital``)."""
        return [p.peak_mib for p in self.pods.values() if p.role == role]

    def process_peaks(self, role: str) -> list[float]:
        """Peak RSS MiB of the largest process of each pod with ``role``."""
        return [p.peak_process_rss_mib for p in self.pods.values() if p.role == role]
