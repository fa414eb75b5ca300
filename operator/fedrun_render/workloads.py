"""Render a FederatedRun into the Kubernetes objects that carry it out.

`render_run` is pure (no I/O, clock or randomness): the operator applies its output, `fedrun
render` prints it for review, and the local runner runs its containers' commands, so all
three agree on names, commands and configuration.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from fedrun_core import names as c
from fedrun_core.api import (
    CheckpointVolume,
    FederatedRun,
    Hospital,
    PodDefaults,
    PodSettings,
    Resources,
    merge_pod_settings,
    pvc_claim,
    pvc_mount_path,
)
from fedrun_render.identity import (
    checkpoint_claim_name,
    config_name,
    hospital_auth_secret_name,
    hospital_name,
    labels,
    metadata,
    secure,
    selector,
    server_address,
    server_name,
    server_tls_secret_name,
)
from fedrun_render.security import network_policies

__all__ = [
    "config_hash",
    "config_json",
    "hospital_pod_settings",
    "pod_defaults_json",
    "render_run",
    "server_pod_settings",
    "to_yaml",
]

Manifest = dict[str, Any]

# Mode of the files of a mounted run Secret (0440: read-only for root and the pod's fsGroup).
SECRET_FILE_MODE = 0o440


# --------------------------------------------------------------------------- config


def config_json(run: FederatedRun) -> str:
    """The trainer configuration mounted at /etc/fedrun/config.json (stable key order).

    `spec.suspend` is left out: suspending or resuming a run must not change the pods'
    configuration (its hash is on their templates, and a Job's template is immutable).
    """
    spec = run.spec_dict()
    spec.pop("suspend", None)
    meta = {"name": run.name, "namespace": run.namespace}
    if run.metadata.uid:
        meta["uid"] = run.metadata.uid  # the hospitals key their privacy ledgers by it
    doc = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": meta,
        "spec": spec,
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _config_map(run: FederatedRun, config: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(run, config_name(run), c.COMPONENT_SERVER),
        "data": {c.CONFIG_FILE: config},
    }


# --------------------------------------------------------------------------- pods


def server_pod_settings(run: FederatedRun, defaults: PodDefaults | None = None) -> PodSettings:
    """The server pod's settings: the cluster's `defaults.server`, then `spec.server` over
    them (see :func:`fedrun_core.api.merge_pod_settings` for how they merge)."""
    return merge_pod_settings(defaults.server if defaults else None, run.spec.server)


def hospital_pod_settings(
    run: FederatedRun, hospital: Hospital, defaults: PodDefaults | None = None
) -> PodSettings:
    """A hospital pod's settings: the cluster's `defaults.hospital`, then
    `spec.hospitalDefaults`, then the hospital's own, each over the ones before."""
    return merge_pod_settings(
        defaults.hospital if defaults else None, run.spec.hospital_defaults, hospital
    )


def _dump(value: Any) -> Any:
    """A settings model (or a list of them) as it goes into a manifest (camelCase, unset
    fields left out)."""
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value.model_dump(mode="json", by_alias=True, exclude_none=True)


def _env(run: FederatedRun, hospital: str | None) -> list[dict[str, str]]:
    env = {
        c.ENV_RUN: run.name,
        "FEDRUN_NAMESPACE": run.namespace,
    }
    if hospital is not None:
        env[c.ENV_HOSPITAL] = hospital
    env |= {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HOME": c.TMP_DIR,
    }
    return [{"name": k, "value": v} for k, v in env.items()]


def _volumes(run: FederatedRun, secret: str | None) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(run)}},
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if secret is not None:
        # Owner (root) and the pod's fsGroup may read; nobody may write.
        volumes.append(
            {
                "name": c.SECRETS_VOLUME,
                "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE},
            }
        )
    return volumes


_VOLUME_MOUNTS: list[dict[str, Any]] = [
    {"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
    {"name": "state", "mountPath": c.STATE_DIR},
    {"name": "tmp", "mountPath": c.TMP_DIR},
]


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": c.RUN_AS_USER,
        "runAsGroup": c.RUN_AS_USER,
        "fsGroup": c.RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _container(
    run: FederatedRun,
    name: str,
    args: list[str],
    settings: PodSettings,
    hospital: str | None,
) -> dict[str, Any]:
    # No `command`: the image's entrypoint (tini) stays PID 1 and reaps Flower's app
    # processes; `args` is the whole fedrun command line.
    container: dict[str, Any] = {
        "name": name,
        "image": run.spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        # fedrun's own variables first: the settings' env cannot take their names, and
        # Kubernetes lets env win over envFrom.
        "env": [*_env(run, hospital), *_dump(settings.env or [])],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.env_from:
        container["envFrom"] = _dump(settings.env_from)
    if settings.resources is not None:
        container["resources"] = _dump(settings.resources)
    container["volumeMounts"] = [dict(m) for m in _VOLUME_MOUNTS]
    container["securityContext"] = _container_security_context()
    return container


def _transport_args(run: FederatedRun) -> list[str]:
    """`--tls-dir` (the mounted Secret) for a secure run, else the explicit `--insecure`."""
    return ["--tls-dir", c.SECRETS_DIR] if secure(run) else ["--insecure"]


def _pod_spec(run: FederatedRun, container: dict[str, Any], secret: str) -> dict[str, Any]:
    """The pod around `container`; a secure run's pod mounts `secret` at SECRETS_DIR."""
    mounted = secret if secure(run) else None
    if mounted is not None:
        container["volumeMounts"].append(
            {"name": c.SECRETS_VOLUME, "mountPath": c.SECRETS_DIR, "readOnly": True}
        )
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": _volumes(run, mounted),
    }


def _with_settings(pod: dict[str, Any], settings: PodSettings) -> dict[str, Any]:
    """`pod` with the run's pod settings added after fedrun's own volumes and mounts.

    The security contexts are left as they are: the settings have no field that reaches them.
    """
    container = pod["containers"][0]
    pod["volumes"].extend(_dump(settings.volumes or []))
    container["volumeMounts"].extend(_dump(settings.volume_mounts or []))
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = _dump(settings.image_pull_secrets)
    if settings.node_selector:
        pod["nodeSelector"] = dict(sorted(settings.node_selector.items()))
    if settings.affinity is not None:
        pod["affinity"] = _dump(settings.affinity)
    if settings.tolerations:
        pod["tolerations"] = _dump(settings.tolerations)
    if settings.priority_class_name is not None:
        pod["priorityClassName"] = settings.priority_class_name
    return pod


def _template_metadata(
    settings: PodSettings,
    own_labels: dict[str, str],
    config: str,
    pod_defaults: PodDefaults | None = None,
) -> dict[str, Any]:
    """A pod template's labels and annotations: the settings' extras, then fedrun's own
    (the config hash, and on the server's the cluster's pod defaults when there are any)."""
    annotations = {**(settings.annotations or {}), c.ANNOTATION_CONFIG_HASH: config_hash(config)}
    recorded = pod_defaults_json(pod_defaults)
    if recorded is not None:
        annotations[c.ANNOTATION_POD_DEFAULTS] = recorded
    return {"labels": {**(settings.labels or {}), **own_labels}, "annotations": annotations}


def pod_defaults_json(pod_defaults: PodDefaults | None) -> str | None:
    """The cluster's pod defaults as recorded on a server's pod template (compact JSON,
    stable key order); None when there are none."""
    if pod_defaults is None:
        return None
    data = pod_defaults.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not any(data.values()):
        return None
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def config_hash(config: str) -> str:
    """sha256 of the config JSON: on pod templates, so a new config restarts the pods."""
    return hashlib.sha256(config.encode()).hexdigest()


def _checkov_skips(run: FederatedRun, resources: Resources | None, field: str) -> dict[str, str]:
    """checkov skip annotations for a run's Deployment or Job, each with its reason.

    Only checks that do not fit this workload are skipped (a pinned digest or a set memory
    limit leaves its check to pass). checkov reads `checkov.io/skip...: CHECK_ID=reason`;
    a reason must not contain "=".
    """
    skips = {
        "CKV_K8S_15": "IfNotPresent so that clusters that preload the trainer image (kind, "
        "air-gapped hospital nodes) can start it; pin spec.image by digest to fix what runs",
    }
    if "@sha256:" not in run.spec.image:
        skips["CKV_K8S_43"] = (
            "the image is the run's spec.image; pin it by digest there (image@sha256:...)"
        )
    requests = (resources.requests if resources else None) or {}
    limits = (resources.limits if resources else None) or {}
    if "cpu" not in limits:
        skips["CKV_K8S_11"] = (
            "fedrun sets no CPU limit of its own: throttling slows DP-SGD training and "
            f"protects nobody; CPU is reserved with requests in {field}"
        )
    missing = {
        "CKV_K8S_10": "cpu" not in requests,
        "CKV_K8S_12": "memory" not in requests,
        "CKV_K8S_13": "memory" not in limits,
    }
    for check, unset in missing.items():
        if unset:
            skips[check] = (
                f"{field} leaves this resource unset; set it there, or give the namespace a "
                "LimitRange that supplies defaults"
            )
    return {
        f"checkov.io/skip-{check.lower().replace('_', '-')}": f"{check}={reason}"
        for check, reason in sorted(skips.items())
    }


# --------------------------------------------------------------------------- server


def _server_deployment(
    run: FederatedRun,
    config: str,
    settings: PodSettings,
    pod_defaults: PodDefaults | None,
    secret_set: str = "",
) -> Manifest:
    container = _container(
        run,
        "server",
        [
            "fedrun",
            "server",
            "--config",
            c.CONFIG_PATH,
            "--state-dir",
            c.STATE_DIR,
            "--fleet-port",
            str(c.FLEET_PORT),
            "--status-port",
            str(c.STATUS_PORT),
            *_transport_args(run),
        ],
        settings,
        None,
    )
    container["ports"] = [
        {"name": c.FLEET_PORT_NAME, "containerPort": c.FLEET_PORT, "protocol": "TCP"},
        {"name": c.STATUS_PORT_NAME, "containerPort": c.STATUS_PORT, "protocol": "TCP"},
    ]
    probe = {"httpGet": {"path": c.HEALTH_PATH, "port": c.STATUS_PORT_NAME}}
    container["readinessProbe"] = {**probe, "periodSeconds": 5, "failureThreshold": 3}
    # The server imports torch before it listens: give liveness a generous start.
    container["livenessProbe"] = {
        **probe,
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "failureThreshold": 6,
    }
    volume = _checkpoint_volume(run)
    if volume is not None:
        container["args"] += ["--checkpoint-dir", c.CHECKPOINT_DIR]
        container["volumeMounts"].append(
            {"name": c.CHECKPOINT_VOLUME, "mountPath": c.CHECKPOINT_DIR}
        )
    pod = _with_settings(
        _pod_spec(run, container, server_tls_secret_name(run, secret_set)), settings
    )
    if volume is not None:
        pod["volumes"].append(
            {
                "name": c.CHECKPOINT_VOLUME,
                "persistentVolumeClaim": {"claimName": checkpoint_claim_name(run)},
            }
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            **metadata(run, server_name(run), c.COMPONENT_SERVER),
            "annotations": _checkov_skips(run, settings.resources, "spec.server.resources"),
        },
        "spec": {
            "replicas": 0 if run.spec.suspend else 1,
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": selector(run)},
            "template": {
                "metadata": _template_metadata(
                    settings, labels(run, c.COMPONENT_SERVER), config, pod_defaults
                ),
                "spec": pod,
            },
        },
    }


def _checkpoint_volume(run: FederatedRun) -> CheckpointVolume | None:
    server = run.spec.server
    return server.checkpoint_volume if server is not None else None


def _checkpoint_claim(run: FederatedRun) -> Manifest | None:
    """The server checkpoint's PersistentVolumeClaim, when the spec asks for one.

    Owned by the run (deleted with it); ReadWriteOnce, which the server Deployment's
    Recreate strategy suits: the old pod lets go of the volume before the new one mounts it.
    """
    volume = _checkpoint_volume(run)
    if volume is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(run, checkpoint_claim_name(run), c.COMPONENT_SERVER),
        "spec": spec,
    }


def _server_service(run: FederatedRun) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(run, server_name(run), c.COMPONENT_SERVER),
        "spec": {
            "type": run.spec.server.service_type,
            "selector": selector(run),
            "ports": [
                {
                    "name": c.FLEET_PORT_NAME,
                    "port": c.FLEET_PORT,
                    "targetPort": c.FLEET_PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": c.STATUS_PORT_NAME,
                    "port": c.STATUS_PORT,
                    "targetPort": c.STATUS_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


# --------------------------------------------------------------------------- hospitals


def _service_account(run: FederatedRun, hospital: Hospital) -> Manifest:
    meta = metadata(run, hospital_name(run, hospital), c.COMPONENT_HOSPITAL, hospital.name)
    if hospital.role_arn is not None:
        meta["annotations"] = {c.ANNOTATION_IRSA_ROLE: hospital.role_arn}
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": False,
    }


def _claims(hospital: Hospital) -> list[tuple[str, str, bool]]:
    """(volume name, claim, read-only) for each PersistentVolumeClaim the hospital reads.

    Data are mounted read-only; a claim that also holds the ledger must be writable.
    """
    data = pvc_claim(hospital.data_uri)
    ledger = pvc_claim(hospital.ledger_uri)
    out: list[tuple[str, str, bool]] = []
    if data is not None:
        out.append(("data", data, ledger != data))
    if ledger is not None and ledger != data:
        out.append(("ledger", ledger, False))
    return out


def _hospital_job(
    run: FederatedRun, hospital: Hospital, config: str, settings: PodSettings, secret_set: str = ""
) -> Manifest:
    name = hospital_name(run, hospital)
    container = _container(
        run,
        "hospital",
        [
            "fedrun",
            "client",
            "--config",
            c.CONFIG_PATH,
            "--hospital",
            hospital.name,
            "--server",
            server_address(run),
            "--state-dir",
            c.STATE_DIR,
            "--termination-log",
            c.TERMINATION_LOG,
            *_transport_args(run),
        ],
        settings,
        hospital.name,
    )
    pod = _pod_spec(run, container, hospital_auth_secret_name(run, hospital, secret_set))
    for volume_name, claim, read_only in _claims(hospital):
        pod["volumes"].append(
            {
                "name": volume_name,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
            }
        )
        container["volumeMounts"].append(
            {"name": volume_name, "mountPath": pvc_mount_path(claim), "readOnly": read_only}
        )
    pod["serviceAccountName"] = name
    # OnFailure keeps the pod, and with it the emptyDir that holds the default file
    # ledger, across container restarts: a crashed client resumes from the ε it spent.
    pod["restartPolicy"] = "OnFailure"
    _with_settings(pod, settings)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **metadata(run, name, c.COMPONENT_HOSPITAL, hospital.name),
            "annotations": _checkov_skips(
                run, settings.resources, f"spec.hospitals[{hospital.name}].resources"
            ),
        },
        "spec": {
            "backoffLimit": c.JOB_BACKOFF_LIMIT,
            "suspend": run.spec.suspend,
            "template": {
                "metadata": _template_metadata(
                    settings, labels(run, c.COMPONENT_HOSPITAL, hospital.name), config
                ),
                "spec": pod,
            },
        },
    }


# --------------------------------------------------------------------------- entry points


def render_run(
    run: FederatedRun,
    *,
    operator_namespace: str = c.DEFAULT_OPERATOR_NAMESPACE,
    pod_defaults: PodDefaults | None = None,
    secret_set: str = "",
) -> list[Manifest]:
    """Every child object of `run`, in apply order.

    ConfigMap `<run>-config`, the checkpoint's PersistentVolumeClaim `<run>-checkpoint` when
    `spec.server.checkpointVolume` asks for one, Deployment and Service `<run>-server`, then
    for each hospital (in spec order) ServiceAccount and Job `<run>-<hospital>`, then the
    run's NetworkPolicies (default deny; the server's and the hospitals' rules, see
    :func:`fedrun_render.security.network_policies`). Equal arguments give equal output.

    `operator_namespace` is the namespace the operator's pod runs in: the server's status
    port (9100) admits the operator's pods from that namespace only. The operator passes its
    own (`OperatorConfig.operator_namespace`); pass the release namespace of the chart when
    rendering for a cluster by hand.

    `pod_defaults` are the cluster's pod settings for every run (the chart's `runDefaults`,
    `OperatorConfig.pod_defaults`): the run's own settings merge over them
    (:func:`server_pod_settings`, :func:`hospital_pod_settings`). The server's pod template
    records them (annotation fedrun.io/pod-defaults) so that a Running run keeps the ones
    it started with.

    `secret_set` names the run's current material set: the pods mount the Secrets of that
    set (:func:`fedrun_render.security.secret_manifests` with the same `secret_set`).
    """
    config = config_json(run)
    claim = _checkpoint_claim(run)
    manifests = [
        _config_map(run, config),
        *([claim] if claim is not None else []),
        _server_deployment(
            run, config, server_pod_settings(run, pod_defaults), pod_defaults, secret_set
        ),
        _server_service(run),
    ]
    for hospital in run.spec.hospitals:
        manifests.append(_service_account(run, hospital))
        settings = hospital_pod_settings(run, hospital, pod_defaults)
        manifests.append(_hospital_job(run, hospital, config, settings, secret_set))
    return manifests + network_policies(run, operator_namespace=operator_namespace)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the config JSON) and no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def to_yaml(manifests: list[Manifest]) -> str:
    """Manifests as one multi-document YAML text (keys in insertion order, deterministic)."""
    return yaml.dump_all(
        manifests,
        Dumper=_Dumper,
        sort_keys=False,
        explicit_start=True,
        width=100,
        allow_unicode=True,
    )
