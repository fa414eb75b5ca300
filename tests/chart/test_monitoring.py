"""The chart's monitoring: alerts under promtool, the dashboard, the ServiceMonitor, and every
metric they query being one the operator exports (fedrun_operator.metrics).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_operator.metrics import exported_names

from .tools import CHART, CI_VALUES, Manifest, one, promql_metric_names, promtool, render, run

MONITORING = CHART / "ci" / "monitoring-values.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")
DASHBOARD_FILE = CHART / "files" / "dashboards" / "fedrun.json"
ALERTS = {
    "FedrunPrivacyBudgetNearlySpent",
    "FedrunRunFailed",
    "FedrunTooFewHospitals",
    "FedrunRoundStalled",
}


def rule_groups(sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = one(render(MONITORING, sets=sets), "PrometheusRule")["spec"][
        "groups"
    ]
    return groups


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def write_rules(tmp_path: Path, sets: tuple[str, ...] = ()) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, with the unit tests beside it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(sets)}, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return rules


# --------------------------------------------------------------------------- alerts


def test_the_alerts_are_the_four_asked_for() -> None:
    assert {r["alert"] for r in alert_rules()} == ALERTS


def test_promtool_check_rules(tmp_path: Path) -> None:
    rules = write_rules(tmp_path)
    out = run(promtool(), "check", "rules", str(rules)).stdout
    assert f"SUCCESS: {len(ALERTS)} rules found" in out


def test_promtool_test_rules(tmp_path: Path) -> None:
    write_rules(tmp_path)
    out = run(promtool(), "test", "rules", RULES_TEST.name, cwd=tmp_path).stdout
    assert "SUCCESS" in out


@pytest.mark.parametrize(
    "sets",
    [
        ("prometheusRule.budgetUsedRatio=0.5",),
        ('prometheusRule.tooFewHospitalsFor="1m"',),
        ('prometheusRule.roundStalledFor="10m"',),
    ],
)
def test_the_unit_tests_notice_a_changed_rule(tmp_path: Path, sets: tuple[str, ...]) -> None:
    write_rules(tmp_path, sets)
    done = run(promtool(), "test", "rules", RULES_TEST.name, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never shown quiet"


def test_alert_labels_and_pending_periods_follow_the_values() -> None:
    groups = rule_groups(
        ('prometheusRule.alertLabels={"team": "research"}', 'prometheusRule.roundStalledFor="15m"')
    )
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert all(r["labels"]["team"] == "research" for r in rules.values())
    assert rules["FedrunRoundStalled"]["for"] == "15m"
    assert rules["FedrunTooFewHospitals"]["for"] == "2m"


def test_alerts_query_only_exported_metrics() -> None:
    exported = exported_names()
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']} queries {sorted(names - exported)}"


# --------------------------------------------------------------------------- PromQL names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, handler) (rate(foo_bucket{job="x", a=~"$ns"}'
        "[$__rate_interval]))) / on (namespace, run) group_left bar_total offset 5m "
        '> 0.9 and time() - baz{phase="Running"} unless qux'
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "baz", "qux"}
    assert promql_metric_names('label_values(fedrun_x{namespace=~"$namespace"}, run)') == {
        "fedrun_x"
    }
    assert promql_metric_names("sum(rate(nope[5m]))") == {"nope"}


# --------------------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_dashboard_configmap_carries_the_dashboard() -> None:
    manifests = render(MONITORING)
    config_map = one(manifests, "ConfigMap", "fedrun-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["fedrun.json"]) == dashboard()


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_names()
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 10
    used: set[str] = set()
    for query in queries:
        names = promql_metric_names(query)
        assert names, query
        assert names <= exported, f"{query} queries {sorted(names - exported)}"
        used |= names
    # Every per-run series the operator exports is on the dashboard.
    assert {n for n in exported if n.startswith("fedrun_operator_run_")} <= used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses expressions only inside rule files: each query becomes a recording
    # rule, with Grafana's variables replaced by what Grafana would send.
    board = dashboard()
    exprs = [
        q.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$run", ".*")
        for q in dashboard_queries(board)
        if not q.startswith("label_values(")
    ]
    rules = [{"record": f"fedrun:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(promtool(), "check", "rules", str(path)).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["uid"] == "fedrun-operator"  # stable: links and provisioning rely on it
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "run"} <= variables.keys()


# --------------------------------------------------------------------------- ServiceMonitor


def test_service_monitor_scrapes_the_metrics_service() -> None:
    manifests = render(MONITORING)
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service: Manifest = one(manifests, "Service")
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_monitoring_objects_are_off_by_default() -> None:
    for values in [None, *[v for v in CI_VALUES if v != MONITORING]]:
        kinds = {m["kind"] for m in render(values)}
        assert not kinds & {"ServiceMonitor", "PrometheusRule"}, values
        names = {m["metadata"]["name"] for m in render(values) if m["kind"] == "ConfigMap"}
        assert "fedrun-dashboard" not in names
