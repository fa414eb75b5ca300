"""The chart's monitoring: alerts under promtool, the dashboard, the ServiceMonitor, every
metric they query being one the operator exports (fedrun_operator.metrics), the runbooks
the alerts link to, and `promtool check metrics` on real scrapes of the operator and of a
run server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_operator.metrics import exported_names

from .tools import (
    CHART,
    CI_VALUES,
    REPO,
    Manifest,
    one,
    promql_metric_names,
    promtool,
    render,
    run,
    template_args,
    tool_env,
)

MONITORING = CHART / "ci" / "monitoring-values.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")
DASHBOARD_FILE = CHART / "files" / "dashboards" / "fedrun.json"
RUNBOOKS = REPO / "docs" / "runbooks.md"
ALERTS = {
    "FedrunRunFailed",
    "FedrunPrivacyBudgetWillStopRun",
    "FedrunPrivacyBudgetNearlySpent",
    "FedrunTooFewHospitals",
    "FedrunRoundStalled",
    "FedrunOperatorDown",
    "FedrunOperatorNotReconciling",
}
# Series Prometheus makes itself for every target, which the operator does not export.
PROMETHEUS_SERIES = {"up"}


def rule_groups(sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = one(render(MONITORING, sets=sets), "PrometheusRule")["spec"][
        "groups"
    ]
    return groups


def alert_rules(sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [r for g in rule_groups(sets) for r in g["rules"] if "alert" in r]


def write_rules(tmp_path: Path, sets: tuple[str, ...] = ()) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, with the unit tests beside it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(sets)}, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return rules


# --------------------------------------------------------------------------- alerts


def test_the_alerts_are_the_seven_asked_for() -> None:
    assert {r["alert"] for r in alert_rules()} == ALERTS


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_switching_one_alert_off_removes_just_it(alert: str) -> None:
    before = {r["alert"]: r for r in alert_rules()}
    after = {r["alert"]: r for r in alert_rules((f"prometheusRule.alerts.{alert}.enabled=false",))}
    assert after.keys() == ALERTS - {alert}
    assert after == {name: rule for name, rule in before.items() if name != alert}


def test_severity_and_pending_period_are_set_per_alert() -> None:
    rules = {
        r["alert"]: r
        for r in alert_rules(
            (
                'prometheusRule.alerts.FedrunRunFailed.severity="critical"',
                'prometheusRule.alerts.FedrunRunFailed.for="1m"',
                'prometheusRule.alerts.FedrunOperatorDown.for=""',
            )
        )
    }
    assert rules["FedrunRunFailed"]["labels"]["severity"] == "critical"
    assert rules["FedrunRunFailed"]["for"] == "1m"
    assert "for" not in rules["FedrunOperatorDown"]
    assert rules["FedrunTooFewHospitals"]["labels"]["severity"] == "warning"


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
        ("prometheusRule.alerts.FedrunRunFailed.withinSeconds=7200",),
        ("prometheusRule.alerts.FedrunPrivacyBudgetNearlySpent.threshold=0.95",),
        ('prometheusRule.alerts.FedrunTooFewHospitals.for="1m"',),
        ('prometheusRule.alerts.FedrunRoundStalled.for="10m"',),
        ('prometheusRule.alerts.FedrunOperatorDown.for="10m"',),
        ("prometheusRule.alerts.FedrunOperatorNotReconciling.staleSeconds=900",),
        ('prometheusRule.operatorJob="fedrun"',),
        ('prometheusRule.runbookBaseUrl="https://wiki.example.org/fedrun"',),
    ],
)
def test_the_unit_tests_notice_a_changed_rule(tmp_path: Path, sets: tuple[str, ...]) -> None:
    write_rules(tmp_path, sets)
    done = run(promtool(), "test", "rules", RULES_TEST.name, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr


BUDGET_THRESHOLD = "prometheusRule.alerts.FedrunPrivacyBudgetNearlySpent.threshold"


def budget_series(name: str, namespace: str, budget: str, value: float) -> dict[str, str]:
    """One per-budget series as the operator's scrape labels it, constant for 5 minutes."""
    labels = (
        'job="fedrun-operator-metrics", instance="10.244.1.7:8080", '
        'pod="fedrun-operator-6d5f8b7c9-x2x7k", service="fedrun-operator-metrics", '
        'endpoint="metrics", container="operator", '
        f'namespace="{namespace}", budget="{budget}", hospital="hospital-a"'
    )
    return {"series": f"fedrun_operator_budget_epsilon_{name}{{{labels}}}", "values": f"{value}x5"}


@pytest.mark.parametrize(
    ("threshold", "spent", "fires"),
    [(0.6, 3.5, True), (0.6, 2.5, False), (0.95, 4.5, False), (0.95, 4.9, True)],
)
def test_budget_alert_fires_above_the_threshold_the_values_set(
    tmp_path: Path, threshold: float, spent: float, fires: bool
) -> None:
    """`prometheusRule.alerts.FedrunPrivacyBudgetNearlySpent.threshold` is the alert's bound
    (rules_test.yaml covers the default, 0.8): a budget of 5 with `spent` spent."""
    write_rules(tmp_path, (f"{BUDGET_THRESHOLD}={threshold}",))
    labels = {"namespace": "research", "budget": "hospital-a-stroke", "hospital": "hospital-a"}
    [rule] = [r for r in alert_rules() if r["alert"] == "FedrunPrivacyBudgetNearlySpent"]
    annotations = {
        "summary": f"PrivacyBudget research/hospital-a-stroke (hospital hospital-a) has spent "
        f"{spent / 5 * 100:.4g}% of its lifetime ε.",
        "description": rule["annotations"]["description"].replace(
            "{{ $labels.namespace }}", "research"
        ),
        "runbook_url": rule["annotations"]["runbook_url"],
    }
    expected = [{"exp_labels": {"severity": "warning", **labels}, "exp_annotations": annotations}]
    case = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    budget_series("spent", "research", "hospital-a-stroke", spent),
                    budget_series("limit", "research", "hospital-a-stroke", 5),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "FedrunPrivacyBudgetNearlySpent",
                        "exp_alerts": expected if fires else [],
                    }
                ],
            }
        ],
    }
    (tmp_path / "threshold_test.yaml").write_text(yaml.safe_dump(case, sort_keys=False))
    out = run(promtool(), "test", "rules", "threshold_test.yaml", cwd=tmp_path).stdout
    assert "SUCCESS" in out


def test_budget_threshold_must_be_a_fraction() -> None:
    for bad in ("0", "1.5", '"0.9"'):
        done = subprocess.run(
            template_args(MONITORING, sets=(f"{BUDGET_THRESHOLD}={bad}",)),
            capture_output=True,
            text=True,
            env=tool_env(),
            check=False,
        )
        assert done.returncode != 0, bad
        assert "FedrunPrivacyBudgetNearlySpent.threshold" in done.stderr, bad


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never shown quiet"


def test_alert_labels_and_pending_periods_follow_the_values() -> None:
    groups = rule_groups(
        (
            'prometheusRule.alertLabels={"team": "research"}',
            'prometheusRule.alerts.FedrunRoundStalled.for="15m"',
        )
    )
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert all(r["labels"]["team"] == "research" for r in rules.values())
    assert rules["FedrunRoundStalled"]["for"] == "15m"
    assert rules["FedrunTooFewHospitals"]["for"] == "2m"


def test_alerts_query_only_exported_metrics() -> None:
    exported = exported_names() | PROMETHEUS_SERIES
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']} queries {sorted(names - exported)}"


def test_per_run_joins_survive_the_scrape_target_labels() -> None:
    # A scrape adds job, instance, pod, service, endpoint and container: every per-run
    # operand is reduced to (namespace, run) before a join, or two series of one run (two
    # operator pods in a rollout) would be a many-to-many match.
    for rule in alert_rules():
        if "on (namespace, run)" not in rule["expr"]:
            continue
        names = re.findall(r"fedrun_operator_run_\w+", rule["expr"])
        reduced = re.findall(r"max by \(namespace, run\) \((fedrun_operator_run_\w+)", rule["expr"])
        assert names, rule["alert"]
        assert sorted(reduced) == sorted(names), (
            f"{rule['alert']}: a per-run operand is not reduced"
        )


def test_per_budget_joins_survive_the_scrape_target_labels() -> None:
    # As for runs: every per-budget operand is reduced to (namespace, budget, hospital)
    # before the one-to-one join, and the alert carries just those labels.
    budget_rules = [r for r in alert_rules() if "fedrun_operator_budget_" in r["expr"]]
    assert [r["alert"] for r in budget_rules] == ["FedrunPrivacyBudgetNearlySpent"]
    for rule in budget_rules:
        assert "on (namespace, budget, hospital)" in rule["expr"]
        names = re.findall(r"fedrun_operator_budget_\w+", rule["expr"])
        reduced = re.findall(
            r"max by \(namespace, budget, hospital\) \((fedrun_operator_budget_\w+)", rule["expr"]
        )
        expected = ["fedrun_operator_budget_epsilon_limit", "fedrun_operator_budget_epsilon_spent"]
        assert sorted(names) == sorted(reduced) == expected


def test_operator_alerts_select_the_scrape_the_service_monitor_makes() -> None:
    # The Prometheus Operator names a ServiceMonitor's job after the Service it scrapes, and
    # labels the operator's own series with the Service's namespace.
    manifests = render(MONITORING)
    monitor = one(manifests, "ServiceMonitor")
    services = [
        m
        for m in manifests
        if m["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= m["metadata"]["labels"].items()
    ]
    (service,) = services
    job = f'job="{service["metadata"]["name"]}", namespace="{service["metadata"]["namespace"]}"'
    rules = {r["alert"]: r for r in alert_rules()}
    for alert in ("FedrunOperatorDown", "FedrunOperatorNotReconciling"):
        selectors = re.findall(r"\{([^}]*)\}", rules[alert]["expr"])
        assert selectors and all(s == job for s in selectors), (alert, selectors)
    custom = {r["alert"]: r for r in alert_rules(('prometheusRule.operatorJob="kubernetes-pods"',))}
    assert 'job="kubernetes-pods"' in custom["FedrunOperatorDown"]["expr"]


# --------------------------------------------------------------------------- runbooks


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_to_its_runbook_section() -> None:
    text = RUNBOOKS.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    base = values["prometheusRule"]["runbookBaseUrl"]
    assert base.endswith("docs/runbooks.md")
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base
        assert anchor in anchors, f"docs/runbooks.md has no section #{anchor}"
        assert anchor == rule["alert"].lower()
    moved = alert_rules(('prometheusRule.runbookBaseUrl="https://wiki.example.org/fedrun"',))
    assert {r["annotations"]["runbook_url"] for r in moved} == {
        f"https://wiki.example.org/fedrun#{a.lower()}" for a in ALERTS
    }


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


def test_service_monitor_honours_the_runs_labels_by_default() -> None:
    (endpoint,) = one(render(sets=("serviceMonitor.enabled=true",)), "ServiceMonitor")["spec"][
        "endpoints"
    ]
    assert endpoint["honorLabels"] is True


def test_service_monitor_options() -> None:
    relabel = [{"targetLabel": "cluster", "replacement": "eu-1"}]
    drop = [{"sourceLabels": ["__name__"], "regex": "fedrun_operator_api_.*", "action": "drop"}]
    monitor = one(
        render(
            sets=(
                "serviceMonitor.enabled=true",
                'serviceMonitor.namespace="monitoring"',
                'serviceMonitor.annotations={"team": "ml"}',
                'serviceMonitor.interval="1m"',
                'serviceMonitor.scrapeTimeout="20s"',
                f"serviceMonitor.relabelings={json.dumps(relabel)}",
                f"serviceMonitor.metricRelabelings={json.dumps(drop)}",
            )
        ),
        "ServiceMonitor",
    )
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["annotations"] == {"team": "ml"}
    # It still scrapes the Service in the release's namespace.
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["fedrun-system"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("1m", "20s")
    assert endpoint["relabelings"] == relabel
    assert endpoint["metricRelabelings"] == drop


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


# --------------------------------------------------------------------------- real scrapes


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` (Prometheus' exposition lint) on one scrape."""
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        env=tool_env(),
        check=False,
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
    return body.decode("utf-8")


def test_promtool_check_metrics_refuses_a_gauge_named_like_a_counter() -> None:
    # What `fedrun_operator_run_rounds_total` (a gauge) used to be.
    bad = "# HELP x_rounds_total Rounds.\n# TYPE x_rounds_total gauge\nx_rounds_total 20\n"
    done = check_metrics(bad)
    assert done.returncode != 0
    assert 'non-counter metrics should not have "_total" suffix' in done.stdout + done.stderr


@pytest.fixture
def operator_endpoint() -> Iterator[int]:
    """The operator's real /metrics endpoint (prometheus_client's server on its REGISTRY,
    as fedrun_operator.main starts it), on loopback, after it followed two runs."""
    from prometheus_client import start_http_server

    from fedrun_core.accounting import epsilon, noise_multiplier_for_run
    from fedrun_core.api import load_run, parse_run
    from fedrun_operator import metrics
    from fedrun_operator.status import HospitalObservation, Observation, decide

    base = load_run(REPO / "examples" / "federatedrun.yaml")
    runs = []
    for namespace, phase in (("research", "Running"), ("cardiology", "Failed")):
        body = base.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["metadata"]["namespace"] = namespace
        run = parse_run(body)
        p, q, per_round, current = run.spec.privacy, 1 / 47, 47, 5
        sigma = noise_multiplier_for_run(p.target_epsilon, p.delta, q, run.spec.rounds * per_round)
        eps = epsilon([(sigma, q, current * per_round)], p.delta)
        names = [h.name for h in run.spec.hospitals]
        report = {
            "phase": phase,
            "conditions": [{"type": phase, "status": "True", "reason": "Training"}],
            "round": {"current": current, "total": run.spec.rounds},
            "hospitals": [{"name": h, "state": "Training", "restarts": 0} for h in names],
            "metrics": {"round": current, "auroc": 0.81, "loss": 0.4},
            "privacy": {
                "epsilonSpent": eps,
                "targetEpsilon": p.target_epsilon,
                "delta": p.delta,
                "hospitals": [
                    {
                        "name": h,
                        "epsilon": eps,
                        "noiseMultiplier": sigma,
                        "sampleRate": q,
                        "steps": current * per_round,
                        "stepsPerRound": per_round,
                        "history": [[sigma, q, current * per_round]],
                    }
                    for h in names
                ],
            },
        }
        jobs = {h: HospitalObservation(name=h, job_name=f"stroke-{h}", active=1) for h in names}
        now = datetime.now(UTC)
        status = decide(
            run, {"phase": "Running"}, Observation(now, report, hospitals=jobs), epsilon
        )
        metrics.observe_run(namespace, run.name, run.spec_dict(), status.status, now.timestamp())
        runs.append((namespace, run.name, status.status["phase"]))
    metrics.count_phases([phase for _, _, phase in runs])
    metrics.RECONCILE_SECONDS.labels("follow").observe(0.02)
    metrics.RECONCILE_ERRORS.labels("follow").inc()
    metrics.API_REQUESTS.labels("GET", "200").inc()
    metrics.API_RETRIES.labels("GET").inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        for namespace, name, _ in runs:
            metrics.forget_run(namespace, name)


def test_promtool_check_metrics_passes_on_the_operators_scrape(operator_endpoint: int) -> None:
    text = scrape(operator_endpoint)
    # The scrape holds what the alerts and the dashboard need, for both runs and phases.
    for needle in (
        'fedrun_operator_run_phase{namespace="research",phase="Running",run="stroke"} 1.0',
        'fedrun_operator_run_phase{namespace="cardiology",phase="Failed",run="stroke"} 1.0',
        'fedrun_operator_run_completion_timestamp_seconds{namespace="cardiology",run="stroke"}',
        'fedrun_operator_run_epsilon_projected{namespace="research",run="stroke"}',
        'fedrun_operator_run_rounds_planned{namespace="research",run="stroke"} 20.0',
        "fedrun_operator_last_reconcile_timestamp_seconds ",
        "fedrun_operator_reconcile_duration_seconds_bucket{",
        "fedrun_operator_api_requests_total{",
    ):
        assert needle in text, needle
    done = check_metrics(text)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_metrics_passes_on_a_run_servers_scrape(tmp_path: Path) -> None:
    from fedrun_trainer.common import files
    from fedrun_trainer.server.federation import HISTORY_FILE, STATUS_FILE
    from fedrun_trainer.server.main import StatusServer
    from fedrun_trainer.server.run_state import RoundRecord, RunState, to_history, to_status

    hospitals = ["hospital-a", "hospital-b", "hospital-c"]
    state = RunState.new("stroke", hospitals, 20, 1.0, 1e-5)
    state.phase, state.reason, state.current_round = "Running", "Training", 3
    for i, name in enumerate(hospitals):
        h = state.hospitals[name]
        h.state = ("Training", "Connected", "Failed")[i]
        h.epsilon_accounted = 0.1 * (i + 1)
        h.noise_multiplier, h.history = 1.1, [(1.1, 1 / 47, 141)]
    state.rounds = [
        RoundRecord(
            round=r, duration_s=d, evaluation={"loss": 0.4, "auroc": 0.8, "pooledAuroc": 0.79}
        )
        for r, d in ((1, 2.0), (2, 7.5), (3, 31.0))
    ]
    files.write_json_atomic(tmp_path / STATUS_FILE, to_status(state))
    files.write_json_atomic(tmp_path / HISTORY_FILE, to_history(state))
    server = StatusServer(tmp_path, "127.0.0.1", 0)
    server.start()
    try:
        text = scrape(server.httpd.server_address[1])
    finally:
        server.stop()
        server.httpd.server_close()
    for needle in (
        'fedrun_rounds_planned{run="stroke"} 20.0',
        'fedrun_round_current{run="stroke"} 3.0',
        'fedrun_epsilon_spent{hospital="hospital-c",run="stroke"}',
        'fedrun_round_duration_seconds_bucket{le="+Inf",run="stroke"} 3.0',
    ):
        assert needle in text, needle
    done = check_metrics(text)
    assert done.returncode == 0, done.stdout + done.stderr
