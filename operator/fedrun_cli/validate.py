"""``fedrun validate FILE...``: would a cluster with fedrun's chart accept these objects?

Each FederatedRun and PrivacyBudget in the files (multi-document YAML is fine; documents of
other kinds are listed as skipped) is checked twice:

- as kube-apiserver would check it (``fedrun_render.admission``): the generated CRD's
  OpenAPI schema with strict field validation, its defaults, and every CEL rule;
- as fedrun itself parses it (``fedrun_core.api``, ``fedrun_core.budgets``): the same rules
  from their Python side, plus the checks CEL cannot express (categories unique after
  normalisation, alias targets).

Nothing is sent anywhere: no cluster is needed. Exit code 0 when every run passes both;
1 when any file holds an invalid run, cannot be read or is not YAML, or when no file holds
a run at all (a file without one, e.g. an Argo CD Application beside the runs, is listed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from fedrun_core import names as c
from fedrun_core.api import SpecError, parse_run, yaml_problem
from fedrun_core.budgets import PrivacyBudget

__all__ = ["problems_in", "validate_files"]


KINDS = (c.KIND, c.BUDGET_KIND)


def _kind(doc: Any) -> str | None:
    """The fedrun kind of a document (FederatedRun, PrivacyBudget), None for anything else."""
    if not isinstance(doc, dict) or str(doc.get("apiVersion", "")).split("/")[0] != c.GROUP:
        return None
    kind = doc.get("kind")
    return kind if kind in KINDS else None


def _describe(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"a {type(doc).__name__}"
    name = (
        (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    )
    return f"{doc.get('kind', 'an object without kind')} {name or '(no name)'}"


def _budget_admission() -> Any:
    from fedrun_render.admission import budget_admission

    return budget_admission()


def problems_in(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(the API server's problems, fedrun's problems) with one FederatedRun or
    PrivacyBudget document.

    Both lists are empty for a valid object. Each problem starts with its field's path.
    """
    from fedrun_render.admission import admit

    if _kind(doc) == c.BUDGET_KIND:
        server = _budget_admission().admit(doc)
        try:
            PrivacyBudget.model_validate(doc)
            return server, []
        except ValidationError as err:
            return server, [
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            ]
    server = admit(doc)
    try:
        parse_run(doc)
        ours: list[str] = []
    except SpecError as err:
        ours = list(err.problems)
    return server, ours


def _check_file(path: Path, out: TextIO) -> tuple[bool, int]:
    """(whether nothing in the file failed, how many fedrun objects it holds)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        out.write(f"{path}: cannot read: {err.strerror or err}\n")
        return False, 0
    except UnicodeDecodeError:
        out.write(f"{path}: cannot read: not UTF-8 text\n")
        return False, 0
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        out.write(f"{path}: {yaml_problem(err)}\n")
        return False, 0
    runs = 0
    ok = True
    for index, doc in enumerate(docs, start=1):
        where = f"{path}" + (f" (document {index})" if len(docs) > 1 else "")
        if _kind(doc) is None:
            out.write(f"{where}: {_describe(doc)}: not a FederatedRun or PrivacyBudget, skipped\n")
            continue
        runs += 1
        server, ours = problems_in(doc)
        if not server and not ours:
            out.write(f"{where}: {_describe(doc)}: valid\n")
            continue
        ok = False
        out.write(f"{where}: {_describe(doc)}: invalid\n")
        if server:
            out.write("  the API server would refuse it:\n")
            out.writelines(f"    {p}\n" for p in server)
        refused = {p.split(":", 1)[0] for p in server}
        only_ours = [p for p in ours if p.split(":", 1)[0] not in refused]
        if only_ours:
            out.write("  fedrun refuses it:\n")
            out.writelines(f"    {p}\n" for p in only_ours)
    if runs == 0:
        out.write(f"{path}: no FederatedRun or PrivacyBudget in it\n")
    return ok, runs


def validate_files(files: Sequence[str], out: TextIO | None = None) -> int:
    """Check every FederatedRun and PrivacyBudget in ``files``; print one verdict per object;
    0 if all are valid.

    Returns 2 (and prints why) when the API server's side cannot run here, because the
    `validate` extra (jsonschema, cel-python) is not installed.
    """
    out = out or sys.stdout
    try:
        import fedrun_render.admission  # noqa: F401  (the extra's libraries, checked once)
    except ImportError as err:
        sys.stderr.write(
            f"fedrun validate: the API server's checks need {err.name}: "
            "pip install 'fedrun[validate]'\n"
        )
        return 2
    results = [_check_file(Path(f), out) for f in files]
    if not any(runs for _, runs in results):
        out.write("no FederatedRun or PrivacyBudget found: nothing was validated\n")
        return 1
    return 0 if all(ok for ok, _ in results) else 1
