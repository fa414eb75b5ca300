"""``fedrun local`` as kubelet: the rendered pods become argv and env for local processes.

Nothing is started here; the tests read the prepared pods.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedrun_core import names as c
from fedrun_core.api import FederatedRun, load_run
from fedrun_core.api import parse_run as load_run_from
from fedrun_local.runner import LocalCluster, Pod, default_timeout, free_port, override_data

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "federatedrun-local.yaml"
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


def arg(pod: Pod, flag: str) -> str:
    """The value after ``flag`` in the pod's argv (exactly once)."""
    assert pod.argv.count(flag) == 1, pod.argv
    return pod.argv[pod.argv.index(flag) + 1]


@pytest.fixture(scope="module")
def run() -> FederatedRun:
    return load_run(EXAMPLE)


@pytest.fixture
def cluster(run: FederatedRun, tmp_path: Path) -> LocalCluster:
    return LocalCluster.create(run, tmp_path / "out")


def test_pods_are_prepared_but_not_started(cluster: LocalCluster) -> None:
    assert cluster.server is not None
    assert sorted(cluster.hospitals) == HOSPITALS
    for pod in [cluster.server, *cluster.hospitals.values()]:
        assert pod.proc is None
        assert pod.starts == 0
        assert not pod.running


def test_commands_are_the_fedrun_subcommands(cluster: LocalCluster) -> None:
    assert cluster.server is not None
    assert Path(cluster.server.argv[0]).name == "fedrun"
    assert cluster.server.argv[1] == "server"
    for name, pod in cluster.hospitals.items():
        assert Path(pod.argv[0]).name == "fedrun"
        assert pod.argv[1] == "client"
        assert arg(pod, "--hospital") == name


def test_config_points_at_the_materialised_configmap(
    cluster: LocalCluster, run: FederatedRun
) -> None:
    assert cluster.server is not None
    expected = cluster.out / "configmaps" / f"{run.name}-config" / "config.json"
    for pod in [cluster.server, *cluster.hospitals.values()]:
        assert arg(pod, "--config") == str(expected)
    assert expected.is_file()
    materialised = load_run(expected)
    assert materialised.name == run.name
    assert materialised.spec == run.spec


def test_state_dirs_are_per_pod_under_out(cluster: LocalCluster, run: FederatedRun) -> None:
    assert cluster.server is not None
    pods = {f"{run.name}-server": cluster.server}
    pods |= {f"{run.name}-{h}": pod for h, pod in cluster.hospitals.items()}
    seen = set()
    for pod_name, pod in pods.items():
        state_dir = Path(arg(pod, "--state-dir"))
        assert state_dir.parent == cluster.out / "pods" / pod_name
        assert state_dir.is_dir()
        assert pod.env["HOME"] == str(cluster.out / "pods" / pod_name / "home")
        seen.add(state_dir)
    assert len(seen) == len(pods)  # no two pods share an emptyDir


def test_a_checkpoint_volume_is_a_directory_of_the_server_pod(
    run: FederatedRun, tmp_path: Path
) -> None:
    with_volume = run.model_copy(deep=True)
    body = with_volume.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["spec"]["server"] = {"checkpointVolume": {"size": "1Gi"}}
    cluster = LocalCluster.create(load_run_from(body), tmp_path / "out")
    assert cluster.server is not None
    checkpoint_dir = Path(arg(cluster.server, "--checkpoint-dir"))
    assert checkpoint_dir == cluster.out / "pods" / f"{run.name}-server" / "checkpoint"
    assert checkpoint_dir.is_dir()


def test_a_new_invocation_does_not_find_an_earlier_runs_checkpoint(
    run: FederatedRun, tmp_path: Path
) -> None:
    """Each `fedrun local` is a new run (a new uid): `make demo` twice must not meet the
    first demo's checkpoint, which its server would refuse as another run's."""
    first = LocalCluster.create(run, tmp_path / "out")
    state = Path(arg(first.server, "--state-dir"))  # type: ignore[arg-type]
    (state / "checkpoint").mkdir()
    (state / "checkpoint" / "checkpoint.bin").write_bytes(b"the first run's")
    (state / "mlflow.db").write_bytes(b"kept")
    second = LocalCluster.create(run, tmp_path / "out")
    assert second.run.metadata.uid != first.run.metadata.uid
    assert not (state / "checkpoint").exists()
    assert (state / "mlflow.db").read_bytes() == b"kept"  # the MLflow store stays


def test_server_address_is_loopback_on_the_servers_fleet_port(cluster: LocalCluster) -> None:
    server = cluster.server
    assert server is not None
    fleet = cluster.ports[c.FLEET_PORT]
    status = cluster.ports[c.STATUS_PORT]
    assert fleet != status
    assert {fleet, status}.isdisjoint({c.FLEET_PORT, c.STATUS_PORT})
    assert arg(server, "--fleet-port") == str(fleet)
    assert arg(server, "--status-port") == str(status)
    assert cluster.status_port == status
    assert cluster.status_url == f"http://127.0.0.1:{status}"
    assert server.argv[-2:] == ["--host", "127.0.0.1"]
    for pod in cluster.hospitals.values():
        assert arg(pod, "--server") == f"127.0.0.1:{fleet}"
        assert "--host" not in pod.argv


def test_hospitals_get_a_termination_log_in_their_pod_dir(
    cluster: LocalCluster, run: FederatedRun
) -> None:
    assert cluster.server is not None
    assert "--termination-log" not in cluster.server.argv
    assert cluster.server.termination_log is None
    for name, pod in cluster.hospitals.items():
        path = Path(arg(pod, "--termination-log"))
        assert path == cluster.out / "pods" / f"{run.name}-{name}" / "termination-log"
        assert pod.termination_log == path
        assert pod.env["FEDRUN_HOSPITAL"] == name
        assert pod.env["FEDRUN_RUN"] == run.name
        assert pod.log_path == cluster.out / "logs" / f"{run.name}-{name}.log"


def test_override_data_points_every_hospital_at_the_data_dir(
    run: FederatedRun, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    moved = override_data(run, data_dir)
    assert {h.name: h.data_uri for h in moved.spec.hospitals} == {
        h: (data_dir / f"{h}.csv").resolve().as_uri() for h in HOSPITALS
    }
    assert run.spec.hospitals[0].data_uri == "file:out/demo-data/hospital-a.csv"  # untouched
    assert moved.spec.rounds == run.spec.rounds
    cluster = LocalCluster.create(moved, tmp_path / "out")
    materialised = load_run(cluster.out / "configmaps" / f"{run.name}-config" / "config.json")
    assert materialised.spec.hospitals[1].data_uri == (data_dir / "hospital-b.csv").as_uri()


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_default_timeout_covers_every_round(run: FederatedRun) -> None:
    spec = run.spec
    assert default_timeout(run) == (spec.rounds + 3) * spec.round_timeout_seconds + 60.0
    capped = run.model_copy(
        update={"spec": spec.model_copy(update={"active_deadline_seconds": 100})}
    )
    assert default_timeout(capped) == 160.0
