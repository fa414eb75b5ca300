"""Runs owned by Argo CD are trained once (docs/gitops.md, "Runs in Git").

Argo CD's automated sync applies every manifest of the Application again whenever Git
moves on (a new commit), `selfHeal: false` or not, and creates whatever is missing. A run
deleted in the cluster (by its ttlSecondsAfterFinished, or by hand while its file is still
in Git) would come back as a new object, with a new uid and so a fresh privacy ledger, and
be trained again. The example's mechanism: runs in Git carry no ttlSecondsAfterFinished,
so a finished run stays in the cluster (in sync, nothing to create), and the operator never
trains a run whose phase is final, even when a sync applies an edited spec to it. These
tests check both halves: the example's files and sync policy, and the operator's decision
(`fedrun_operator.status.decide`, the function every reconcile goes through).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core.accounting import epsilon
from fedrun_core.api import FederatedRun, parse_run
from fedrun_core.states import FINAL_PHASES, Phase
from fedrun_core.times import rfc3339
from fedrun_operator.status import Observation, decide

ROOT = Path(__file__).resolve().parents[2]
APPLICATIONS = ROOT / "examples" / "argocd" / "application.yaml"
T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def runs_application() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(APPLICATIONS.read_text(encoding="utf-8")) if d]
    apps: list[dict[str, Any]] = [
        d for d in docs if d["kind"] == "Application" and d["metadata"]["name"] == "fedrun-runs"
    ]
    assert len(apps) == 1
    return apps[0]


def synced_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every document Argo CD's directory source of fedrun-runs applies, with its file."""
    source = runs_application()["spec"]["source"]
    directory = source.get("directory", {})
    root = ROOT / source["path"]
    pattern = directory.get("include", "*.yaml")
    # Argo CD reads subdirectories only with `recurse: true`.
    files = sorted(root.rglob(pattern) if directory.get("recurse") else root.glob(pattern))
    assert files, f"the Application syncs no file ({source['path']}/{pattern})"
    return [
        (path, doc)
        for path in files
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]


def test_runs_in_git_carry_no_ttl() -> None:
    runs = [(path, doc) for path, doc in synced_documents() if doc["kind"] == "FederatedRun"]
    assert runs
    for path, doc in runs:
        assert "ttlSecondsAfterFinished" not in doc["spec"], (
            f"{path.relative_to(ROOT)}: a run Argo CD syncs must not expire: once its TTL "
            "deleted it, the next automated sync would create and train it again"
        )
        assert parse_run(doc).spec.ttl_seconds_after_finished is None


def test_runs_sync_policy_never_recreates_a_run() -> None:
    policy = runs_application()["spec"]["syncPolicy"]
    # prune: a run removed from Git is kept (deleting it is a deliberate act); selfHeal:
    # a run deleted in the cluster is not re-created at once (the next commit would).
    assert policy["automated"] == {"prune": False, "selfHeal": False}
    # Replace=true and Force=true delete and create objects that differ: a run created
    # again is a new run (new uid, new ledger) and trains again.
    options = set(policy.get("syncOptions", []))
    assert not options & {"Replace=true", "Force=true"}
    for _, doc in synced_documents():
        annotation = doc["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-options")
        assert not annotation or not {"Replace=true", "Force=true"} & {
            o.strip() for o in annotation.split(",")
        }


def git_run(**spec: Any) -> FederatedRun:
    """The run fedrun-runs syncs, as the API server stores it (generation 1, a uid)."""
    doc = next(d for _, d in synced_documents() if d["kind"] == "FederatedRun")
    body: dict[str, Any] = yaml.safe_load(yaml.safe_dump(doc))
    body["metadata"].update(generation=1, uid="6f1c2e0a-3b4d-4e5f-8a9b-0c1d2e3f4a5b")
    body["spec"].update(spec)
    return parse_run(body)


def finished(phase: str) -> dict[str, Any]:
    return {
        "phase": phase,
        "startTime": rfc3339(T0 - timedelta(hours=2)),
        "completionTime": rfc3339(T0),
        "round": {"current": 20, "total": 20},
        "observedGeneration": 1,
    }


@pytest.mark.parametrize("phase", sorted(FINAL_PHASES))
def test_a_finished_run_without_ttl_stays(phase: str) -> None:
    run = git_run()
    for later in (timedelta(days=7), timedelta(days=3650)):
        decision = decide(run, finished(phase), Observation(now=T0 + later), epsilon)
        assert not decision.delete_run
        assert decision.status == finished(phase)


def test_the_same_run_with_a_ttl_would_be_deleted() -> None:
    # What the example used to carry: the operator deletes the run after a week, and
    # Argo CD's next sync would then create it again.
    run = git_run(ttlSecondsAfterFinished=604800)
    decision = decide(
        run, finished(Phase.SUCCEEDED), Observation(now=T0 + timedelta(days=7)), epsilon
    )
    assert decision.delete_run


@pytest.mark.parametrize("phase", sorted(FINAL_PHASES))
def test_a_sync_that_edits_a_finished_run_trains_nothing(phase: str) -> None:
    # A commit changes the run's file after it finished (more rounds, a looser target);
    # Argo CD applies it, the API server bumps the generation (the spec is immutable only
    # while Running). The run stays final and stopped: no round, no ε.
    edited = git_run(rounds=40, privacy={"enabled": True, "targetEpsilon": 4.0})
    body = edited.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"]["generation"] = 2
    edited = parse_run(body)
    prev = finished(phase)
    decision = decide(edited, prev, Observation(now=T0 + timedelta(hours=1)), epsilon)
    assert decision.status == prev
    assert decision.stop
    assert not decision.events
    assert not decision.delete_run
