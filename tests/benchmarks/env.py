"""Where and when a measurement was taken: machine, load, package versions, command."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

__all__ = ["Machine", "Provenance", "load_average", "machine", "now_utc", "versions"]

_PACKAGES = ("flwr", "torch", "opacus", "scikit-learn")


@dataclass(frozen=True)
class Machine:
    """The CPU count, CPU model and memory of this machine."""

    cpus: int
    cpu_model: str
    ram_gib: float

    def describe(self) -> str:
        return f"{self.cpus} CPUs ({self.cpu_model}), {self.ram_gib:.1f} GiB RAM"


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gib(meminfo: Path = Path("/proc/meminfo")) -> float:
    try:
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # the figure is in KiB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def machine() -> Machine:
    """This machine: usable CPUs (what ``nproc`` prints), CPU model, total RAM."""
    return Machine(len(os.sched_getaffinity(0)), _cpu_model(), _ram_gib())


def versions() -> dict[str, str]:
    """Python and the versions of the packages whose speed or results we measure."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def now_utc() -> str:
    """The current time, UTC, to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Provenance:
    """What a reader needs to judge and repeat one measurement."""

    command: str
    started: str
    machine: Machine
    versions: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    duration_s: float

    def markdown(self) -> list[str]:
        """Bullet lines for the report."""
        pkgs = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        before = ", ".join(f"{x:.2f}" for x in self.load_before)
        after = ", ".join(f"{x:.2f}" for x in self.load_after)
        return [
            f"- Command: `{self.command}`",
            f"- Date: {self.started} (took {self.duration_s:.0f} s)",
            f"- Machine: {self.machine.describe()}",
            f"- Load average (1, 5, 15 min): {before} before, {after} after",
            f"- Versions: {pkgs}",
        ]
