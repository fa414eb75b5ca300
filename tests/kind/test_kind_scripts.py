"""`make images` and `make e2e-kind` without Docker: the scripts' decisions and their files.

The scripts drive external tools (docker, kind, kubectl, helm). Here those are stand-ins
on PATH that record their arguments and answer as the real ones would, so every branch
runs: the skips with their reasons, the builds, a run that succeeds, fails or times out,
and the clean-up. The manifests the script applies are validated like any other.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_core import names as c
from fedrun_core.api import load_run, pvc_claim, pvc_mount_path

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "kind" / "e2e.sh"
IMAGES = ROOT / "tests" / "kind" / "images.sh"
DEMO_DATA = ROOT / "tests" / "kind" / "demo-data.yaml"
RUN_FILE = ROOT / "examples" / "federatedrun-local-cluster.yaml"

# One stand-in for every tool; it dispatches on the name it was called by. Calls go to
# $FAKE_LOG ("tool args..."); applied files are copied to $FAKE_DIR/applied-N.yaml, and
# helm's arguments, exactly, to $FAKE_DIR/helm-args (NUL-separated).
FAKE = r"""#!/usr/bin/env bash
tool=$(basename "$0")
echo "$tool $*" >>"$FAKE_LOG"
if [[ "$tool" == helm ]]; then printf '%s\0' "$@" >"$FAKE_DIR/helm-args"; fi
sub=""  # the subcommand: the first argument that is not `-n NAMESPACE`
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[$i]}" == -n ]]; then i=$((i + 1)); else sub=${args[$i]}; break; fi
done
case "$tool $sub" in
  "docker info")
    if [[ -n "${FAKE_NO_ENGINE:-}" ]]; then
      echo "Client: Docker Engine" >&2
      echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2
      exit 1
    fi ;;
  "docker build") [[ -z "${FAKE_BUILD_FAILS:-}" ]] || { echo "build failed" >&2; exit 1; } ;;
  "kind get")
    if [[ "$2" == clusters ]]; then echo "${FAKE_CLUSTERS:-}"; else echo "apiVersion: v1"; fi ;;
  "kubectl create") echo "apiVersion: v1"; echo "kind: Namespace" ;;
  "kubectl apply")
    n=$(ls "$FAKE_DIR" | grep -c '^applied-' || true)
    if [[ "$*" == *"-f -"* ]]; then cat >"$FAKE_DIR/applied-$n.yaml"
    else cp "${@: -1}" "$FAKE_DIR/applied-$n.yaml"; fi ;;
  "kubectl get")
    if [[ "$*" == *"jsonpath={.status.phase}"* ]]; then
      # One phase per look, the last one repeated.
      count=$(cat "$FAKE_DIR/looks" 2>/dev/null || echo 0)
      echo $((count + 1)) >"$FAKE_DIR/looks"
      read -r -a phases <<<"$FAKE_PHASES"
      i=$((count < ${#phases[@]} ? count : ${#phases[@]} - 1))
      printf '%s' "${phases[$i]}"
    elif [[ "$*" == *"jsonpath={.status.message}"* ]]; then
      printf '%s' "hospital-b: data error"
    elif [[ "$*" == *"--no-headers"* ]]; then
      echo "stroke-kind   look-$(cat "$FAKE_DIR/looks" 2>/dev/null)"
    elif [[ "$2" == federatedruns ]]; then
      echo "NAME          PHASE       ROUND   EPSILON   AUROC   AGE"
      echo "stroke-kind   Succeeded   3/3     0.98      0.83    4m"
    fi ;;
esac
exit 0
"""


@pytest.fixture
def tools(tmp_path: Path) -> dict[str, Any]:
    """A bin directory with stand-ins for docker, kind, kubectl and helm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fake"
    fake.write_text(FAKE, encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    for name in ("docker", "kind", "kubectl", "helm"):
        (bin_dir / name).symlink_to(fake)
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_DIR": str(state),
        "FAKE_PHASES": "Pending Running Succeeded",
        "HELM": "helm",
        "POLL_SECONDS": "0",
    }
    return {"env": env, "log": tmp_path / "calls.log", "state": state}


def run(script: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script)],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def calls(tools: dict[str, Any], tool: str) -> list[str]:
    log: Path = tools["log"]
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return [line for line in lines if line.split(" ", 1)[0] == tool]


def all_calls(tools: dict[str, Any]) -> list[str]:
    """Every tool call, in order."""
    log: Path = tools["log"]
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def helm_args(tools: dict[str, Any]) -> list[str]:
    """The arguments of the (last) helm call, exactly as the script passed them."""
    raw = (tools["state"] / "helm-args").read_text(encoding="utf-8")
    return raw.split("\0")[:-1]


def applied(tools: dict[str, Any]) -> list[Any]:
    files = sorted(tools["state"].glob("applied-*.yaml"), key=lambda p: int(p.stem.split("-")[1]))
    return [d for f in files for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]


# --------------------------------------------------------------------------- skips


@pytest.mark.parametrize("script", [E2E, IMAGES], ids=["e2e-kind", "images"])
def test_without_docker_it_says_why_and_exits_0(script: Path, tools: dict[str, Any]) -> None:
    result = run(script, tools["env"], DOCKER="no-such-docker")
    assert result.returncode == 0, result.stderr
    target = "e2e-kind" if script == E2E else "images"
    assert result.stdout.startswith(
        f"make {target}: skipped: no 'no-such-docker' command on PATH"
    ), result.stdout
    assert not tools["log"].exists()


@pytest.mark.parametrize("script", [E2E, IMAGES], ids=["e2e-kind", "images"])
def test_without_an_engine_it_quotes_dockers_reason(script: Path, tools: dict[str, Any]) -> None:
    result = run(script, tools["env"], FAKE_NO_ENGINE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        "skipped: 'docker' cannot reach a Docker engine: "
        "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."
    ), result.stdout
    assert calls(tools, "docker") == ["docker info"]


def test_without_kind_it_says_why_and_exits_0(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], KIND="no-such-kind")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("make e2e-kind: skipped: no 'no-such-kind' command on PATH")
    assert not calls(tools, "docker")[1:], "nothing is built or started"


def test_with_docker_and_kind_a_missing_kubectl_is_an_error(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], KUBECTL="no-such-kubectl")
    assert result.returncode == 1
    assert "no 'no-such-kubectl' command on PATH" in result.stderr


def test_this_machine_prints_its_reason(tools: dict[str, Any]) -> None:
    """`make e2e-kind` here, with the real tools: it must say why it does not run."""
    docker = shutil.which("docker")
    if docker is not None:
        engine = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=60, check=False
        )
        if engine.returncode == 0:
            pytest.skip("a Docker engine is reachable here: make e2e-kind would really run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIND", "DOCKER"))}
    result = subprocess.run(
        ["make", "--no-print-directory", "e2e-kind"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^make e2e-kind: skipped: \S.*", result.stdout, re.M), result.stdout


# --------------------------------------------------------------------------- images


def test_images_builds_both_with_the_torch_index(tools: dict[str, Any]) -> None:
    result = run(IMAGES, tools["env"], IMAGE_TAG="t1", TORCH_INDEX_URL="INDEX")
    assert result.returncode == 0, result.stderr
    builds = [line.split() for line in calls(tools, "docker") if line.startswith("docker build")]
    assert len(builds) == 2
    operator, trainer = builds
    assert operator[operator.index("-f") + 1] == "Dockerfile.operator"
    assert operator[operator.index("-t") + 1] == "ghcr.io/fedrun/operator:t1"
    assert not any("TORCH_INDEX_URL" in a for a in operator)
    assert trainer[trainer.index("-f") + 1] == "Dockerfile.trainer"
    assert trainer[trainer.index("-t") + 1] == "ghcr.io/fedrun/trainer:t1"
    assert "TORCH_INDEX_URL=INDEX" in trainer
    assert "VERSION=0.1.0" in trainer
    assert operator[-1] == trainer[-1] == "."
    assert "built ghcr.io/fedrun/operator:t1 and ghcr.io/fedrun/trainer:t1" in result.stdout


def test_images_names_and_source_url_can_be_set(tools: dict[str, Any]) -> None:
    result = run(
        IMAGES,
        tools["env"],
        OPERATOR_IMAGE="registry.invalid/op",
        TRAINER_IMAGE="registry.invalid/tr",
        SOURCE_URL="https://git.example.org/fedrun",
    )
    assert result.returncode == 0, result.stderr
    builds = [line.split() for line in calls(tools, "docker") if line.startswith("docker build")]
    tags = [b[b.index("-t") + 1] for b in builds]
    assert tags == ["registry.invalid/op:0.1.0", "registry.invalid/tr:0.1.0"]
    for build in builds:
        assert "SOURCE_URL=https://git.example.org/fedrun" in build


def test_images_warns_without_a_torch_index(tools: dict[str, Any]) -> None:
    result = run(IMAGES, tools["env"])
    assert result.returncode == 0
    assert "TORCH_INDEX_URL is empty" in result.stderr


def test_a_failed_build_fails_make_images(tools: dict[str, Any]) -> None:
    result = run(IMAGES, tools["env"], FAKE_BUILD_FAILS="1")
    assert result.returncode != 0
    assert "built " not in result.stdout


# --------------------------------------------------------------------------- e2e flow


def test_a_succeeding_run_is_printed_and_the_cluster_deleted(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stroke-kind   Succeeded   3/3" in result.stdout
    assert "passed: stroke-kind Succeeded on kind" in result.stdout
    kind = calls(tools, "kind")
    assert any(k.startswith("kind create cluster --name fedrun-e2e --kubeconfig ") for k in kind)
    assert "kind load docker-image --name fedrun-e2e fedrun-operator:dev fedrun-trainer:dev" in (
        kind
    )
    assert kind[-1] == "kind delete cluster --name fedrun-e2e"
    [install] = calls(tools, "helm")
    assert install.startswith("helm upgrade --install fedrun charts/fedrun")
    assert "--set image.repository=fedrun-operator --set image.tag=dev" in install
    kubectl = calls(tools, "kubectl")
    # Seeded before the run is applied, and the run is followed until it succeeded.
    seeded = kubectl.index(
        "kubectl -n fedrun-demo wait --for=condition=complete job/fedrun-demo-data --timeout=300s"
    )
    applied_at = max(
        i for i, k in enumerate(kubectl) if k.startswith("kubectl -n fedrun-demo apply")
    )
    assert seeded < applied_at
    assert (tools["state"] / "looks").read_text().strip() == "3"
    assert kubectl[-1] == "kubectl get federatedruns -n fedrun-demo"
    kinds = [d["kind"] for d in applied(tools)]
    assert kinds == ["Namespace", "PersistentVolumeClaim", "Job", "FederatedRun"]


@pytest.mark.parametrize("namespace", [None, "trials"], ids=["default", "NAMESPACE=trials"])
def test_the_runs_namespace_exists_before_the_operator_is_told_to_follow_it(
    tools: dict[str, Any], namespace: str | None
) -> None:
    # The chart's operator follows runs only in the namespaces it is given, by a
    # RoleBinding in each, which needs the namespace to exist when helm installs.
    extra = {"NAMESPACE": namespace} if namespace else {}
    namespace = namespace or "fedrun-demo"
    result = run(E2E, tools["env"], SKIP_BUILD="1", **extra)
    assert result.returncode == 0, result.stdout + result.stderr
    log = all_calls(tools)
    created = log.index(f"kubectl create namespace {namespace} --dry-run=client -o yaml")
    [installed] = [i for i, line in enumerate(log) if line.startswith("helm ")]
    # `kubectl create ... | kubectl apply -f -`: the two run at once, in either order.
    applied_at = log.index("kubectl apply -f -")
    assert max(created, applied_at) < installed
    args = helm_args(tools)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert f"watchNamespaces={{{namespace}}}" in sets
    assert not [s for s in sets if s.startswith("clusterWide")]
    assert args[args.index("--namespace") + 1] == "fedrun-system"


def test_the_scripts_helm_values_make_the_operator_follow_the_runs_namespace(
    tools: dict[str, Any],
) -> None:
    """The script's own helm arguments, rendered by the real helm: the operator is bound
    and told to watch where the script applies the run, and nowhere cluster-wide."""
    helm = ROOT / ".tools" / "bin" / "helm"
    binary = str(helm) if os.access(helm, os.X_OK) else shutil.which("helm")
    if binary is None:
        pytest.skip("helm is not installed (make tools)")
    result = run(E2E, tools["env"], SKIP_BUILD="1")
    assert result.returncode == 0, result.stdout + result.stderr
    args = helm_args(tools)
    assert args[:4] == ["upgrade", "--install", "fedrun", "charts/fedrun"]
    rest, i = [], 4
    while i < len(args):  # leave out what only `upgrade` takes
        if args[i] in ("--wait", "--create-namespace"):
            i += 1
        elif args[i] == "--timeout":
            i += 2
        else:
            rest.append(args[i])
            i += 1
    done = subprocess.run(
        [binary, "template", "fedrun", "charts/fedrun", *rest],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    bindings = {
        (d["kind"], d["metadata"].get("namespace"), d["roleRef"]["name"])
        for d in docs
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
    }
    assert ("RoleBinding", "fedrun-demo", "fedrun-operator") in bindings
    # Outside the runs' namespace only the replicas' leader election, on its own Lease.
    elsewhere = {b for b in bindings if b[0] == "RoleBinding" and b[1] != "fedrun-demo"}
    assert elsewhere <= {("RoleBinding", "fedrun-system", "fedrun-operator-leader")}
    assert {b[2] for b in bindings if b[0] == "ClusterRoleBinding"} <= {"fedrun-operator-scan"}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = container.get("command", []) + container.get("args", [])
    watched = [command[i + 1] for i, a in enumerate(command) if a == "--namespace"]
    assert watched == ["fedrun-demo"]


def test_keep_cluster_keeps_it(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1", KEEP_CLUSTER="1")
    assert result.returncode == 0, result.stderr
    assert not [k for k in calls(tools, "kind") if k.startswith("kind delete")]
    assert "kept kind cluster fedrun-e2e" in result.stdout


def test_an_existing_cluster_is_used_and_never_deleted(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1", FAKE_CLUSTERS="fedrun-e2e")
    assert result.returncode == 0, result.stderr
    kind = calls(tools, "kind")
    assert not [k for k in kind if k.startswith(("kind create", "kind delete"))]
    assert "kind get kubeconfig --name fedrun-e2e" in kind


def test_a_failed_run_fails_with_its_message_and_diagnostics(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1", FAKE_PHASES="Running Failed")
    assert result.returncode == 1
    assert "stroke-kind ended Failed: hospital-b: data error" in result.stderr
    assert "diagnostics follow" in result.stdout
    assert calls(tools, "kind")[-1] == "kind delete cluster --name fedrun-e2e"
    assert "kubectl get federatedruns -n fedrun-demo" not in calls(tools, "kubectl")


def test_a_run_that_never_finishes_times_out(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1", FAKE_PHASES="Running", E2E_TIMEOUT="0")
    assert result.returncode == 1
    assert "did not succeed within 0s (phase: Running)" in result.stderr


def test_other_image_tags_reach_the_applied_files(tools: dict[str, Any]) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1", IMAGE_TAG="pr-7")
    assert result.returncode == 0, result.stderr
    docs = {d["kind"]: d for d in applied(tools)}
    assert docs["FederatedRun"]["spec"]["image"] == "fedrun-trainer:pr-7"
    [container] = docs["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "fedrun-trainer:pr-7"


def test_the_kubeconfig_is_the_scripts_own(tools: dict[str, Any], tmp_path: Path) -> None:
    result = run(E2E, tools["env"], SKIP_BUILD="1")
    assert result.returncode == 0, result.stderr
    [create] = [k for k in calls(tools, "kind") if k.startswith("kind create")]
    kubeconfig = create.split("--kubeconfig ", 1)[1].split()[0]
    assert not kubeconfig.startswith(str(tmp_path / ".kube"))
    assert not Path(kubeconfig).exists(), "the temporary kubeconfig is removed"


# --------------------------------------------------------------------------- files


def demo_docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(DEMO_DATA.read_text(encoding="utf-8"))}


def script_value(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", E2E.read_text(encoding="utf-8"), re.M)
    assert match is not None, name
    return match.group(1)


def test_demo_data_manifests_are_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in demo_docs().values():
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_demo_data_job_is_restricted() -> None:
    pod = demo_docs()["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == c.RUN_AS_USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert "command" not in container, "only args: tini stays PID 1"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_demo_data_lands_where_the_run_reads_it() -> None:
    docs = demo_docs()
    run_ = load_run(RUN_FILE)
    claims = {pvc_claim(h.data_uri) for h in run_.spec.hospitals}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    pod = docs["Job"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [volume] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert mount["mountPath"] == pvc_mount_path(claim)
    # `fedrun demo-data DIR` writes DIR/<hospital>.csv for the demo's three hospitals.
    assert container["args"] == ["fedrun", "demo-data", pvc_mount_path(claim)]
    assert [h.data_uri for h in run_.spec.hospitals] == [
        f"pvc://{claim}/{h.name}.csv" for h in run_.spec.hospitals
    ]


def test_script_names_match_the_files() -> None:
    run_ = load_run(RUN_FILE)
    assert script_value("RUN_NAME") == run_.name
    assert script_value("FILE_IMAGE") == run_.spec.image
    [container] = demo_docs()["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == run_.spec.image
    assert script_value("RUN_FILE") == RUN_FILE.relative_to(ROOT).as_posix()
    assert script_value("DATA_FILE") == DEMO_DATA.relative_to(ROOT).as_posix()


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    result = subprocess.run(
        [shellcheck, str(E2E), str(IMAGES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout
