"""Settings shared by every benchmark part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.benchmarks.localrun import EXAMPLE, REPO

__all__ = ["DEFAULT_STROKE_CSV", "BenchSettings", "PartResult"]

#: The seed plan's Kaggle stroke data, beside the repository (not part of it).
DEFAULT_STROKE_CSV = (
    REPO.parent / "shared" / "data" / "stroke" / "healthcare-dataset-stroke-data.csv"
)


@dataclass(frozen=True)
class BenchSettings:
    """How to run the parts.

    ``quick`` shrinks every part to a smoke test (2 rounds, a few optimizer steps);
    ``work`` holds data, run outputs and logs; ``invocation`` is the benchmark command
    that reproduces one part, without its ``--only`` flag.
    """

    quick: bool
    work: Path
    invocation: str
    example: Path = EXAMPLE
    stroke_csv: Path = DEFAULT_STROKE_CSV
    split_seed: int = 7

    @property
    def rounds(self) -> int | None:
        """Rounds to run instead of the example's (None: as the example says)."""
        return 2 if self.quick else None

    def reproduce(self, part: str) -> str:
        """The command that re-runs ``part`` alone."""
        return f"{self.invocation} --only {part}"


@dataclass(frozen=True)
class PartResult:
    """A part's section title and markdown body (tables, notes, how to reproduce)."""

    title: str
    body: str
