"""Hospital data on a PersistentVolumeClaim: `pvc://<claim>/<path>` from spec to pod to file.

The models and the CRD accept the same URIs, rendering mounts the claim where the trainer
looks for the file, the trainer reads it there, and `fedrun local` refuses it with a way out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fedrun_cli.demo_data import write_demo_hospitals
from fedrun_core import api
from fedrun_core import names as c
from fedrun_core.api import SpecError, load_run, parse_run, pvc_pod_path
from fedrun_local.runner import (
    ClusterOnlyError,
    LocalCluster,
    LocalOptions,
    override_data,
    run_local,
)
from fedrun_render.crd import build_crd
from fedrun_render.workloads import render_run
from fedrun_trainer.common.data import DataError, load_table, resolve_local_path
from fedrun_trainer.common.privacy import load_ledger, new_ledger, save_ledger

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_EXAMPLE = ROOT / "examples" / "federatedrun-local-cluster.yaml"

GOOD = [
    "pvc://fedrun-demo-data/hospital-a.csv",
    "pvc://data.v2/site/2024/a.parquet",
    "pvc://d/.hidden.csv",
    "pvc://d/..a.csv",
    "pvc://d/a..b.csv",
]
BAD = [
    "pvc://fedrun-demo-data",  # no path
    "pvc://fedrun-demo-data/",  # empty path
    "pvc:///hospital-a.csv",  # no claim
    "pvc://Demo_Data/a.csv",  # not a claim name
    "pvc://-data/a.csv",
    "pvc://data/../other/a.csv",  # would leave the claim's mount
    "pvc://data/..",
    "pvc://data/./a.csv",
    "pvc://data//a.csv",
    "pvc://data/a.csv/",
    "pvc://" + "a" * 254 + "/a.csv",  # longer than a claim name may be
]


def run_obj(hospitals: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "fedrun.io/v1alpha1",
        "kind": "FederatedRun",
        "metadata": {"name": "demo", "namespace": "research"},
        "spec": {"rounds": 2, "data": {"preset": "stroke"}, "hospitals": hospitals},
    }


def hospital_pods(run: api.FederatedRun) -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["labels"][c.LABEL_HOSPITAL]: m["spec"]["template"]["spec"]
        for m in render_run(run)
        if m["kind"] == "Job"
    }


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("uri", GOOD)
def test_pvc_uris_are_accepted_for_data_and_ledger(uri: str) -> None:
    run = parse_run(run_obj([{"name": "a", "dataUri": uri, "ledgerUri": uri + ".ledger"}]))
    assert run.spec.hospitals[0].data_uri == uri


@pytest.mark.parametrize("uri", BAD)
@pytest.mark.parametrize("field", ["dataUri", "ledgerUri"])
def test_bad_pvc_uris_are_refused_naming_the_field(uri: str, field: str) -> None:
    hospital = {"name": "a", "dataUri": "pvc://data/a.csv", field: uri}
    with pytest.raises(SpecError) as info:
        parse_run(run_obj([hospital]))
    [problem] = info.value.problems
    assert problem.startswith(f"spec.hospitals[0].{field}: must be pvc://claim/path"), problem
    assert repr(uri) in problem


def test_other_bad_uris_still_list_every_form() -> None:
    with pytest.raises(SpecError) as info:
        parse_run(run_obj([{"name": "a", "dataUri": "nfs://server/a.csv"}]))
    [problem] = info.value.problems
    assert problem.startswith("spec.hospitals[0].dataUri: must be s3://bucket/key")
    assert "pvc://claim/path" in problem


def crd_uri_schema(field: str) -> dict[str, Any]:
    version = build_crd()["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    prop = spec["properties"]["hospitals"]["items"]["properties"][field]
    return {"type": "string", "pattern": prop["pattern"], "maxLength": prop["maxLength"]}


@pytest.mark.parametrize("field", ["dataUri", "ledgerUri"])
def test_crd_pattern_admits_and_refuses_what_the_models_do(field: str) -> None:
    schema = crd_uri_schema(field)
    # The API server compiles patterns with RE2: no lookaround, no backreferences.
    assert not re.search(r"\(\?[=!<]|\\[1-9]", schema["pattern"])
    validator = jsonschema.Draft202012Validator(schema)
    for uri in GOOD:
        assert validator.is_valid(uri), uri
    # The claim's length limit is the models' alone (a pattern cannot count it cheaply).
    for uri in BAD[:-1]:
        assert not validator.is_valid(uri), uri


def test_pod_path_is_under_the_claims_mount() -> None:
    assert pvc_pod_path("pvc://fedrun-demo-data/site/a.csv") == "/data/fedrun-demo-data/site/a.csv"
    assert api.pvc_claim("pvc://fedrun-demo-data/site/a.csv") == "fedrun-demo-data"
    assert api.pvc_claim("s3://bucket/a.csv") is None
    assert api.pvc_claim(None) is None
    with pytest.raises(ValueError, match="not a pvc:// URI"):
        pvc_pod_path("file:///data/a.csv")


def test_ledger_defaults_to_the_state_volume_for_pvc_data() -> None:
    run = parse_run(run_obj([{"name": "a", "dataUri": "pvc://data/a.csv"}]))
    assert api.ledger_uri(run, "a") == f"file://{c.STATE_DIR}/ledger/a.json"


def test_default_ledgers_are_keyed_by_the_run_uid() -> None:
    """A run deleted and created again under the same name gets a new uid: its hospitals
    must not find the first run's ledger at the default place."""
    obj = run_obj(
        [
            {"name": "a", "dataUri": "pvc://data/a.csv"},
            {"name": "b", "dataUri": "s3://bucket-b/b.csv"},
        ]
    )
    paths = set()
    for uid in ("uid-1", "uid-2"):
        obj["metadata"]["uid"] = uid
        run = parse_run(obj)
        assert api.ledger_uri(run, "a") == f"file://{c.STATE_DIR}/ledger/{uid}/a.json"
        assert api.ledger_uri(run, "b") == f"s3://bucket-b/fedrun-ledger/research/demo/{uid}/b.json"
        paths |= {api.ledger_uri(run, "a"), api.ledger_uri(run, "b")}
    assert len(paths) == 4


# --------------------------------------------------------------------------- rendering


def test_data_claim_is_mounted_read_only_where_the_trainer_reads() -> None:
    run = parse_run(
        run_obj(
            [
                {"name": "a", "dataUri": "pvc://fedrun-demo-data/hospital-a.csv"},
                {"name": "b", "dataUri": "s3://bucket-b/b.csv"},
            ]
        )
    )
    pods = hospital_pods(run)
    volumes = {v["name"]: v for v in pods["a"]["volumes"]}
    assert volumes["data"] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "fedrun-demo-data", "readOnly": True},
    }
    [container] = pods["a"]["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["data"] == {
        "name": "data",
        "mountPath": "/data/fedrun-demo-data",
        "readOnly": True,
    }
    assert pvc_pod_path(run.spec.hospitals[0].data_uri).startswith(
        mounts["data"]["mountPath"] + "/"
    )
    # Only the hospital that reads a claim mounts one; the server never does.
    assert "data" not in {v["name"] for v in pods["b"]["volumes"]}
    server = next(m for m in render_run(run) if m["kind"] == "Deployment")
    assert all(
        "persistentVolumeClaim" not in v for v in server["spec"]["template"]["spec"]["volumes"]
    )


def test_ledger_claim_is_writable_and_shared_claims_are_mounted_once() -> None:
    run = parse_run(
        run_obj(
            [
                {
                    "name": "a",
                    "dataUri": "pvc://data-a/a.csv",
                    "ledgerUri": "pvc://ledgers/a.json",
                },
                {"name": "b", "dataUri": "pvc://data-b/b.csv", "ledgerUri": "pvc://data-b/b.json"},
            ]
        )
    )
    pods = hospital_pods(run)
    claims_a = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pods["a"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims_a == {
        "data": {"claimName": "data-a", "readOnly": True},
        "ledger": {"claimName": "ledgers", "readOnly": False},
    }
    mounts_a = {m["name"]: m for m in pods["a"]["containers"][0]["volumeMounts"]}
    assert mounts_a["ledger"] == {"name": "ledger", "mountPath": "/data/ledgers", "readOnly": False}
    claims_b = [v for v in pods["b"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims_b == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-b", "readOnly": False}}
    ]
    mount_paths = [m["mountPath"] for m in pods["b"]["containers"][0]["volumeMounts"]]
    assert len(mount_paths) == len(set(mount_paths))


def test_cluster_example_reads_every_hospital_from_the_demo_claim() -> None:
    run = load_run(CLUSTER_EXAMPLE)
    assert [h.data_uri for h in run.spec.hospitals] == [
        f"pvc://fedrun-demo-data/{name}.csv" for name in ("hospital-a", "hospital-b", "hospital-c")
    ]
    for pod in hospital_pods(run).values():
        claims = [
            v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        ]
        assert claims == [{"claimName": "fedrun-demo-data", "readOnly": True}]


# --------------------------------------------------------------------------- the trainer


@pytest.fixture
def mount_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Claims mounted under a temporary directory instead of /data."""
    root = tmp_path / "mnt"
    monkeypatch.setattr(c, "PVC_MOUNT_ROOT", str(root))
    return root


def test_resolve_local_path_maps_pvc_to_the_mount() -> None:
    assert resolve_local_path("pvc://fedrun-demo-data/x/a.csv") == Path(
        "/data/fedrun-demo-data/x/a.csv"
    )


def test_trainer_reads_a_table_from_a_mounted_claim(mount_root: Path) -> None:
    paths = write_demo_hospitals(mount_root / "fedrun-demo-data", n_per_hospital=(40, 30, 20))
    df = load_table("pvc://fedrun-demo-data/hospital-b.csv", "csv")
    assert len(df) == 30
    assert "stroke" in df.columns
    assert paths["hospital-b"] == mount_root / "fedrun-demo-data" / "hospital-b.csv"


def test_missing_file_on_a_claim_names_the_uri_and_the_pod_path(mount_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_table("pvc://fedrun-demo-data/missing.csv", "csv")
    text = str(info.value)
    assert text.startswith("pvc://fedrun-demo-data/missing.csv: file not found")
    assert str(mount_root / "fedrun-demo-data" / "missing.csv") in text


def test_ledger_round_trips_on_a_claim(mount_root: Path) -> None:
    uri = "pvc://ledgers/demo/a.json"
    assert load_ledger(uri) is None
    ledger = new_ledger(
        hospital="a",
        n_train=1000,
        batch_size=50,
        local_epochs=1,
        rounds=2,
        target_epsilon=1.0,
        delta=1e-5,
        accountant="rdp",
        noise_multiplier=1.0,
    )
    save_ledger(uri, ledger)
    assert (mount_root / "ledgers" / "demo" / "a.json").is_file()
    loaded = load_ledger(uri)
    assert loaded is not None
    assert loaded.to_json() == ledger.to_json()


# --------------------------------------------------------------------------- fedrun local


def test_local_runner_refuses_a_claim_and_names_the_way_out(tmp_path: Path) -> None:
    run = load_run(CLUSTER_EXAMPLE)
    with pytest.raises(ClusterOnlyError) as info:
        LocalCluster.create(run, tmp_path / "out")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("spec.hospitals[0].dataUri: pvc://fedrun-demo-data/hospital-a.csv")
    assert all("--data-dir" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_local_runner_refuses_a_ledger_claim(tmp_path: Path) -> None:
    obj = run_obj([{"name": "a", "dataUri": "file:a.csv", "ledgerUri": "pvc://ledgers/a.json"}])
    with pytest.raises(ClusterOnlyError, match=r"spec.hospitals\[0\].ledgerUri: pvc://ledgers"):
        LocalCluster.create(parse_run(obj), tmp_path / "out")


def test_fedrun_local_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = run_local(LocalOptions(file=CLUSTER_EXAMPLE, out=out, progress=False))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedrun local: cannot run {CLUSTER_EXAMPLE} on this machine:")
    assert "spec.hospitals[2].dataUri: pvc://fedrun-demo-data/hospital-c.csv" in err
    assert not out.exists()


def test_data_dir_makes_the_cluster_example_run_locally(tmp_path: Path) -> None:
    run = override_data(load_run(CLUSTER_EXAMPLE), tmp_path / "data")
    cluster = LocalCluster.create(run, tmp_path / "out")
    assert sorted(cluster.hospitals) == ["hospital-a", "hospital-b", "hospital-c"]
    assert all(h.data_uri.startswith("file:///") for h in run.spec.hospitals)
