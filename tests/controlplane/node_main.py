"""The node agent of ``make cluster-up`` as a process of its own: ``node_main.py DIR``.

It logs in to the control plane in DIR as its admin, writes the URL of its Service router
to ``DIR/node-router`` and runs until SIGTERM, when it stops the Pods' processes.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from tests.controlplane.certs import make_pki
from tests.controlplane.cluster import RealCluster
from tests.controlplane.node import NodeAgent
from tests.controlplane.plane import ControlPlane


def main(directory: Path) -> int:
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    plane = ControlPlane(directory=directory, pki=make_pki(directory / "pki"), ports=state["ports"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with NodeAgent(RealCluster(plane), directory / "node") as agent:
        (directory / "node-router").write_text(agent.router_url + "\n", encoding="utf-8")
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
