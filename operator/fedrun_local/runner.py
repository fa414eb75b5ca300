"""``fedrun local``: one FederatedRun on one machine, as local processes, no cluster.

The runner plays kubelet for the manifests :func:`fedrun_render.workloads.render_run`
produces, so what runs here is exactly what a cluster would run:

- ConfigMaps are written to files and mounted by rewriting their mount paths; so are the
  run's Secrets, made with fresh TLS and node-key material as the operator makes them
  (:func:`run_secrets`), so the local run speaks TLS with node authentication too;
- emptyDir volumes become directories under ``OUT/pods/<pod>/``;
- the server Service's name resolves to 127.0.0.1, its ports to free local ports;
- the server Deployment's container starts first, then each hospital Job's container.

It follows the server's ``/status``, shows a live progress line, and at the end writes
``OUT/status.json`` (the FederatedRun ``.status``), ``OUT/history.json``, ``OUT/report.png``
and prints a table. The MLflow store is the server's (``OUT/pods/<run>-server/state``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrun_core import names as c
from fedrun_core.api import FederatedRun, load_run, pvc_claim
from fedrun_core.states import FINAL_PHASES, HospitalState, Phase, Reason, failed_status
from fedrun_core.times import now_rfc3339
from fedrun_local.budgets import BudgetBook
from fedrun_render.identity import secure
from fedrun_render.workloads import render_run

log = logging.getLogger("fedrun.local")

#: How often the runner starts a server process again after it died before the run ended.
MAX_SERVER_RESTARTS = 5


@dataclass(frozen=True)
class LocalOptions:
    """Options of ``fedrun local``."""

    file: Path
    out: Path
    data_dir: Path | None = None
    progress: bool = True
    timeout_s: float | None = None
    #: PrivacyBudget files the run's hospitals charge (their ``budgetRef``s), see budgets.py.
    budget_files: tuple[Path, ...] = ()


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def override_data(run: FederatedRun, data_dir: Path) -> FederatedRun:
    """The run with every hospital reading ``DATA_DIR/<hospital>.<format>``."""
    ext = run.spec.data.format
    hospitals = [
        h.model_copy(update={"data_uri": (data_dir / f"{h.name}.{ext}").resolve().as_uri()})
        for h in run.spec.hospitals
    ]
    spec = run.spec.model_copy(update={"hospitals": hospitals})
    return run.model_copy(update={"spec": spec})


class ClusterOnlyError(ValueError):
    """The run needs something only a cluster has (a PersistentVolumeClaim, a Secret)."""


def cluster_only(run: FederatedRun) -> list[str]:
    """Why `run` cannot run locally: one line per hospital URI on a PersistentVolumeClaim,
    and per pod setting that reads the cluster (a volume other than emptyDir, env from a
    Secret or ConfigMap, envFrom).

    No local process can mount a claim or read a Secret. Empty when the run can run here.
    The other pod settings (scheduling, labels, resources) mean nothing locally and are
    left out.
    """
    problems = []
    for i, h in enumerate(run.spec.hospitals):
        for field_name, uri in (("dataUri", h.data_uri), ("ledgerUri", h.ledger_uri)):
            if uri is not None and pvc_claim(uri) is not None:
                hint = (
                    "pass --data-dir DIR to read DIR/<hospital>.<format> instead"
                    if field_name == "dataUri"
                    else "give it a file: or s3:// ledgerUri to run it locally"
                )
                problems.append(
                    f"spec.hospitals[{i}].{field_name}: {uri} is on a PersistentVolumeClaim, "
                    f"which exists only in a cluster; {hint}"
                )
    blocks = [
        ("spec.server", run.spec.server),
        ("spec.hospitalDefaults", run.spec.hospital_defaults),
    ]
    blocks += [(f"spec.hospitals[{i}]", h) for i, h in enumerate(run.spec.hospitals)]
    for where, settings in blocks:
        if settings is None:
            continue
        for j, volume in enumerate(settings.volumes or []):
            if volume.empty_dir is None:
                problems.append(
                    f"{where}.volumes[{j}]: volume {volume.name!r} comes from the cluster; "
                    "only emptyDir volumes run locally"
                )
        for j, var in enumerate(settings.env or []):
            if var.value_from is not None:
                problems.append(
                    f"{where}.env[{j}]: {var.name} comes from a Secret or ConfigMap, which "
                    "exists only in a cluster; set it in your environment instead"
                )
        if settings.env_from:
            problems.append(
                f"{where}.envFrom: Secrets and ConfigMaps exist only in a cluster; set the "
                "variables in your environment instead"
            )
    return problems


@dataclass
class Pod:
    """A local process standing in for one pod's single container."""

    name: str
    hospital: str | None
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    termination_log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        """Start (or restart) the process in its own session, output to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group, as a container runtime stops a container."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        # Orphans of the group (Flower's app processes) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def termination_message(self) -> str:
        """What the container wrote to its termination log, else its last log line."""
        if self.termination_log is not None and self.termination_log.exists():
            text = self.termination_log.read_text(encoding="utf-8").strip()
            if text:
                return text
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return lines[-1][-500:] if lines else ""


def _fedrun_executable() -> str:
    """The ``fedrun`` script beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "fedrun"
    return str(beside) if beside.exists() else (shutil.which("fedrun") or "fedrun")


@dataclass
class LocalCluster:
    """The rendered children of one run, as local processes under ``out``."""

    run: FederatedRun
    out: Path
    manifests: list[dict[str, Any]] = field(default_factory=list)
    server: Pod | None = None
    hospitals: dict[str, Pod] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    status_port: int = 0

    @classmethod
    def create(cls, run: FederatedRun, out: Path) -> LocalCluster:
        """Render the run and prepare (not start) its pods.

        Raises :class:`ClusterOnlyError` when the run needs a cluster: a hospital's data or
        ledger on a PersistentVolumeClaim, pod settings that read Secrets (see
        :func:`cluster_only`).
        """
        problems = cluster_only(run)
        if problems:
            raise ClusterOnlyError("\n".join(problems))
        new_run = run.metadata.uid is None
        run = with_uid(run)
        cluster = cls(run=run, out=out.resolve(), manifests=render_run(run) + run_secrets(run))
        if new_run:
            cluster._forget_checkpoints()
        cluster._prepare()
        return cluster

    def _forget_checkpoints(self) -> None:
        """Remove the server checkpoint an earlier ``fedrun local`` left in ``out``.

        Called when this invocation made the run's uid: a new run, which never resumes an
        earlier one's checkpoint (its server would refuse it as another run's). A run file
        that names its uid keeps its checkpoint, and goes on from it; restarts within this
        invocation resume from the checkpoint it writes.
        """
        pod_dir = self.out / "pods" / f"{self.run.name}{c.SERVER_SUFFIX}"
        for stale in (pod_dir / "state" / "checkpoint", pod_dir / c.CHECKPOINT_VOLUME):
            shutil.rmtree(stale, ignore_errors=True)

    # -- kubelet ----------------------------------------------------------------------
    def _by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def _materialise_configmaps(self) -> dict[str, Path]:
        dirs: dict[str, Path] = {}
        for cm in self._by_kind("ConfigMap"):
            d = self.out / "configmaps" / cm["metadata"]["name"]
            d.mkdir(parents=True, exist_ok=True)
            for key, value in cm.get("data", {}).items():
                (d / key).write_text(value, encoding="utf-8")
            dirs[cm["metadata"]["name"]] = d
        return dirs

    def _materialise_secrets(self) -> dict[str, Path]:
        """Each Secret as a directory of its files, readable by this user only."""
        dirs: dict[str, Path] = {}
        for secret in self._by_kind("Secret"):
            d = self.out / "secrets" / secret["metadata"]["name"]
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            for key, value in secret.get("data", {}).items():
                path = d / key
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(base64.b64decode(value))
            dirs[secret["metadata"]["name"]] = d
        return dirs

    def _prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # ConfigMaps and Secrets both become directories, mounted by name.
        sources = self._materialise_configmaps() | self._materialise_secrets()
        services = {s["metadata"]["name"]: s for s in self._by_kind("Service")}
        for svc in services.values():
            for port in svc["spec"]["ports"]:
                self.ports.setdefault(int(port["port"]), free_port())
        self.status_port = self.ports[c.STATUS_PORT]
        for dep in self._by_kind("Deployment"):
            self.server = self._pod(dep, sources, services, hospital=None)
        for job in self._by_kind("Job"):
            hospital = job["metadata"]["labels"][c.LABEL_HOSPITAL]
            self.hospitals[hospital] = self._pod(job, sources, services, hospital=hospital)

    def _pod(
        self,
        workload: dict[str, Any],
        sources: dict[str, Path],
        services: dict[str, dict[str, Any]],
        hospital: str | None,
    ) -> Pod:
        name = workload["metadata"]["name"]
        pod_spec = workload["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        pod_dir = self.out / "pods" / name
        volumes: dict[str, Path] = {}
        for vol in pod_spec.get("volumes", []):
            if "configMap" in vol:
                volumes[vol["name"]] = sources[vol["configMap"]["name"]]
            elif "secret" in vol:
                volumes[vol["name"]] = sources[vol["secret"]["secretName"]]
            else:  # emptyDir (and anything else) becomes a directory of the pod's own
                volumes[vol["name"]] = pod_dir / vol["name"]
                volumes[vol["name"]].mkdir(parents=True, exist_ok=True)
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}

        def rewrite(arg: str) -> str:
            for svc_name, svc in services.items():
                for port in svc["spec"]["ports"]:
                    remote = f"{svc_name}:{port['port']}"
                    if remote in arg:
                        arg = arg.replace(remote, f"127.0.0.1:{self.ports[int(port['port'])]}")
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    return str(local) + arg[len(mount_path) :]
            return arg

        args = [rewrite(a) for a in container.get("args", [])]
        container_ports = {int(p["containerPort"]) for p in container.get("ports", [])}
        args = [
            str(self.ports[int(a)]) if a.isdigit() and int(a) in container_ports else a
            for a in args
        ]
        termination_log: Path | None = None
        if hospital is None:
            args += ["--host", "127.0.0.1"]  # a pod listens on all interfaces; we do not
        else:
            termination_log = pod_dir / "termination-log"
            if "--termination-log" in args:
                args[args.index("--termination-log") + 1] = str(termination_log)
            else:
                args += ["--termination-log", str(termination_log)]
        command = list(container.get("command", [])) + args
        if command and command[0] == "fedrun":
            command[0] = _fedrun_executable()
        env = dict(os.environ)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = rewrite(str(item["value"]))
        env["HOME"] = str(pod_dir / "home")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if hospital is not None:
            env[c.ENV_HOSPITAL] = hospital
        return Pod(
            name=name,
            hospital=hospital,
            argv=command,
            env=env,
            log_path=self.out / "logs" / f"{name}.log",
            termination_log=termination_log,
        )

    # -- lifecycle --------------------------------------------------------------------
    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.status_url + path, timeout=5) as resp:  # noqa: S310
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any] | None:
        """The server's current ``/status``, or None while it is not serving."""
        return self._get("/status")

    def history(self) -> dict[str, Any] | None:
        """The server's per-round history."""
        return self._get("/history")

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start the server, wait until it serves, then start every hospital."""
        assert self.server is not None
        self.server.start()
        deadline = time.monotonic() + ready_timeout_s
        while self.status() is None:
            if not self.server.running:
                raise RuntimeError(
                    f"the server exited with status {self.server.exit_code}: "
                    f"{self.server.termination_message()} (log: {self.server.log_path})"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not serve /status within {ready_timeout_s}s")
            time.sleep(0.2)
        for pod in self.hospitals.values():
            pod.start()

    def kill_hospital(self, name: str) -> None:
        """SIGKILL a hospital's process group, as if its pod died."""
        self.hospitals[name].kill(signal.SIGKILL)

    def restart_hospital(self, name: str) -> None:
        """Start a hospital's process again, as a Job's next pod would."""
        self.hospitals[name].start()

    def wait(
        self,
        timeout_s: float,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Follow ``/status`` until the run is final (or the server is gone, or time is up)."""
        assert self.server is not None
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while True:
            status = self.status()
            if status is not None:
                last = status
                if on_status is not None:
                    on_status(status)
                if status.get("phase") in FINAL_PHASES:
                    return self._merge_pods(status)
            elif not self.server.running and self.server.starts <= MAX_SERVER_RESTARTS:
                # As a Deployment would: a new server process on the same state directory,
                # which resumes from the run's checkpoint there.
                log.warning(
                    "the server exited with status %s; restarting it (restart %d of %d)",
                    self.server.exit_code,
                    self.server.starts,
                    MAX_SERVER_RESTARTS,
                )
                time.sleep(min(10.0, 2.0 ** (self.server.starts - 1)))  # kubelet's back-off
                self.server.start()
            elif not self.server.running:
                message = (
                    f"the server exited with status {self.server.exit_code} and was restarted "
                    f"{MAX_SERVER_RESTARTS} times: {self.server.termination_message()}"
                )
                return self._merge_pods(
                    failed_status(last, Reason.SERVER_ERROR, message, now_rfc3339())
                )
            if time.monotonic() > deadline:
                message = f"fedrun local gave up after {timeout_s:.0f}s"
                return self._merge_pods(
                    failed_status(last, Reason.DEADLINE_EXCEEDED, message, now_rfc3339())
                )
            time.sleep(poll_s)

    def _merge_pods(self, status: dict[str, Any], grace_s: float = 30.0) -> dict[str, Any]:
        """Fold the hospital processes' fates into the status, as the operator does with Jobs."""
        deadline = time.monotonic() + grace_s
        while any(p.running for p in self.hospitals.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        by_name = {h["name"]: h for h in status.get("hospitals", [])}
        for name, pod in self.hospitals.items():
            entry = by_name.setdefault(
                name, {"name": name, "state": HospitalState.PENDING, "restarts": 0}
            )
            entry["restarts"] = max(int(entry.get("restarts", 0)), pod.starts - 1)
            code = pod.exit_code
            if code not in (None, 0) and entry.get("state") != HospitalState.FAILED:
                entry["state"] = HospitalState.FAILED
                entry["message"] = pod.termination_message() or f"exited with status {code}"
        status["hospitals"] = [by_name[n] for n in sorted(by_name)]
        return status

    def stop(self) -> None:
        """Stop every process (hospitals first, then the server)."""
        for pod in self.hospitals.values():
            pod.stop()
        if self.server is not None:
            self.server.stop()


def run_secrets(run: FederatedRun) -> list[dict[str, Any]]:
    """The run's Secrets with fresh material, as the operator makes them; none if insecure.

    The server certificate covers 127.0.0.1, which is where the local hospitals reach it.
    """
    if not secure(run):
        return []
    from fedrun_core import pki
    from fedrun_render.security import secret_manifests

    material = pki.generate(
        run.name,
        run.namespace,
        [h.name for h in run.spec.hospitals],
        now=datetime.now(UTC),
        valid_for=pki.lifetime(run.spec.active_deadline_seconds),
    )
    return secret_manifests(run, material)


def default_timeout(run: FederatedRun) -> float:
    """How long ``fedrun local`` waits: every round's timeout plus joining, with slack."""
    spec = run.spec
    budget = (spec.rounds + 3) * spec.round_timeout_seconds + 60.0
    return (
        float(min(budget, spec.active_deadline_seconds + 60.0))
        if (spec.active_deadline_seconds)
        else budget
    )


def with_uid(run: FederatedRun) -> FederatedRun:
    """The run with a uid of its own, as the API server gives every object it creates.

    Each local run is a new run: its hospitals key their privacy ledgers by the uid, so a
    ledger another run left behind is refused rather than resumed.
    """
    if run.metadata.uid:
        return run
    metadata = run.metadata.model_copy(update={"uid": str(uuid.uuid4())})
    return run.model_copy(update={"metadata": metadata})


def run_local(opts: LocalOptions) -> int:
    """Run the file's FederatedRun locally; 0 when it Succeeded."""
    from fedrun_local import report as local_report

    run = load_run(opts.file)
    if opts.data_dir is not None:
        run = override_data(run, opts.data_dir)
    problems = cluster_only(run)
    if problems:
        sys.stderr.write(
            f"fedrun local: cannot run {opts.file} on this machine:\n"
            + "".join(f"  {p}\n" for p in problems)
        )
        return 2
    if not secure(run):
        from fedrun_render.security import INSECURE_MESSAGE

        sys.stderr.write(f"fedrun local: warning: {INSECURE_MESSAGE}\n")
    run = with_uid(run)  # the key of the run's charges, as the API server's uid would be
    book = BudgetBook.open(run, opts.budget_files)
    refusals = book.reserve()
    if refusals:
        sys.stderr.write(
            "fedrun local: the run cannot start (BudgetUnavailable):\n"
            + "".join(f"  {r}\n" for r in refusals)
        )
        return 1
    out = opts.out
    if out.exists():
        shutil.rmtree(out)
    cluster = LocalCluster.create(run, out)
    started = time.monotonic()
    view = local_report.ProgressView(run, enabled=opts.progress)
    status: dict[str, Any] = {}

    def on_status(current: dict[str, Any]) -> None:
        view.update(current)
        book.charge(current)  # round by round: a run stopped half-way has charged its spend

    try:
        cluster.start()
        view.start()
        status = cluster.wait(opts.timeout_s or default_timeout(run), on_status=on_status)
        history = cluster.history() or {}
    except KeyboardInterrupt:
        view.stop()
        cluster.stop()
        book.charge(status or (cluster.status() or {}), final=True)
        return 130
    finally:
        view.stop()
        cluster.stop()
    book.charge(status, final=True)
    elapsed = time.monotonic() - started
    status_path = local_report.write_outputs(out, status, history)
    local_report.print_summary(run, status, history, out, elapsed, status_path)
    return 0 if status.get("phase") == Phase.SUCCEEDED else 1
