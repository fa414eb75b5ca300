"""The SuperLink's Control API, called from ``fedrun server``'s own process.

``flwr supernode register``, ``flwr run``, ``flwr list`` and ``flwr stop`` each start a
Python process that imports Flower's CLI (about 1.5 s of CPU each on a 2-core node, and
the run's start waited on four of them). They are thin wrappers over Flower's
protobuf-over-HTTP client for the Control API (``flwr.supercore.control``); this module
uses that client directly, with the same requests, over the same loopback TLS connection
the CLI would use, so nothing about the SuperLink's checks changes.

Flower's CLI also sends a runtime-version header and exits the process when the SuperLink
answers that the versions are incompatible; here the header is sent and an incompatible
answer is an error like any other (:class:`ControlError`), never an exit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# httpx logs every request at INFO: the run's log is not the place for loopback calls.
logging.getLogger("httpx").setLevel(logging.WARNING)


class ControlError(RuntimeError):
    """A Control API call failed; the message says which and why."""


@dataclass(frozen=True)
class RunStatus:
    """A Flower run's status as the Control API reports it (``finished:completed``...)."""

    status: str
    sub_status: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def __str__(self) -> str:
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def build_fab(pyproject: bytes) -> tuple[bytes, str]:
    """The FAB (Flower App bundle) of a code-free app made of one ``pyproject.toml``.

    Returns the bundle and its sha256, as ``flwr run`` computes them.
    """
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": pyproject})
    return fab, hashlib.sha256(fab).hexdigest()


class _VersionHeaders:
    """Adds Flower's runtime-version headers (the SuperLink checks them) to every call."""

    def __init__(self) -> None:
        from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

        self._headers = dict(RuntimeVersionMetadata.from_local_component("flwr CLI").as_metadata())

    def intercept(self, context: Any, call_next: Any) -> Any:
        from flwr.supercore.interceptors.http.utils import add_headers

        add_headers(context.request, self._headers)
        return call_next(context)


class ControlClient:
    """A client for one SuperLink's Control API at ``address`` (``host:port``).

    ``root_certificates``: the CA file that signs the SuperLink's certificate (TLS);
    None speaks plain HTTP (an insecure run). Close it with :meth:`close`.
    """

    def __init__(self, address: str, root_certificates: Path | None) -> None:
        from flwr.supercore.control import ControlHttpClient

        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=root_certificates is None,
            root_certificates=None if root_certificates is None else str(root_certificates),
            interceptors=[_VersionHeaders()],
        )

    def _call(self, what: str, method: Any, request: Any) -> Any:
        try:
            return method(request)
        except Exception as err:  # httpx, TLS and protobuf errors alike
            raise ControlError(f"{what}: {type(err).__name__}: {err}") from None

    def register_node(self, public_key: bytes) -> int:
        """Register one SuperNode's public key (OpenSSH line, NIST EC); its node id."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest

        key = serialization.load_ssh_public_key(public_key.strip())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ControlError(f"RegisterNode: a {type(key).__name__} is not a NIST EC key")
        # What `flwr supernode register` sends: the key as PEM SubjectPublicKeyInfo.
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        request = RegisterNodeRequest(public_key=pem)
        answer = self._call("RegisterNode", self._client.RegisterNode, request)
        if not answer.node_id:
            raise ControlError("RegisterNode: the SuperLink gave no node id")
        return int(answer.node_id)

    def start_run(self, fab: bytes, fab_hash: str, config: Mapping[str, str]) -> int:
        """Submit a run of the FAB with ``config`` overriding the app's config; its run id."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        request = StartRunRequest(
            fab=fab_to_proto(Fab(fab_hash, fab, {})),
            override_config=user_config_to_proto(dict(config)),
            federation="",
        )
        answer = self._call("StartRun", self._client.StartRun, request)
        if not answer.HasField("run_id"):
            raise ControlError("StartRun: the SuperLink started no run")
        return int(answer.run_id)

    def run_status(self, run_id: int) -> RunStatus | None:
        """The run's status, or None when the SuperLink does not know the run."""
        from flwr.proto.control_pb2 import ListRunsRequest

        answer = self._call("ListRuns", self._client.ListRuns, ListRunsRequest(run_id=run_id))
        for run in answer.run_dict.values():
            return RunStatus(str(run.status.status), str(run.status.sub_status))
        return None

    def stop_run(self, run_id: int) -> bool:
        """Ask the SuperLink to stop the run; whether it says it did."""
        from flwr.proto.control_pb2 import StopRunRequest

        answer = self._call("StopRun", self._client.StopRun, StopRunRequest(run_id=run_id))
        return bool(answer.success)

    def close(self) -> None:
        self._client.close()
