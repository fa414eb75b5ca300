"""kubectl-like helpers (tests.kube.client.KubeClient) against a real control plane."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.controlplane.plane import ControlPlane
from tests.kube.client import ApiError, KubeClient, Obj

__all__ = ["ApiError", "RealCluster"]


class RealCluster(KubeClient):
    """Requests to a running :class:`ControlPlane`, as its admin (or as a token's owner)."""

    def __init__(
        self,
        plane: ControlPlane,
        *,
        namespace: str = "default",
        token: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.plane = plane
        self.namespace = namespace
        self.timeout = timeout
        self._token = token
        self._ssl = plane.ssl_context() if token is None else _ca_only(plane)

    @property
    def url(self) -> str:
        return self.plane.url

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig."""
        return self.plane.kubeconfig

    def as_token(self, token: str) -> RealCluster:
        """The same helpers, logged in with ``token`` (RBAC applies)."""
        return RealCluster(self.plane, namespace=self.namespace, token=token, timeout=self.timeout)

    def token_for(self, service_account: str, namespace: str, seconds: int = 3600) -> str:
        """A token of ``service_account`` from the TokenRequest API (``kubectl create token``)."""
        path = self.path("v1", "serviceaccounts", namespace, service_account, "token")
        answer: Obj = self.request(
            "POST",
            path,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        token: str = answer["status"]["token"]
        return token

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> Obj:
        """Create namespace ``name`` unless it exists; the stored object."""
        try:
            return self.create(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels or {}},
                }
            )
        except ApiError as err:
            if err.code != 409:
                raise
            return self.get("v1", "namespaces", None, name)

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``kubectl`` against this control plane (admin unless told otherwise)."""
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=kw.pop("timeout", 120),
            **kw,
        )


def _ca_only(plane: ControlPlane) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(plane.pki.ca))
