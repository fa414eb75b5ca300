"""How a cell of a hospital's table is read: missing markers, category keys, booleans.

Hospitals export the same thing in different ways: ``1`` at one site is ``1.0`` or `` 1 ``
at another, ``Male`` is ``male `` elsewhere, a gap is an empty cell, ``NA`` or ``?``. These
rules say, once, which written forms are the same value, so every hospital reads its own
file into the same model inputs without seeing anyone else's data:

* **Missing.** A cell is missing when it is empty or, trimmed and compared without regard
  to case, one of the run's missing markers (:data:`DEFAULT_MISSING_VALUES` unless the
  spec's ``data.missingValues`` lists others). A value that is one of a categorical
  feature's own categories or aliases is never missing.
* **Categories** match by :func:`category_key`: text is trimmed and compared without regard
  to case; a number compares by value (``1`` = ``1.0`` = `` 01 ``).
* **Booleans** are :data:`TRUE_VALUES` and :data:`FALSE_VALUES` (case-insensitive), or a
  number equal to 1 or 0.

Pure functions on strings: the trainer applies them to whole columns, the CLI's
``fedrun schema infer`` and ``fedrun check`` to the same cells, the API checks the spec's
categories with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "DEFAULT_MISSING_VALUES",
    "FALSE_VALUES",
    "TRUE_VALUES",
    "as_boolean",
    "as_number",
    "category_key",
    "missing_markers",
]

#: What counts as a missing cell unless the spec's ``data.missingValues`` says otherwise
#: (compared trimmed and case-insensitively; an empty cell is always missing).
DEFAULT_MISSING_VALUES: tuple[str, ...] = ("NA", "N/A", "NaN", "null", "None", "?", ".")
#: Written forms of true and false in a boolean feature or the target (case-insensitive).
TRUE_VALUES: tuple[str, ...] = ("true", "yes", "y", "t")
FALSE_VALUES: tuple[str, ...] = ("false", "no", "n", "f")


def missing_markers(configured: Iterable[str] | None) -> frozenset[str]:
    """The run's missing markers as compared: trimmed, case-folded, always with ``""``."""
    markers = DEFAULT_MISSING_VALUES if configured is None else tuple(configured)
    return frozenset({m.strip().casefold() for m in markers} | {""})


def as_number(text: str) -> float | None:
    """``text`` as a finite number, or None (``nan``, ``inf`` and words are not numbers)."""
    cleaned = text.strip()
    # float() reads "1_0" as 10 and full-width digits as numbers; a table's reader does not.
    if not cleaned or "_" in cleaned or not cleaned.isascii():
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def category_key(text: str) -> str:
    """The form two written categories are compared in: a number by value, text trimmed
    and case-folded (``"1"``, ``"1.0"`` and ``" 01 "`` share a key; so do ``"Male"`` and
    ``"male "``)."""
    number = as_number(text)
    if number is not None:
        return f"#{number!r}"
    return text.strip().casefold()


def as_boolean(text: str) -> bool | None:
    """``text`` as a boolean (see :data:`TRUE_VALUES`, a number 1 or 0), or None."""
    number = as_number(text)
    if number is not None:
        return True if number == 1.0 else False if number == 0.0 else None
    word = text.strip().casefold()
    if word in TRUE_VALUES:
        return True
    if word in FALSE_VALUES:
        return False
    return None
