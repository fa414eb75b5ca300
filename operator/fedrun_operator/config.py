"""The operator's settings, read once from ``FEDRUN_OPERATOR_*`` environment variables.

``fedrun operator`` sets them from its flags; tests set them directly. Every setting has a
default that suits a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fedrun_core import names as c
from fedrun_core.api import PodDefaults, parse_pod_defaults

DEFAULT_SERVER_URL = "http://{service}.{namespace}.svc:{port}"
# The namespace the operator's pod runs in; the chart sets it from the downward API
# (`metadata.namespace`). Run servers admit the operator's status reads from there only.
OPERATOR_NAMESPACE_ENV = "FEDRUN_OPERATOR_NAMESPACE"
# The pod settings every run's pods get (JSON of fedrun_core.api.PodDefaults; the chart
# sets it from its `runDefaults`). Each run's own settings merge over them.
POD_DEFAULTS_ENV = "FEDRUN_OPERATOR_POD_DEFAULTS"
# Leader election (fedrun_operator.leader): the Lease's name in the operator's namespace
# (empty: no election, the process reconciles at once, as a single replica must) and the
# pod's name, the first part of each process's identity (the chart sets both).
LEASE_NAME_ENV = "FEDRUN_OPERATOR_LEASE_NAME"
POD_NAME_ENV = "FEDRUN_OPERATOR_POD_NAME"


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator follows runs."""

    # Seconds between two looks at a run (server /status, Jobs) while it is not final.
    poll_seconds: float = 5.0
    # How to reach a run's server status port: placeholders {service}, {namespace}, {port}.
    server_url: str = DEFAULT_SERVER_URL
    # Seconds to wait for a server's /status before calling it unreachable.
    server_timeout_seconds: float = 3.0
    # Seconds a kopf watch stays open before it is reopened (a silent stream reconnects).
    watch_timeout_seconds: int = 300
    # Port of /metrics (0: do not serve).
    metrics_port: int = 8080
    # Seconds a Succeeded run's hospitals get to exit by themselves before what still runs
    # is stopped (fedrun_operator.status.SUCCEEDED_GRACE_S).
    succeeded_grace_seconds: float = 60.0
    # Namespace of the operator's own pod: every run server's NetworkPolicy admits the
    # status port only from the operator's pods in this namespace (render_run's argument).
    operator_namespace: str = c.DEFAULT_OPERATOR_NAMESPACE
    # The cluster's pod settings for every run's server and hospital pods (render_run's
    # `pod_defaults`).
    pod_defaults: PodDefaults = field(default_factory=PodDefaults)
    # Leader election: the Lease (in `operator_namespace`) that replicas compete for; empty
    # turns election off. A standby takes over once the holder has not renewed it for
    # `lease_seconds`; the holder stops (exits) when it could not renew for
    # `renew_deadline_seconds`; both try every `retry_seconds` (docs/operator.md).
    lease_name: str = ""
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """Settings from the environment, defaults for what is unset (or empty).

        Raises ValueError when a setting cannot be parsed, for example a
        FEDRUN_OPERATOR_NAMESPACE that is not a namespace name, or pod defaults
        (FEDRUN_OPERATOR_POD_DEFAULTS) that are not valid pod settings (each bad field named).
        """
        env = os.environ
        return cls(
            poll_seconds=float(env.get("FEDRUN_OPERATOR_POLL_SECONDS", cls.poll_seconds)),
            server_url=env.get("FEDRUN_OPERATOR_SERVER_URL", DEFAULT_SERVER_URL),
            server_timeout_seconds=float(
                env.get("FEDRUN_OPERATOR_SERVER_TIMEOUT_SECONDS", cls.server_timeout_seconds)
            ),
            watch_timeout_seconds=int(
                env.get("FEDRUN_OPERATOR_WATCH_TIMEOUT_SECONDS", cls.watch_timeout_seconds)
            ),
            metrics_port=int(env.get("FEDRUN_OPERATOR_METRICS_PORT", cls.metrics_port)),
            succeeded_grace_seconds=float(
                env.get("FEDRUN_OPERATOR_SUCCEEDED_GRACE_SECONDS", cls.succeeded_grace_seconds)
            ),
            operator_namespace=c.namespace_name(
                env.get(OPERATOR_NAMESPACE_ENV) or cls.operator_namespace
            ),
            pod_defaults=parse_pod_defaults(env.get(POD_DEFAULTS_ENV) or "{}", POD_DEFAULTS_ENV),
            lease_name=env.get(LEASE_NAME_ENV, ""),
            lease_seconds=float(env.get("FEDRUN_OPERATOR_LEASE_SECONDS", cls.lease_seconds)),
            renew_deadline_seconds=float(
                env.get("FEDRUN_OPERATOR_RENEW_DEADLINE_SECONDS", cls.renew_deadline_seconds)
            ),
            retry_seconds=float(env.get("FEDRUN_OPERATOR_RETRY_SECONDS", cls.retry_seconds)),
        )

    def status_url(self, service: str, namespace: str) -> str:
        """Base URL of a run server's status port."""
        return self.server_url.format(service=service, namespace=namespace, port=c.STATUS_PORT)
