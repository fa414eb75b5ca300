"""The operator under load: 200 FederatedRuns of 3 hospitals applied at once.

A real control plane (tests/controlplane: kube-apiserver, controller-manager, scheduler and
etcd from ../shared/kube) with the chart installed by real helm (cluster-wide, so one
operator follows the runs' namespace); the operator runs as its own process
(``fedrun operator``) logged in with a token of the chart's ServiceAccount, so the real
authorizer checks every call. The runs are applied from 16 threads; a poller lists the
children's metadata every 0.2 s and notes, per run, when all 16 (ConfigMap, Service,
Deployment, 3 ServiceAccounts, 3 Jobs, 3 NetworkPolicies, the server's TLS Secret and 3
hospital key Secrets, each with freshly generated keys) exist. There is no node: the
real Job and Deployment controllers create the runs' Pods, which stay Pending. Reconcile
durations come from the operator's own ``/metrics``; RSS and CPU from ``/proc``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from tests.benchmarks.localrun import REPO
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

RUNS = 200
CHILD_KINDS = (
    ("v1", "configmaps"),
    ("v1", "services"),
    ("v1", "serviceaccounts"),
    ("apps/v1", "deployments"),
    ("batch/v1", "jobs"),
    ("networking.k8s.io/v1", "networkpolicies"),
    ("v1", "secrets"),
)
CHILDREN_PER_RUN = 16
NAMESPACE = "bench"
# Lists of metadata only (what `kubectl get -o name` asks for): no Secret data on the wire.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
TARGET_ALL_S, TARGET_MEDIAN_S, TARGET_RSS_MB = 30.0, 0.5, 150.0


def _run_doc(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "federatedrun-local.yaml").read_text(encoding="utf-8")
    )
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
    return doc


def _scrape(port: int) -> dict[str, float]:
    """Sample name{labels} -> value from the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """(peak RSS, current RSS) of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(0.05)


def measure_operator(settings: BenchSettings) -> PartResult:
    """Apply RUNS runs at once; time until their children exist; reconcile time; RSS."""
    from fedrun_local.runner import free_port
    from tests.chart.tools import helm
    from tests.controlplane.cluster import RealCluster
    from tests.controlplane.plane import ControlPlane, UnavailableError, binaries

    n = 20 if settings.quick else RUNS
    work = settings.work / "operator"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        bin_dir = binaries()
    except UnavailableError as err:
        return PartResult("Operator under load", f"Not measured: {err}.")
    metrics_port = free_port()
    with ControlPlane.start(work / "kube", bin_dir=bin_dir) as plane:
        cluster = RealCluster(plane, namespace=NAMESPACE, timeout=60)
        installed = subprocess.run(
            [
                helm(),
                "install",
                "fedrun",
                str(REPO / "charts" / "fedrun"),
                "-n",
                "fedrun-system",
                "--create-namespace",
                "--kubeconfig",
                str(plane.kubeconfig),
                "--set",
                "clusterWide=true",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if installed.returncode != 0:
            raise RuntimeError(f"helm install failed: {installed.stderr}")
        cluster.ensure_namespace(NAMESPACE)
        token = cluster.token_for("fedrun-operator", "fedrun-system", seconds=7200)
        kubeconfig = plane.kubeconfig_for(work / "operator.kubeconfig", token=token)
        env = dict(os.environ)
        env.update(KUBECONFIG=str(kubeconfig), FEDRUN_OPERATOR_NAMESPACE="fedrun-system")
        fedrun = str(Path(sys.executable).parent / "fedrun")
        argv = [
            fedrun,
            "operator",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            "0",
            "--poll-seconds",
            "5",
            "--server-url",
            "http://127.0.0.1:9",
        ]
        log = (work / "operator.log").open("wb")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        apiserver = plane.pids["kube-apiserver"]
        try:
            _wait(lambda: _up(metrics_port), 60, "the operator's /metrics")
            # Warm up (imports, first watch) with one run, then remove it.
            cluster.create(_run_doc("warmup"))
            _wait(
                lambda: len(_children(cluster).get("warmup", ())) == CHILDREN_PER_RUN,
                60,
                "the warm-up run's children",
            )
            cluster.delete("fedrun.io/v1alpha1", "federatedruns", NAMESPACE, "warmup")
            _wait(lambda: "warmup" not in _children(cluster), 120, "warm-up cleanup")

            names = [f"bench-{i:03d}" for i in range(n)]
            applied: dict[str, float] = {}
            t0 = time.monotonic()
            cpu0, api_cpu0 = _cpu_s(proc.pid), _cpu_s(apiserver)

            def apply(name: str) -> None:
                cluster.create(_run_doc(name))
                applied[name] = time.monotonic()

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(apply, names))
            apply_s = time.monotonic() - t0
            done: dict[str, float] = {}
            deadline = time.monotonic() + 300
            while len(done) < n and time.monotonic() < deadline:
                now = time.monotonic()
                for run, kids in _children(cluster).items():
                    if run not in done and len(kids) == CHILDREN_PER_RUN and run in applied:
                        done[run] = now
                time.sleep(0.2)
            all_s = max(done.values()) - t0 if len(done) == n else float("inf")
            burst_cpu = _cpu_s(proc.pid) - cpu0
            api_cpu = _cpu_s(apiserver) - api_cpu0
            latency = sorted(done[r] - applied[r] for r in done)
            _wait(lambda: _statuses(cluster) >= n, 180, "a status on every run")
            time.sleep(12)  # two more follow-up periods for every run, under load
            scraped = _scrape(metrics_port)
            peak_mb, rss_mb = _memory_mb(proc.pid)
            api_peak_mb, _ = _memory_mb(apiserver)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    def sample(suffix: str, handler: str) -> float:
        name = f"fedrun_operator_reconcile_duration_seconds_{suffix}"
        return scraped.get(name + '{handler="' + handler + '"}', 0.0)

    def mean_ms(handler: str) -> float:
        n_calls = sample("count", handler)
        return 1000 * sample("sum", handler) / n_calls if n_calls else float("nan")

    def count(handler: str) -> float:
        return sample("count", handler)

    median = statistics.median(latency) if latency else float("inf")
    p95 = latency[int(0.95 * (len(latency) - 1))] if latency else float("inf")
    rows = [
        ["runs applied at once (16 client threads)", str(n), ""],
        ["time to apply them all (client side)", f"{fmt(apply_s, 2)} s", ""],
        [
            f"until every run has all {CHILDREN_PER_RUN} children",
            f"{fmt(all_s, 2)} s",
            f"≤ {TARGET_ALL_S:.0f} s",
        ],
        ["apply → children, median", f"{fmt(median, 3)} s", f"≤ {TARGET_MEDIAN_S} s"],
        ["apply → children, p95", f"{fmt(p95, 3)} s", ""],
        [
            "reconcile on create, mean",
            f"{fmt(mean_ms('create'), 1)} ms ({count('create'):.0f} calls)",
            "",
        ],
        [
            "status update (follow-up reconcile), mean",
            f"{fmt(mean_ms('follow'), 1)} ms ({count('follow'):.0f} calls)",
            "",
        ],
        ["operator CPU time until all children existed", f"{fmt(burst_cpu, 2)} s", ""],
        ["kube-apiserver CPU time in that span", f"{fmt(api_cpu, 2)} s", ""],
        ["operator peak RSS (VmHWM)", f"{fmt(peak_mb, 1)} MB", f"≤ {TARGET_RSS_MB:.0f} MB"],
        ["operator RSS at the end", f"{fmt(rss_mb, 1)} MB", ""],
        ["kube-apiserver peak RSS", f"{fmt(api_peak_mb, 1)} MB", ""],
    ]
    verdict = [
        f"all reconciled {'✓' if all_s <= TARGET_ALL_S else '✗'}",
        f"median {'✓' if median <= TARGET_MEDIAN_S else '✗'}",
        f"RSS {'✓' if peak_mb <= TARGET_RSS_MB else '✗'}",
    ]
    body = "\n".join(
        [
            f"{n} FederatedRuns of 3 hospitals applied at once to a real kube-apiserver "
            "(Kubernetes 1.36.2, with etcd, the controller-manager and the scheduler, all on "
            "the same 2 cores as the operator); the chart installed by real helm "
            "(`clusterWide=true`), the operator a separate `fedrun operator` process logged "
            "in with its ServiceAccount's token, polling each run every 5 s. No node: the "
            "Job and Deployment controllers create every run's Pods, which stay Pending, so "
            "the control plane does its real work alongside. No run server exists, so every "
            "follow-up reconcile also pays a refused connection to the status port. "
            "Children are seen by listing their metadata every 0.2 s.",
            "",
            table(["measure", "value", "target"], rows),
            "",
            "Targets: " + ", ".join(verdict) + ".",
            "",
            f"Reading it: the runs arrived within {apply_s:.2f} s and the last had all its "
            f"children {all_s:.2f} s after the first was applied; every run needs about "
            f"{CHILDREN_PER_RUN + 3} API writes ({CHILDREN_PER_RUN} children, its status, "
            "kopf's annotations, an Event) and a new CA, server key and 3 node keys; in that "
            f"span the operator used {burst_cpu:.2f} s of CPU and kube-apiserver "
            f"{api_cpu:.2f} s, with the controllers creating {3 * n + n} Pods besides.",
        ]
    )
    return PartResult("Operator under load", body)


def _up(port: int) -> bool:
    try:
        _scrape(port)
    except OSError:
        return False
    return True


def _children(cluster: Any) -> dict[str, set[str]]:
    """Per run, its children that exist: their metadata only, as the API server lists it."""
    out: dict[str, set[str]] = {}
    for api_version, plural in CHILD_KINDS:
        path = cluster.path(api_version, plural, NAMESPACE)
        req = urllib.request.Request(
            f"{cluster.url}{path}?labelSelector=fedrun.io%2Frun",
            headers={"Accept": METADATA_LIST},
        )
        with urllib.request.urlopen(req, timeout=60, context=cluster._ssl) as resp:
            items = json.loads(resp.read()).get("items") or []
        for item in items:
            meta = item["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            run = (meta.get("labels") or {}).get("fedrun.io/run")
            if run:
                out.setdefault(run, set()).add(f"{plural}/{meta['name']}")
    return out


def _statuses(cluster: Any) -> int:
    runs = cluster.list("fedrun.io/v1alpha1", "federatedruns", NAMESPACE)
    return sum(1 for r in runs if (r.get("status") or {}).get("phase"))
