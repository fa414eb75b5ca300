"""fedrun's local kubelet: one Node of a real control plane, whose Pods run as local processes.

There is no container runtime here, so the :class:`NodeAgent` plays the kubelet (and, for
loopback, kube-proxy) for one Node:

- it registers the Node, keeps it ``Ready`` and renews its Lease in ``kube-node-lease``, so
  the node lifecycle controller neither taints it nor evicts its Pods;
- it runs the container of every Pod the scheduler binds to it as a process group: the
  image's entrypoint is fedrun's ``tini``, so the Pod's ``args`` (``fedrun ...``) are the
  command, with ``fedrun`` the one beside this interpreter. Mounted ConfigMaps, Secrets
  (with the Pod's ``defaultMode``) and emptyDirs become directories of the Pod's sandbox; a
  bound PersistentVolumeClaim is its hostPath PersistentVolume's directory;
  every argument or environment value under a mount path is rewritten to that directory;
  ``env`` values, ``fieldRef``, ``secretKeyRef`` and ``configMapKeyRef`` are resolved;
  a ServiceAccount token volume becomes a kubeconfig (``KUBECONFIG``) with a token of the
  Pod's ServiceAccount from the TokenRequest API, so a process logs in as that account and
  RBAC applies;
- it writes Pod status back: phase, conditions, container state, restart counts as the
  ``restartPolicy`` says, exit codes and termination messages (the file at
  ``terminationMessagePath``, or the log's tail with ``FallbackToLogsOnError``); a Pod being
  deleted has its process group stopped (SIGTERM, then SIGKILL after its grace period) and
  is then removed, as a kubelet confirms a deletion;
- Services resolve to loopback: each Service port gets one local port, and the container
  port the Service targets listens there; an argument ``<service>:<port>`` (or
  ``<service>.<namespace>.svc:<port>``) becomes ``127.0.0.1:<local port>``, and
  ``http://127.0.0.1:<router>/<namespace>/<service>/<port>/<path>`` forwards HTTP there (the
  URL template the operator is given for run servers' status).

Stand-ins: in a namespace given to :meth:`NodeAgent.stand_in`, a Pod's container is not its
command but a placeholder process that runs until told to fail (:meth:`NodeAgent.fail`:
it then writes the termination message and exits with the code, at every start, like a
container in a crash loop), for tests of the operator against the real controllers without
real Flower processes.

Not done: image pulls, resource limits, users and groups (processes run as this user), liveness
probes, init and sidecar containers (only the first container runs).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.controlplane.cluster import ApiError, RealCluster
from tests.controlplane.plane import VERSION, free_port

__all__ = ["NodeAgent"]

log = logging.getLogger("fedrun.tests.node")
Obj = dict[str, Any]
LEASE_SECONDS = 40
RENEW_SECONDS = 10.0
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# A stand-in container: wait until the fault file exists, then write its message to the
# termination log and exit with its code (at once on every later start).
STAND_IN = """\
import json, os, sys, time
fault = os.environ["FEDRUN_TEST_FAULT"]
while not os.path.exists(fault):
    time.sleep(0.2)
with open(fault, encoding="utf-8") as handle:
    code, message = json.load(handle)
with open(os.environ["FEDRUN_TEST_TERMINATION_LOG"], "w", encoding="utf-8") as handle:
    handle.write(message)
sys.exit(code)
"""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Sandbox:
    """One Pod on this node: its directories, its process, what its status says."""

    uid: str
    namespace: str
    name: str
    pod: Obj
    directory: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    port_names: dict[str, int] = field(default_factory=dict)  # port name -> containerPort
    termination_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restarts: int = 0
    last_state: Obj | None = None
    terminated: Obj | None = None  # the final state, once the Pod will not run again
    waiting: Obj | None = None
    next_start: float = 0.0
    backoff_s: float = 0.0
    ready: bool = False
    stopping: bool = False
    written: Obj | None = None  # the last status written

    @property
    def log_path(self) -> Path:
        return self.directory / "container.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL after ``grace_s``, and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        self.signal_group(signal.SIGKILL)  # orphans of the group go too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class NodeAgent:
    """Plays the kubelet for Node ``name`` of the control plane ``cluster`` talks to.

    ``directory`` holds the Pods' sandboxes and logs. ``restart_backoff_s`` is the first
    wait before a container restarts (doubling up to ten times that), shorter than a real
    kubelet's 10 s so tests do not wait on it.
    """

    def __init__(
        self,
        cluster: RealCluster,
        directory: Path,
        *,
        name: str = "fedrun-node",
        poll_s: float = 0.5,
        restart_backoff_s: float = 1.0,
    ) -> None:
        self.cluster = cluster
        self.directory = directory.resolve()
        self.name = name
        self.poll_s = poll_s
        self.restart_backoff_s = restart_backoff_s
        self.sandboxes: dict[str, Sandbox] = {}
        self.service_ports: dict[tuple[str, str, int], int] = {}
        self.stand_in_namespaces: set[str] = set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._router: ThreadingHTTPServer | None = None
        self.errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def router_url(self) -> str:
        """Where HTTP to Services is forwarded: ``{router}/<namespace>/<service>/<port>/...``."""
        assert self._router is not None
        return f"http://127.0.0.1:{self._router.server_address[1]}"

    @property
    def server_url_template(self) -> str:
        """The operator's ``--server-url`` for run servers behind this node's router."""
        return self.router_url + "/{namespace}/{service}/{port}"

    def start(self) -> NodeAgent:
        """Register the Node, then keep it Ready and run its Pods in the background."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._register()
        self._start_router()
        for target, name in ((self._heartbeat_loop, "lease"), (self._sync_loop, "pods")):
            thread = threading.Thread(target=target, name=f"node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop every container, then the agent (the Node object is left as it is)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._lock:
            for box in self.sandboxes.values():
                box.stop(grace_s=5)
        if self._router is not None:
            self._router.shutdown()

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the Node

    def _register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        try:
            self.cluster.create(node)
        except ApiError as err:
            if err.code != 409:
                raise
        self._node_status()
        self._renew_lease()

    def _node_status(self) -> None:
        now = _now()
        resources = {"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "200Gi"}
        conditions = [
            (kind, "False", f"KubeletHasSufficient{kind.removesuffix('Pressure')}")
            for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ] + [("Ready", "True", "KubeletReady")]
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": "fedrun's local kubelet",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "machineID": "fedrun-local",
                "systemUUID": "fedrun-local",
                "bootID": "fedrun-local",
                "kernelVersion": os.uname().release,
                "osImage": "fedrun local processes",
                "containerRuntimeVersion": "fedrun-local://1",
                "kubeletVersion": VERSION,
                "kubeProxyVersion": VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.cluster.patch_status("v1", "nodes", None, self.name, status)

    def _renew_lease(self) -> None:
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro_now(),
        }
        try:
            self.cluster.patch(
                "coordination.k8s.io/v1", "leases", "kube-node-lease", self.name, {"spec": spec}
            )
        except ApiError as err:
            if err.code != 404:
                raise
            self.cluster.create(
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                    "spec": spec,
                }
            )

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self._renew_lease()
                beats += 1
                if beats % 4 == 0:
                    self._node_status()
            except (ApiError, OSError) as err:
                self._error(f"heartbeat: {err}")

    # ------------------------------------------------------------------ Pods

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except (ApiError, OSError) as err:
                self._error(f"sync: {err}")
            self._stop.wait(self.poll_s)

    def _error(self, text: str) -> None:
        log.warning("%s", text)
        self.errors.append(text)

    def sync(self) -> None:
        """One pass: start new Pods, follow running ones, stop deleted ones, write status."""
        pods = self.cluster.list("v1", "pods", None, field_selector=f"spec.nodeName={self.name}")
        seen: set[str] = set()
        with self._lock:
            for pod in pods:
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                box = self.sandboxes.get(uid)
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete(pod, box)
                    continue
                if box is None:
                    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                        continue  # finished before this agent started
                    box = self._admit(pod)
                box.pod = pod
                self._step(box)
                self._write_status(box)
            for uid in list(self.sandboxes):
                if uid not in seen:  # gone from the API (force-deleted)
                    self.sandboxes.pop(uid).stop(grace_s=5)

    def _delete(self, pod: Obj, box: Sandbox | None) -> None:
        meta = pod["metadata"]
        if box is not None:
            grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
            box.stop(grace_s=min(grace, 30.0))
            self.sandboxes.pop(box.uid, None)
        try:
            self.cluster.request(
                "DELETE",
                self.cluster.path("v1", "pods", meta["namespace"], meta["name"]),
                {
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
            )
        except ApiError as err:
            if err.code not in (404, 409):
                raise

    # -- admitting a Pod: volumes, ports, command ------------------------------------------

    def _admit(self, pod: Obj) -> Sandbox:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        directory = self.directory / "pods" / ns / f"{name}-{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        box = Sandbox(uid=meta["uid"], namespace=ns, name=name, pod=pod, directory=directory)
        self.sandboxes[box.uid] = box
        try:
            self._prepare(box)
        except (ApiError, KeyError, ValueError, OSError) as err:
            box.waiting = {"reason": "CreateContainerConfigError", "message": str(err)[:500]}
            self._error(f"pod {ns}/{name}: {err}")
        return box

    def _prepare(self, box: Sandbox) -> None:
        spec = box.pod["spec"]
        container = spec["containers"][0]
        mounts = self._volumes(box, spec, container)
        for port in container.get("ports", []):
            number = int(port["containerPort"])
            box.ports[number] = self._local_port(box, number, port.get("name"))
            if port.get("name"):
                box.port_names[port["name"]] = number
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        box.termination_file = box.directory / "termination-log"
        box.termination_file.unlink(missing_ok=True)

        def rewrite(text: str) -> str:
            if text == term_path:
                return str(box.termination_file)
            text = self._resolve_services(box.namespace, text)
            for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if text == mount_path or text.startswith(mount_path + "/"):
                    return str(local) + text[len(mount_path) :]
            return text

        argv = [rewrite(a) for a in [*container.get("command", []), *container.get("args", [])]]
        argv = [str(box.ports[int(a)]) if a.isdigit() and int(a) in box.ports else a for a in argv]
        if box.namespace in self.stand_in_namespaces:
            assert box.termination_file is not None
            box.argv = [sys.executable, "-c", STAND_IN]
            box.env = {
                "PATH": os.environ.get("PATH", ""),
                "FEDRUN_TEST_FAULT": str(box.directory / "fault.json"),
                "FEDRUN_TEST_TERMINATION_LOG": str(box.termination_file),
            }
            return
        if not argv or argv[0] != "fedrun":
            raise ValueError(f"only fedrun's image runs here (the command is {argv[:1]})")
        argv[0] = _fedrun_executable()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "FEDRUN_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["HOME"] = str(box.directory / "home")
        for item in container.get("env", []):
            value = self._env_value(box, item)
            if value is not None:
                env[item["name"]] = rewrite(value)
        if SA_TOKEN_DIR in mounts:
            env["KUBECONFIG"] = str(self._service_account_kubeconfig(box))
        box.argv, box.env = argv, env

    def _volumes(self, box: Sandbox, spec: Obj, container: Obj) -> dict[str, Path]:
        """Materialise each mounted volume; mount path -> directory."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        root = box.directory / "volumes"
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            local = root / mount["name"]
            if "persistentVolumeClaim" in volume:
                local = self._claim_dir(box.namespace, volume["persistentVolumeClaim"])
            elif not local.exists():
                local.mkdir(parents=True)
                self._fill(box, volume, local)
            sub = mount.get("subPath")
            mounts[mount["mountPath"]] = local / sub if sub else local
        return mounts

    def _claim_dir(self, namespace: str, source: Obj) -> Path:
        """The directory of a bound PersistentVolumeClaim: its PersistentVolume's
        ``hostPath`` (the only kind of volume here), which outlives the Pods that mount it."""
        claim = self.cluster.get("v1", "persistentvolumeclaims", namespace, source["claimName"])
        volume_name = (claim.get("spec") or {}).get("volumeName")
        if not volume_name or (claim.get("status") or {}).get("phase") != "Bound":
            raise ValueError(f"PersistentVolumeClaim {source['claimName']} is not bound")
        pv = self.cluster.get("v1", "persistentvolumes", None, volume_name)
        path = Path((pv["spec"].get("hostPath") or {}).get("path") or "")
        if not path.is_absolute():
            raise ValueError(f"PersistentVolume {volume_name}: only hostPath volumes here")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _fill(self, box: Sandbox, volume: Obj, local: Path) -> None:
        ns = box.namespace
        if "configMap" in volume:
            src = volume["configMap"]
            data = self.cluster.get("v1", "configmaps", ns, src["name"]).get("data") or {}
            _write_files(
                local,
                {k: v.encode() for k, v in data.items()},
                src.get("items"),
                src.get("defaultMode", 0o644),
            )
        elif "secret" in volume:
            src = volume["secret"]
            data = self.cluster.get("v1", "secrets", ns, src["secretName"]).get("data") or {}
            files = {k: base64.b64decode(v) for k, v in data.items()}
            _write_files(local, files, src.get("items"), src.get("defaultMode", 0o644))
        elif "emptyDir" in volume:
            return
        elif "projected" in volume:
            return  # a ServiceAccount token: given as KUBECONFIG (see _service_account_kubeconfig)
        else:
            raise ValueError(
                f"volume {volume['name']}: only configMap, secret, emptyDir and projected "
                "ServiceAccount tokens are supported here"
            )

    def _service_account_kubeconfig(self, box: Sandbox) -> Path:
        account = box.pod["spec"].get("serviceAccountName") or "default"
        token = self.cluster.token_for(account, box.namespace)
        path = box.directory / "kubeconfig"
        self.cluster.plane.kubeconfig_for(path, token=token, namespace=box.namespace)
        return path

    def _env_value(self, box: Sandbox, item: Obj) -> str | None:
        if "value" in item:
            return str(item["value"])
        source = item.get("valueFrom") or {}
        meta = box.pod["metadata"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": self.name,
                "spec.serviceAccountName": box.pod["spec"].get("serviceAccountName", "default"),
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }
            return fields.get(path)
        for key, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if key in source:
                ref = source[key]
                try:
                    data = (
                        self.cluster.get("v1", plural, box.namespace, ref["name"]).get("data") or {}
                    )
                except ApiError:
                    if ref.get("optional"):
                        return None
                    raise
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise KeyError(f"{plural} {ref['name']} has no key {ref['key']}")
                raw = data[ref["key"]]
                return base64.b64decode(raw).decode() if plural == "secrets" else str(raw)
        return None

    # -- Services on loopback ----------------------------------------------------------------

    def _service_port(self, namespace: str, service: str, port: int) -> int:
        key = (namespace, service, port)
        if key not in self.service_ports:
            self.service_ports[key] = free_port()
        return self.service_ports[key]

    def _resolve_services(self, namespace: str, text: str) -> str:
        """``<service>[.<ns>[.svc[...]]]:<port>`` in ``text`` -> ``127.0.0.1:<local port>``."""
        pattern = re.compile(
            r"\b([a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.([a-z0-9-]+)(\.svc(\.[a-z0-9.-]+)?)?)?:(\d+)\b"
        )

        def one(match: re.Match[str]) -> str:
            service, ns, port = match.group(1), match.group(4) or namespace, int(match.group(7))
            try:
                svc = self.cluster.get("v1", "services", ns, service)
            except ApiError:
                return match.group(0)
            if not any(int(p["port"]) == port for p in svc["spec"].get("ports", [])):
                return match.group(0)
            return f"127.0.0.1:{self._service_port(ns, service, port)}"

        return pattern.sub(one, text)

    def _local_port(self, box: Sandbox, container_port: int, port_name: str | None) -> int:
        """The local port a container port listens on: its Service's, else a free one."""
        labels = box.pod["metadata"].get("labels") or {}
        for svc in self.cluster.list("v1", "services", box.namespace):
            selector = svc["spec"].get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if target == container_port or (port_name and target == port_name):
                    return self._service_port(
                        box.namespace, svc["metadata"]["name"], int(port["port"])
                    )
        return free_port()

    def _start_router(self) -> None:
        agent = self

        class Router(BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                parts = self.path.split("/", 4)
                if len(parts) < 4 or not parts[3].isdigit():
                    self.send_error(404, "expected /<namespace>/<service>/<port>/<path>")
                    return
                ns, service, port = parts[1], parts[2], int(parts[3])
                rest = "/" + (parts[4] if len(parts) > 4 else "")
                local = agent.service_ports.get((ns, service, port))
                if local is None:
                    self.send_error(503, f"no endpoint for {service}.{ns}:{port} on this node")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                req = urllib.request.Request(
                    f"http://127.0.0.1:{local}{rest}", data=body, method=method
                )
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        data, code, ctype = (
                            resp.read(),
                            resp.status,
                            resp.headers.get("Content-Type", ""),
                        )
                except urllib.error.HTTPError as err:
                    data, code, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
                except OSError as err:
                    self.send_error(503, f"{service}.{ns}:{port}: {err}")
                    return
                self.send_response(code)
                self.send_header("Content-Type", ctype or "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def log_message(self, *args: Any) -> None:
                return

        self._router = ThreadingHTTPServer(("127.0.0.1", 0), Router)
        thread = threading.Thread(
            target=self._router.serve_forever, name="node-router", daemon=True
        )
        thread.start()

    # -- running containers -----------------------------------------------------------------

    def _step(self, box: Sandbox) -> None:
        """Start, restart or finish the container as its Pod's restartPolicy says."""
        if box.terminated is not None or (
            box.waiting and box.waiting.get("reason") == "CreateContainerConfigError"
        ):
            return
        if box.proc is None:
            self._start(box)
            return
        code = box.proc.poll()
        if code is None:
            box.ready = self._probe(box)
            return
        state = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": box.started_at,
            "finishedAt": _now(),
        }
        message = self._termination_message(box, code)
        if message:
            state["message"] = message
        box.signal_group(signal.SIGKILL)  # the container is its whole process group
        policy = box.pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            if box.next_start == 0.0:
                box.backoff_s = min(
                    box.backoff_s * 2 or self.restart_backoff_s, 10 * self.restart_backoff_s
                )
                box.next_start = time.monotonic() + box.backoff_s
                box.last_state = {"terminated": state}
                box.waiting = {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {box.backoff_s:.0f}s restarting failed container",
                }
                box.ready = False
            if time.monotonic() >= box.next_start:
                box.restarts += 1
                box.next_start = 0.0
                self._start(box)
            return
        box.terminated = state
        box.ready = False

    def _start(self, box: Sandbox) -> None:
        if box.termination_file is not None:
            box.termination_file.unlink(missing_ok=True)
        with box.log_path.open("ab") as out:
            box.proc = subprocess.Popen(
                box.argv,
                env=box.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=box.directory,
                start_new_session=True,
            )
        box.started_at = _now()
        box.waiting = None

    def _probe(self, box: Sandbox) -> bool:
        container = box.pod["spec"]["containers"][0]
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        if probe is None:
            return True
        port = probe["port"]
        number = box.port_names.get(port) if isinstance(port, str) else int(port)
        if number is None or number not in box.ports:
            return False
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{box.ports[number]}{probe.get('path', '/')}", timeout=2
            ) as resp:
                return bool(200 <= resp.status < 400)
        except (OSError, urllib.error.URLError):
            return False

    def _termination_message(self, box: Sandbox, code: int) -> str:
        if box.termination_file is not None and box.termination_file.exists():
            text = box.termination_file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text[-4096:]
        container = box.pod["spec"]["containers"][0]
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                lines = box.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                return ""
            return "\n".join(lines[-80:])[-2048:]
        return ""

    # -- status -------------------------------------------------------------------------------

    def _write_status(self, box: Sandbox) -> None:
        container = box.pod["spec"]["containers"][0]
        running = box.running
        if box.terminated is not None:
            state: Obj = {"terminated": box.terminated}
            phase = "Succeeded" if box.terminated["exitCode"] == 0 else "Failed"
        elif running:
            state = {"running": {"startedAt": box.started_at}}
            phase = "Running"
        else:
            state = {"waiting": box.waiting or {"reason": "ContainerCreating"}}
            phase = "Running" if box.restarts or box.last_state else "Pending"
        ready = running and box.ready
        status_of = {"True": True, "False": False}
        conditions = [
            ("PodReadyToStartContainers", "True"),
            ("Initialized", "True"),
            ("ContainersReady", "True" if ready else "False"),
            ("Ready", "True" if ready else "False"),
        ]
        previous = {c["type"]: c for c in (box.pod.get("status") or {}).get("conditions", [])}
        cstatus: Obj = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"fedrun-local://{box.uid}",
            "ready": ready,
            "started": running,
            "restartCount": box.restarts,
            "state": state,
        }
        if box.last_state is not None:
            cstatus["lastState"] = box.last_state
        status: Obj = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": (box.pod.get("status") or {}).get("startTime") or _now(),
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "lastProbeTime": None,
                    "lastTransitionTime": (
                        previous[t]["lastTransitionTime"]
                        if t in previous and status_of.get(previous[t]["status"]) == status_of[s]
                        else _now()
                    ),
                }
                for t, s in conditions
            ]
            + [c for t, c in previous.items() if t == "PodScheduled"],
            "containerStatuses": [cstatus],
        }
        comparable = {k: v for k, v in status.items() if k != "startTime"}
        if comparable == box.written:
            return
        try:
            self.cluster.patch_status("v1", "pods", box.namespace, box.name, status)
            box.written = comparable
        except ApiError as err:
            if err.code != 404:
                raise

    # -- for tests ------------------------------------------------------------------------------

    def sandbox(self, namespace: str, name: str) -> Sandbox:
        """The sandbox of a Pod running here (KeyError if none)."""
        with self._lock:
            for box in self.sandboxes.values():
                if (box.namespace, box.name) == (namespace, name):
                    return box
        raise KeyError(f"no pod {namespace}/{name} on node {self.name}")

    def stand_in(self, namespace: str) -> None:
        """From now on, Pods of ``namespace`` run a placeholder instead of their command."""
        self.stand_in_namespaces.add(namespace)

    def fail(self, namespace: str, name: str, code: int, message: str) -> None:
        """Make a stand-in Pod's container exit with ``code`` and ``message``, at every start."""
        box = self.sandbox(namespace, name)
        path = box.directory / "fault.json"
        path.write_text(json.dumps([code, message]), encoding="utf-8")

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a Pod's container (its process group), as a crash or an OOM kill would."""
        self.sandbox(namespace, name).signal_group(sig)

    def logs(self, namespace: str, tail: int = 3000) -> str:
        """The end of each container log of the Pods of ``namespace`` here (for failures)."""
        out = []
        with self._lock:
            boxes = [b for b in self.sandboxes.values() if b.namespace == namespace]
        for box in boxes:
            if box.log_path.exists():
                text = box.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
                out.append(f"--- {box.namespace}/{box.name}\n{text}")
        return "\n".join(out)

    def processes(self) -> dict[str, int]:
        """``namespace/name`` -> pid of every container running here."""
        with self._lock:
            return {
                f"{b.namespace}/{b.name}": b.proc.pid
                for b in self.sandboxes.values()
                if b.proc is not None and b.proc.poll() is None
            }


def _write_files(
    directory: Path, files: dict[str, bytes], items: list[Obj] | None, mode: int
) -> None:
    chosen = (
        [(item["key"], item["path"], item.get("mode", mode)) for item in items]
        if items
        else [(key, key, mode) for key in files]
    )
    for key, rel, file_mode in chosen:
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(files[key])
        path.chmod(file_mode)


def _fedrun_executable() -> str:
    beside = Path(sys.executable).parent / "fedrun"
    return str(beside) if beside.exists() else (shutil.which("fedrun") or "fedrun")
