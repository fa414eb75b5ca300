"""The local runner as a kubelet: run what an operator created in an API server, here.

``make e2e`` puts the operator in the loop without a cluster: the operator talks to an
API server (the emulated one in tests), and :class:`LocalKubelet` watches that API for the
run's server Deployment and hospital Jobs, starts their containers' commands as local
processes (with :class:`fedrun_operator.local.LocalCluster`'s mount and port mapping), and
writes back what a kubelet and the Job and Deployment controllers would: Pods with
container statuses (restart counts, termination messages), Job ``active``/``succeeded``/
``failed`` counts and Complete/Failed conditions, Deployment replica counts.

It follows Kubernetes' semantics where the operator depends on them: Jobs restart their
container ``OnFailure`` until ``backoffLimit`` restarts have failed (then Failed with reason
BackoffLimitExceeded), a suspended Job's pod is stopped, a Deployment scaled to zero stops
its pod, a deleted Job's pod is stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrun_operator import constants as c
from fedrun_operator.api import parse_run
from fedrun_operator.kube import path_of
from fedrun_operator.local import LocalCluster, Pod

log = logging.getLogger("fedrun.kubelet")

Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """A minimal synchronous client for an API server that needs no authentication."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: Obj | None = None, ctype: str = "") -> Obj:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", ctype or "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            out: Obj = json.loads(resp.read() or b"{}")
            return out

    def get(self, api_version: str, kind: str, ns: str, name: str) -> Obj | None:
        """One object, or None when it does not exist."""
        try:
            return self._call("GET", path_of(api_version, kind, ns, name))
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, ns: str, selector: str = "") -> list[Obj]:
        """Objects of a kind in a namespace (optionally by label selector)."""
        path = path_of(api_version, kind, ns)
        if selector:
            path += "?labelSelector=" + urllib.parse.quote(selector)
        items: list[Obj] = self._call("GET", path).get("items") or []
        return items

    def create(self, obj: Obj) -> Obj:
        """Create an object."""
        meta = obj["metadata"]
        return self._call("POST", path_of(obj["apiVersion"], obj["kind"], meta["namespace"]), obj)

    def patch_status(self, api_version: str, kind: str, ns: str, name: str, status: Obj) -> None:
        """Merge-patch an object's status subresource (ignored if the object is gone)."""
        with contextlib.suppress(urllib.error.HTTPError):
            self._call(
                "PATCH",
                path_of(api_version, kind, ns, name) + "/status",
                {"status": status},
                "application/merge-patch+json",
            )


@dataclass
class _Workload:
    """One Deployment's or Job's pod, played by a local process."""

    kind: str
    name: str
    pod: Pod
    pod_name: str
    labels: dict[str, str]
    backoff_limit: int = c.JOB_BACKOFF_LIMIT
    restarts: int = 0
    last_exit: Obj | None = None
    finished: str = ""  # "", "Complete" or "Failed"
    started_at: str = ""
    owner_uid: str = ""  # the Deployment's or Job's uid: its pod's controller


def _owner(kind: str, name: str, uid: str) -> list[Obj]:
    """The pod's ownerReferences, as the Job controller (or a ReplicaSet) writes them."""
    api_version = "batch/v1" if kind == "Job" else "apps/v1"
    return [{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}]


@dataclass
class LocalKubelet:
    """Plays kubelet and the workload controllers for one run's children in one namespace."""

    api: Api
    namespace: str
    run: str
    out: Path
    ports: dict[int, int] = field(default_factory=dict)
    workloads: dict[tuple[str, str], _Workload] = field(default_factory=dict)
    cluster: LocalCluster | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the loop --------------------------------------------------------------------
    def serve(self, stop: threading.Event, interval_s: float = 0.3) -> None:
        """Sync until `stop` is set, then stop every process."""
        try:
            while not stop.is_set():
                try:
                    self.sync_once()
                except (OSError, urllib.error.URLError) as err:
                    log.warning("kubelet sync failed: %s", err)
                stop.wait(interval_s)
        finally:
            self.stop_all()

    def sync_once(self) -> None:
        """One pass: start, stop and restart processes; write statuses back."""
        with self._lock:
            if self.cluster is None and not self._prepare():
                return
            selector = f"{c.LABEL_RUN}={self.run}"
            deps = {
                d["metadata"]["name"]: d
                for d in self.api.list("apps/v1", "Deployment", self.namespace, selector)
            }
            jobs = {
                j["metadata"]["name"]: j
                for j in self.api.list("batch/v1", "Job", self.namespace, selector)
            }
            for (kind, name), w in self.workloads.items():
                obj = deps.get(name) if kind == "Deployment" else jobs.get(name)
                if kind == "Deployment":
                    self._sync_deployment(w, obj)
                else:
                    self._sync_job(w, obj)

    def _prepare(self) -> bool:
        """Once the run's ConfigMap, Service, Deployment and Jobs exist, map them to pods."""
        cm = self.api.get("v1", "ConfigMap", self.namespace, f"{self.run}{c.CONFIG_SUFFIX}")
        if cm is None:
            return False
        run = parse_run(json.loads(cm["data"][c.CONFIG_FILE]))
        server = f"{self.run}{c.SERVER_SUFFIX}"
        dep = self.api.get("apps/v1", "Deployment", self.namespace, server)
        svc = self.api.get("v1", "Service", self.namespace, server)
        jobs = [
            self.api.get("batch/v1", "Job", self.namespace, f"{self.run}-{h.name}")
            for h in run.spec.hospitals
        ]
        if dep is None or svc is None or any(j is None for j in jobs):
            return False
        # The pods' Secret volumes: a pod does not start before its Secret exists.
        secret_names = [
            v["secret"]["secretName"]
            for w in (dep, *jobs)
            if w is not None
            for v in w["spec"]["template"]["spec"].get("volumes", [])
            if "secret" in v
        ]
        secrets = [self.api.get("v1", "Secret", self.namespace, n) for n in secret_names]
        if any(s is None for s in secrets):
            return False
        manifests = [cm, dep, svc, *[j for j in jobs if j is not None]]
        manifests += [s for s in secrets if s is not None]
        cluster = LocalCluster(
            run=run, out=self.out.resolve(), manifests=manifests, ports=dict(self.ports)
        )
        cluster._prepare()
        self.cluster = cluster
        assert cluster.server is not None
        self.workloads[("Deployment", server)] = _Workload(
            "Deployment",
            server,
            cluster.server,
            f"{server}-0",
            dict(dep["spec"]["template"]["metadata"].get("labels", {})),
            owner_uid=str(dep["metadata"].get("uid", "")),
        )
        for job in jobs:
            assert job is not None
            labels = dict(job["spec"]["template"]["metadata"].get("labels", {}))
            pod = cluster.hospitals[labels[c.LABEL_HOSPITAL]]
            self.workloads[("Job", job["metadata"]["name"])] = _Workload(
                "Job",
                job["metadata"]["name"],
                pod,
                f"{job['metadata']['name']}-0",
                labels,
                backoff_limit=int(job["spec"].get("backoffLimit", c.JOB_BACKOFF_LIMIT)),
                owner_uid=str(job["metadata"].get("uid", "")),
            )
        return True

    # -- workloads -------------------------------------------------------------------
    def _sync_deployment(self, w: _Workload, dep: Obj | None) -> None:
        want = 0 if dep is None else int(dep["spec"].get("replicas", 1))
        if want == 0:
            if w.pod.running:
                w.pod.stop()
                self._pod_gone(w)
        elif not w.pod.running:
            if w.pod.proc is not None:  # exited: a Deployment's pod always restarts
                w.restarts += 1
                w.last_exit = self._terminated(w)
            self._start(w)
        if dep is not None:
            ready = 1 if w.pod.running else 0
            self.api.patch_status(
                "apps/v1",
                "Deployment",
                self.namespace,
                w.name,
                {
                    "replicas": ready,
                    "readyReplicas": ready,
                    "availableReplicas": ready,
                    "observedGeneration": dep["metadata"].get("generation", 1),
                },
            )
            self._write_pod(w)

    def _sync_job(self, w: _Workload, job: Obj | None) -> None:
        if job is None:  # deleted: its pod goes with it
            if w.pod.running:
                w.pod.stop()
            return
        if job["spec"].get("suspend"):
            if w.pod.running:
                w.pod.stop()
            self.api.patch_status("batch/v1", "Job", self.namespace, w.name, {"active": 0})
            return
        if not w.finished:
            if not w.pod.running and w.pod.proc is not None:
                code = w.pod.exit_code
                w.last_exit = self._terminated(w)
                if code == 0:
                    w.finished = "Complete"
                elif w.restarts >= w.backoff_limit:
                    w.finished = "Failed"
                else:
                    w.restarts += 1  # restartPolicy OnFailure: the same pod, a new container
                    self._start(w)
            elif w.pod.proc is None:
                self._start(w)
        self._write_job(w, job)
        self._write_pod(w)

    def _start(self, w: _Workload) -> None:
        if w.pod.termination_log is not None:
            with contextlib.suppress(FileNotFoundError):
                w.pod.termination_log.unlink()
        w.pod.start()
        w.started_at = _now()

    def _terminated(self, w: _Workload) -> Obj:
        return {
            "exitCode": w.pod.exit_code,
            "reason": "Completed" if w.pod.exit_code == 0 else "Error",
            "message": w.pod.termination_message(),
            "finishedAt": _now(),
        }

    def _write_job(self, w: _Workload, job: Obj) -> None:
        status: Obj = {"active": 1 if w.pod.running else 0}
        if w.finished == "Complete":
            status |= {
                "succeeded": 1,
                "completionTime": _now(),
                "conditions": [
                    {"type": "Complete", "status": "True", "lastTransitionTime": _now()}
                ],
            }
        elif w.finished == "Failed":
            status |= {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                        "lastTransitionTime": _now(),
                    }
                ],
            }
        if job.get("status", {}) != status or w.finished:
            self.api.patch_status("batch/v1", "Job", self.namespace, w.name, status)

    def _write_pod(self, w: _Workload) -> None:
        state: Obj
        if w.pod.running:
            state = {"running": {"startedAt": w.started_at}}
        elif w.last_exit is not None:
            state = {"terminated": w.last_exit}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        container: Obj = {
            "name": "main",
            "restartCount": w.restarts,
            "state": state,
            "ready": w.pod.running,
        }
        if w.last_exit is not None and w.pod.running:
            container["lastState"] = {"terminated": w.last_exit}
        phase = (
            "Running"
            if w.pod.running
            else (
                "Succeeded" if w.finished == "Complete" else "Failed" if w.finished else "Pending"
            )
        )
        status = {"phase": phase, "podIP": "127.0.0.1", "containerStatuses": [container]}
        existing = self.api.get("v1", "Pod", self.namespace, w.pod_name)
        if existing is None:
            self.api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": w.pod_name,
                        "namespace": self.namespace,
                        "labels": w.labels,
                        "ownerReferences": _owner(w.kind, w.name, w.owner_uid),
                    },
                    "spec": {"containers": [{"name": "main", "image": "local"}]},
                }
            )
        if existing is None or existing.get("status") != status:
            self.api.patch_status("v1", "Pod", self.namespace, w.pod_name, status)

    def _pod_gone(self, w: _Workload) -> None:
        w.last_exit = None

    # -- test hooks --------------------------------------------------------------------
    def kill_hospital(self, hospital: str) -> None:
        """SIGKILL a hospital's container, as if it crashed; the kubelet restarts it."""
        with self._lock:
            name = f"{self.run}-{hospital}"
            self.workloads[("Job", name)].pod.kill(signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every process (hospitals first)."""
        with self._lock:
            for (kind, _), w in sorted(self.workloads.items(), key=lambda kv: kv[0][0] != "Job"):
                if kind == "Job" or kind == "Deployment":
                    w.pod.stop()
