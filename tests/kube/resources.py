"""The resources the emulated API server serves, with what discovery says about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedrun_render.crd import build_budget_crd, build_crd

# Every verb a resource's own endpoint answers (RBAC's names for them).
VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


@dataclass(frozen=True)
class Served:
    """One served resource: its identity and its discovery entry."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    custom: bool = False  # backed by a CRD: no strategic merge, PUT needs a resourceVersion

    @property
    def api_version(self) -> str:
        """`apiVersion` of its objects: `v1` for the core group, else `group/version`."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """`plural.group` as kube-apiserver names the resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery(self) -> list[dict[str, Any]]:
        """Its entries in `/api/v1` or `/apis/<group>/<version>` (APIResourceList)."""
        entries: list[dict[str, Any]] = [
            {
                "name": self.plural,
                "singularName": self.singular,
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": list(VERBS if self.plural != "namespaces" else VERBS[:2] + VERBS[3:]),
                **({"shortNames": list(self.short_names)} if self.short_names else {}),
            }
        ]
        for sub in self.subresources:
            entries.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        return entries

    @classmethod
    def from_crd(cls, crd: dict[str, Any]) -> Served:
        """The resource a CRD's first served version defines."""
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("served", True))
        return cls(
            group=spec["group"],
            version=version["name"],
            plural=spec["names"]["plural"],
            kind=spec["names"]["kind"],
            namespaced=spec["scope"] == "Namespaced",
            short_names=tuple(spec["names"].get("shortNames", ())),
            subresources=tuple(sorted(version.get("subresources", {}))),
            custom=True,
        )


FEDERATED_RUNS = Served.from_crd(build_crd())
PRIVACY_BUDGETS = Served.from_crd(build_budget_crd())

SERVED: tuple[Served, ...] = (
    FEDERATED_RUNS,
    PRIVACY_BUDGETS,
    Served("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    Served("", "v1", "services", "Service", True, ("svc",), ("status",)),
    Served("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    Served("", "v1", "secrets", "Secret", True),
    Served("", "v1", "pods", "Pod", True, ("po",), ("status",)),
    Served("", "v1", "events", "Event", True, ("ev",)),
    Served("", "v1", "namespaces", "Namespace", False, ("ns",), ("status",)),
    Served("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status",)),
    Served("batch", "v1", "jobs", "Job", True, (), ("status",)),
    Served("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",)),
    Served(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        ("crd", "crds"),
        ("status",),
    ),
    Served("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    # The operator replicas' leader election (fedrun_operator.leader).
    Served("coordination.k8s.io", "v1", "leases", "Lease", True),
)
