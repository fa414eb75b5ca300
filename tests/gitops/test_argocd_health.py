"""The Argo CD health check (examples/argocd/health.lua) on sample FederatedRuns.

The script runs as Argo CD runs it: Lua 5.1 (Argo CD embeds gopher-lua, a Lua 5.1), with
only the base, package and table libraries and a cut-down `os` (no `string`, no `math`, no
string methods), and the object in the global `obj`. Samples are built with the operator's
own status models, so they have the shape the operator writes.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core.api import FederatedRunStatus, load_run
from fedrun_core.states import Phase

lupa51 = pytest.importorskip("lupa.lua51", reason="lupa (a dev dependency) is not installed")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "argocd" / "health.lua"
GITOPS_DOC = ROOT / "docs" / "gitops.md"
APPLICATIONS = ROOT / "examples" / "argocd" / "application.yaml"
CM_KEY = "resource.customizations.health.fedrun.io_FederatedRun"

# What Argo CD's runLua opens (util/lua/lua.go): package, base, table and a safe os.
SANDBOX = """
local script, obj = ...
local env = {}
for name, value in pairs(_G) do
  env[name] = value
end
env.string, env.math, env.io, env.debug, env.coroutine = nil, nil, nil, nil, nil
env.os = {time = os.time, date = os.date, clock = os.clock}
env._G = env
env.obj = obj
local chunk = assert(loadstring(script, "=health.lua"))
setfenv(chunk, env)
-- No string library, no string methods ("x"):len() either.
debug.setmetatable("", nil)
return chunk()
"""


def to_lua(lua: Any, value: Any) -> Any:
    """A JSON value as Argo CD hands it to Lua: objects and arrays as tables, null as nil."""
    if isinstance(value, dict):
        table = lua.table()
        for key, item in value.items():
            if item is not None:
                table[key] = to_lua(lua, item)
        return table
    if isinstance(value, list):
        return lua.table(*[to_lua(lua, item) for item in value])
    return value


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua on `obj`; the table it returns as a dict."""
    lua = lupa51.LuaRuntime(unpack_returned_tuples=True)
    result = lua.execute(SANDBOX, SCRIPT.read_text(encoding="utf-8"), to_lua(lua, obj))
    return dict(result.items())


def run_obj(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A FederatedRun as the API server returns it (defaults applied), with `status`."""
    base: dict[str, Any] = {
        "rounds": 5,
        "minHospitals": 2,
        "data": {"preset": "stroke"},
        "privacy": {"enabled": True, "targetEpsilon": 1.0, "delta": 1e-5},
        "hospitals": [
            {"name": "hospital-a", "dataUri": "pvc://fedrun-demo-data/hospital-a.csv"},
            {"name": "hospital-b", "dataUri": "pvc://fedrun-demo-data/hospital-b.csv"},
        ],
    }
    base.update(spec)
    obj: dict[str, Any] = {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "stroke", "namespace": "fedrun", "generation": 1},
        "spec": base,
    }
    if status is not None:
        # Through the operator's model: the sample has the status shape the operator writes.
        obj["status"] = FederatedRunStatus.model_validate(status).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    return obj


def status(
    phase: Phase, current: int, spent: float, message: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "phase": phase.value,
        "round": {"current": current, "total": 5},
        "progress": f"{current}/5",
        "privacy": {
            "epsilonSpent": spent,
            "targetEpsilon": 1.0,
            "delta": 1e-5,
            "hospitals": [{"name": "hospital-a", "epsilon": spent, "steps": 12 * current}],
        },
        "hospitals": [{"name": "hospital-a", "state": "Training", "restarts": 0}],
        "message": message,
        **extra,
    }


# --------------------------------------------------------------------------- every phase


PHASES = [
    (Phase.PENDING, status(Phase.PENDING, 0, 0.0), "Progressing", "round 0/5, ε 0/1"),
    (Phase.RUNNING, status(Phase.RUNNING, 3, 0.61234), "Progressing", "round 3/5, ε 0.612/1"),
    (
        Phase.SUCCEEDED,
        status(Phase.SUCCEEDED, 5, 0.98, metrics={"round": 5, "auroc": 0.8412, "loss": 0.2}),
        "Healthy",
        "Succeeded, round 5/5, ε 0.98/1, AUROC 0.841",
    ),
    (
        Phase.FAILED,
        status(Phase.FAILED, 2, 0.41, "hospital-b: data error: line 7, column age: 'abc'"),
        "Degraded",
        "Failed, round 2/5, ε 0.41/1: hospital-b: data error: line 7, column age: 'abc'",
    ),
    (
        Phase.BUDGET_EXHAUSTED,
        status(Phase.BUDGET_EXHAUSTED, 3, 1.0, "fewer than minHospitals have budget left"),
        "Degraded",
        "BudgetExhausted, round 3/5, ε 1/1: fewer than minHospitals have budget left",
    ),
    (
        Phase.SUSPENDED,
        status(Phase.SUSPENDED, 2, 0.4),
        "Suspended",
        "Suspended, round 2/5, ε 0.4/1",
    ),
]


def test_every_phase_is_covered() -> None:
    assert {phase for phase, *_ in PHASES} == set(Phase)


@pytest.mark.parametrize(
    ("sample", "expected_status", "message"),
    [case[1:] for case in PHASES],
    ids=[case[0].value for case in PHASES],
)
def test_phase_maps_to_health(sample: dict[str, Any], expected_status: str, message: str) -> None:
    assert health(run_obj(sample)) == {"status": expected_status, "message": message}


# --------------------------------------------------------------------------- partial objects


def test_no_status_yet_is_progressing_from_the_spec() -> None:
    assert health(run_obj()) == {"status": "Progressing", "message": "round 0/5, ε 0/1"}


def test_status_without_round_or_privacy_falls_back_to_the_spec() -> None:
    obj = run_obj({"phase": "Running"}, rounds=8, privacy={"targetEpsilon": 3.0})
    assert health(obj) == {"status": "Progressing", "message": "round 0/8, ε 0/3"}


def test_round_total_zero_means_not_written_yet() -> None:
    obj = run_obj({"phase": "Running", "round": {"current": 0, "total": 0}}, rounds=7)
    assert health(obj)["message"] == "round 0/7, ε 0/1"


def test_privacy_target_in_status_wins_over_the_spec() -> None:
    sample = status(Phase.RUNNING, 1, 0.25)
    sample["privacy"]["targetEpsilon"] = 2.0
    assert health(run_obj(sample))["message"] == "round 1/5, ε 0.25/2"


def test_privacy_disabled_says_so_instead_of_epsilon() -> None:
    obj = run_obj(
        {"phase": "Running", "round": {"current": 2, "total": 5}}, privacy={"enabled": False}
    )
    assert health(obj) == {"status": "Progressing", "message": "round 2/5, no DP"}


def test_bare_object_is_progressing_with_unknowns() -> None:
    obj = {"apiVersion": "fedrun.io/v1alpha1", "kind": "FederatedRun", "metadata": {"name": "x"}}
    assert health(obj) == {"status": "Progressing", "message": "round 0/?, ε 0/?"}


def test_unknown_phase_is_progressing() -> None:
    obj = run_obj(status(Phase.RUNNING, 1, 0.1))
    obj["status"]["phase"] = "Validating"  # a phase a newer operator might add
    assert health(obj)["status"] == "Progressing"


def test_failed_without_message_has_no_trailing_colon() -> None:
    sample = status(Phase.FAILED, 0, 0.0)
    assert health(run_obj(sample)) == {"status": "Degraded", "message": "Failed, round 0/5, ε 0/1"}


def test_succeeded_without_metrics_omits_auroc() -> None:
    assert health(run_obj(status(Phase.SUCCEEDED, 5, 0.9)))["message"] == (
        "Succeeded, round 5/5, ε 0.9/1"
    )


def test_wrongly_typed_fields_do_not_break_the_check() -> None:
    obj = run_obj({"phase": "Running"})
    obj["status"]["round"] = "3/5"
    obj["status"]["privacy"] = {"epsilonSpent": "a lot"}
    obj["status"]["message"] = 42
    assert health(obj) == {"status": "Progressing", "message": "round 0/5, ε 0/1"}


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1.0, "1"),
        (0.5, "0.5"),
        (0.98, "0.98"),
        (0.05, "0.05"),
        (0.999, "0.999"),
        (0.9996, "1"),
        (0.996, "0.996"),
        (0.0004, "0"),
        (0.0005, "0.001"),
        (0.1 + 0.2, "0.3"),
        (12.0, "12"),
        (7.25, "7.25"),
        (3.004, "3.004"),
        (3.0004, "3"),
        (2.5, "2.5"),
        (0.105, "0.105"),
        (10.1, "10.1"),
    ],
)
def test_epsilon_is_shown_with_at_most_three_decimals(value: float, text: str) -> None:
    sample = status(Phase.RUNNING, 1, 0.0)
    sample["privacy"]["epsilonSpent"] = value
    assert health(run_obj(sample))["message"] == f"round 1/5, ε {text}/1"


def test_epsilon_text_is_within_half_a_thousandth() -> None:
    rng = random.Random(4)
    values = [rng.uniform(0, 20) for _ in range(200)]
    lua = lupa51.LuaRuntime(unpack_returned_tuples=True)
    script = SCRIPT.read_text(encoding="utf-8")
    for value in values:
        sample = run_obj(status(Phase.RUNNING, 1, value))
        message = dict(lua.execute(SANDBOX, script, to_lua(lua, sample)).items())["message"]
        shown = re.fullmatch(r"round 1/5, ε (\d+(?:\.\d{0,2}[1-9])?)/1", message)
        assert shown is not None, message
        assert abs(float(shown.group(1)) - value) <= 0.0005 + 1e-9, (value, message)


# --------------------------------------------------------------------------- the sandbox


def test_sandbox_refuses_the_string_library() -> None:
    """The harness is strict enough to catch a script that Argo CD would reject."""
    lua = lupa51.LuaRuntime(unpack_returned_tuples=True)
    for script in ('return {status = string.upper("x")}', 'local s = "x"; return {s = s:len()}'):
        with pytest.raises(lupa51.LuaError):
            lua.execute(SANDBOX, script, lua.table())


def test_script_uses_no_library_argo_cd_lacks() -> None:
    code = "\n".join(
        line.split("--", 1)[0] for line in SCRIPT.read_text(encoding="utf-8").splitlines()
    )
    assert not re.search(r"\b(string|math|io|debug|coroutine)\s*[.\[]", code)
    assert not re.search(r"\b(require|load|loadstring|dofile)\s*\(", code)
    # Method calls on strings need the string library's metatable.
    assert not re.search(r"[\w)\]]:\w+\s*\(", code)


# --------------------------------------------------------------------------- docs and apps


def yaml_blocks(markdown: str) -> list[Any]:
    return [
        yaml.safe_load(block)
        for block in re.findall(r"^```yaml\n(.*?)^```", markdown, flags=re.M | re.S)
    ]


def test_gitops_doc_snippet_is_the_script() -> None:
    blocks = yaml_blocks(GITOPS_DOC.read_text(encoding="utf-8"))
    [cm] = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "ConfigMap"]
    assert cm["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"},
    }
    assert cm["data"][CM_KEY] == SCRIPT.read_text(encoding="utf-8")


def example_docs() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(APPLICATIONS.read_text(encoding="utf-8")) if d]
    # Argo CD Applications, and the Namespaces they need before they sync.
    assert {(d["apiVersion"], d["kind"]) for d in docs} <= {
        ("argoproj.io/v1alpha1", "Application"),
        ("v1", "Namespace"),
    }
    return docs


def applications() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in example_docs() if d["kind"] == "Application"}


def wave(app: dict[str, Any]) -> int:
    return int(app["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_chart_application_syncs_before_the_runs() -> None:
    apps = applications()
    assert sorted(apps) == ["fedrun", "fedrun-runs"]
    chart, runs = apps["fedrun"], apps["fedrun-runs"]
    assert wave(chart) < wave(runs)
    assert "SkipDryRunOnMissingResource=true" in runs["spec"]["syncPolicy"]["syncOptions"]
    assert runs["spec"]["syncPolicy"]["retry"]["limit"] > 0
    # Runs are never deleted or re-created behind the user's back.
    assert runs["spec"]["syncPolicy"]["automated"] == {"prune": False, "selfHeal": False}


def test_chart_application_points_at_the_chart_and_known_values() -> None:
    source = applications()["fedrun"]["spec"]["source"]
    chart_dir = ROOT / source["path"]
    assert (chart_dir / "Chart.yaml").is_file()
    values = yaml.safe_load((chart_dir / "values.yaml").read_text(encoding="utf-8"))

    def known(given: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
        for key, value in given.items():
            assert key in defaults, f"{where}{key} is not a value of the chart"
            if isinstance(value, dict) and value:
                known(value, defaults[key], f"{where}{key}.")

    known(source["helm"]["valuesObject"], values, "")
    assert source["helm"]["valuesObject"]["crds"]["keep"] is True


def test_the_operator_follows_the_runs_namespace_which_exists_before_the_chart() -> None:
    # The chart's operator follows runs only in the namespaces it is given (its own by
    # default) and binds its rules there with RoleBindings, so the runs' namespace must be
    # named in watchNamespaces and exist before the chart syncs: Argo CD's
    # CreateNamespace=true creates only the chart Application's own (fedrun-system).
    apps = applications()
    chart, runs = apps["fedrun"], apps["fedrun-runs"]
    runs_namespace = runs["spec"]["destination"]["namespace"]
    values = chart["spec"]["source"]["helm"]["valuesObject"]
    assert values["watchNamespaces"] == [runs_namespace]
    assert not values.get("clusterWide", False)
    assert chart["spec"]["destination"]["namespace"] != runs_namespace
    [namespace] = [
        d
        for d in example_docs()
        if d["kind"] == "Namespace" and d["metadata"]["name"] == runs_namespace
    ]
    assert wave(namespace) < wave(chart), "under a parent Application it syncs first"
    options = namespace["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
    # Pruning or deleting it would delete every run in it.
    assert {o.strip() for o in options.split(",")} >= {"Prune=false", "Delete=false"}
    labels = namespace["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"


def test_runs_application_points_at_valid_federated_runs() -> None:
    app = applications()["fedrun-runs"]
    source = app["spec"]["source"]
    files = sorted((ROOT / source["path"]).glob(source["directory"]["include"]))
    assert files
    for path in files:
        run = load_run(path)
        assert run.namespace == app["spec"]["destination"]["namespace"]
