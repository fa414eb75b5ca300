"""Shared test fixtures: the real Kaggle stroke file, when this machine has it; an emulated
Kubernetes API server (tests/kube/); a real control plane from ../shared/kube, once per
session, with fedrun's local kubelet as its node (tests/controlplane/)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.controlplane.cluster import RealCluster
    from tests.controlplane.node import NodeAgent
    from tests.controlplane.plane import ControlPlane
    from tests.kube.cluster import EmulatedCluster

REPO = Path(__file__).resolve().parents[1]

# The AWS SDK must never probe the cloud's metadata address from a test (or from any
# process a test starts: they inherit this).
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

#: Every connection this test process tried to open to an address off this machine, in
#: order; each was refused before it left (see `_loopback_only`).
OFF_MACHINE: list[object] = []


def _on_this_machine(address: object) -> bool:
    """Whether `address` (as given to `socket.connect`) stays on this machine."""
    if not isinstance(address, tuple):
        return True  # a Unix socket's path
    host = str(address[0]).split("%", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: connecting would look it up, off this machine


def _refusing(connect: object) -> object:
    def guarded(sock: socket.socket, address: object) -> object:
        if not _on_this_machine(address):
            OFF_MACHINE.append(address)
            raise OSError(errno.ENETUNREACH, f"tests never leave loopback: {address!r}")
        return connect(sock, address)  # type: ignore[operator]

    return guarded


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Refuse, in this test process, any connection to an address other than loopback.

    Processes a test starts are not covered (they get `AWS_EC2_METADATA_DISABLED` above and
    bind to loopback by their tests' arguments); code that runs in-process is.
    """
    saved = socket.socket.connect, socket.socket.connect_ex
    socket.socket.connect = _refusing(saved[0])  # type: ignore[assignment,method-assign]
    socket.socket.connect_ex = _refusing(saved[1])  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = saved  # type: ignore[method-assign]


@pytest.fixture
def off_machine() -> list[object]:
    """The connections off this machine this test tried (refused), for tests that assert
    none was tried."""
    OFF_MACHINE.clear()
    return OFF_MACHINE


STROKE_CSV = REPO.parent / "shared" / "data" / "stroke" / "healthcare-dataset-stroke-data.csv"


@pytest.fixture
def stroke_csv() -> Path:
    """The real Kaggle stroke data; the test is skipped, saying why, when it is absent."""
    if not STROKE_CSV.is_file():
        pytest.skip(f"real stroke data not found at {STROKE_CSV} (it lives beside the repo)")
    return STROKE_CSV


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    """A fresh emulated Kubernetes API server (tests/kube/cluster.py) for this test.

    Its kubeconfig is `cluster.kubeconfig`; nothing global is set.
    """
    from tests.kube.cluster import EmulatedCluster  # kmock and aiohttp only when used

    with EmulatedCluster(tmp_path / "kube") as running:
        yield running


#: Test folders whose tests start federations of real processes or the real control plane
#: (every test that uses the ``control_plane`` fixture is in one of them).
HEAVY_FOLDERS = frozenset({"e2e", "cluster", "integration", "rbac"})


def heavy_scope(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: "heavy" for the heavy folders, else itself."""
    parts = nodeid.split("/")
    return (
        "heavy" if len(parts) > 2 and parts[0] == "tests" and parts[1] in HEAVY_FOLDERS else nodeid
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``pytest -n 2``; ``make test`` runs one process), the heavy tests
    run one after the other in one worker, in collection order, while the other worker takes
    the rest.

    A federation of real processes keeps both cores busy: two at once on a 2-core machine
    slow each other past their join and round deadlines. The control plane is started once
    per worker process, and the RBAC proof (tests/rbac, collected last) reads the audit log
    of the plane the other tests in its process used. (xdist's own ``--dist loadgroup``
    cannot do this with pytest 9: it renames items through an attribute pytest 9 no longer
    reads.)
    """
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class HeavyApart(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return heavy_scope(nodeid)

    return HeavyApart(config, log)


#: The session's control plane once a test has started it: the RBAC proof (tests/rbac) reads
#: its audit log, and must not start one of its own.
STARTED_PLANES: list[ControlPlane] = []


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler (Kubernetes 1.36)
    on loopback, started once for the session; skipped, saying why, without ../shared/kube."""
    from tests.controlplane.plane import ControlPlane, UnavailableError, binaries

    try:
        bin_dir = binaries()
    except UnavailableError as err:
        pytest.skip(str(err))
    plane = ControlPlane.start(tmp_path_factory.mktemp("control-plane"), bin_dir=bin_dir)
    STARTED_PLANES.append(plane)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def real_cluster(control_plane: ControlPlane) -> RealCluster:
    """kubectl-like helpers on the real control plane, as its admin."""
    from tests.controlplane.cluster import RealCluster

    return RealCluster(control_plane)


@pytest.fixture(scope="session")
def node(
    real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeAgent]:
    """fedrun's local kubelet: a Ready Node whose Pods run as local processes."""
    from tests.controlplane.node import NodeAgent

    agent = NodeAgent(real_cluster, tmp_path_factory.mktemp("node")).start()
    try:
        yield agent
    finally:
        agent.stop()


#: Where the session's chart puts the operator, and the one namespace it watches.
RELEASE_NS = "fedrun-system"
WATCHED_NS = "fedrun-e2e"


def helm_install(
    cluster: RealCluster, chart: Path, *sets: str, timeout: str = "5m"
) -> subprocess.CompletedProcess[str]:
    """``helm upgrade --install fedrun CHART`` into RELEASE_NS, waiting for it to be ready,
    with one operator replica (it still elects itself through its Lease)."""
    from tests.chart.tools import helm

    args = [
        helm(),
        "upgrade",
        "--install",
        "fedrun",
        str(chart),
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--wait",
        "--timeout",
        timeout,
    ]
    # One operator replica: the local node gives each Service port one local port, so two
    # operator Pods would collide on the metrics port (failover with two replicas is shown
    # with processes in tests/integration/test_operator.py). Later values may override it.
    for value in ("replicaCount=1", *sets):
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="session")
def chart(real_cluster: RealCluster, node: NodeAgent) -> dict[str, Any]:
    """The chart installed with real helm (CRD, RBAC, the operator): its operator's Pod,
    running on the local node and following WATCHED_NS, reaching run servers through the
    node's Service router."""
    real_cluster.ensure_namespace(WATCHED_NS)
    done = helm_install(
        real_cluster,
        REPO / "charts" / "fedrun",
        f"watchNamespaces={{{WATCHED_NS}}}",
        f"serverUrl={node.server_url_template}",
        "logFormat=text",
    )
    assert done.returncode == 0, done.stderr + done.stdout + node.logs(RELEASE_NS)
    pods = real_cluster.list(
        "v1", "pods", RELEASE_NS, label_selector="fedrun.io/component=operator"
    )
    assert len(pods) == 1, pods
    return pods[0]
