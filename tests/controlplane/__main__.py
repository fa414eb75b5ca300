"""``python -m tests.controlplane up|down|status [DIR]``: a real control plane to poke at.

``up`` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
``../shared/kube`` on loopback in DIR (default ``.cluster``), registers fedrun's local
kubelet as its node (so Pods run as local processes), and prints how to use it with
kubectl. The processes stay after the command returns; ``down`` stops them by the process
ids kept in DIR. ``make cluster-up`` / ``make cluster-down`` call these.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.controlplane.plane import ControlPlane, UnavailableError, stop_pids

DEFAULT_DIR = Path(".cluster")


def _up(directory: Path) -> int:
    state = directory / "state.json"
    if state.exists() and any(_alive(p) for p in json.loads(state.read_text())["pids"].values()):
        sys.stderr.write(
            f"a control plane already runs in {directory}; `make cluster-down` first\n"
        )
        return 1
    try:
        plane = ControlPlane.start(directory)
    except UnavailableError as err:
        sys.stderr.write(f"cannot start a control plane: {err}\n")
        return 2
    # The node agent lives in its own process, detached like the control plane.
    log = (directory / "logs" / "node.log").open("ab")
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.controlplane.node_main", str(directory)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    plane.pids["node"] = agent.pid
    plane._save()
    deadline = time.monotonic() + 60
    router = directory / "node-router"
    while not router.exists() and time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.2)
    print(f"export KUBECONFIG={plane.kubeconfig}")
    print(f"# API server {plane.url}; logs in {directory / 'logs'}")
    if router.exists():
        print(f"# the node's Service router: {router.read_text().strip()}")
        print("#   (run the operator with --server-url <that>/{namespace}/{service}/{port})")
    return 0


def _down(directory: Path) -> int:
    state = directory / "state.json"
    if not state.exists():
        sys.stderr.write(f"no control plane state in {directory}\n")
        return 0
    pids = json.loads(state.read_text())["pids"]
    stop_pids(pids)
    print(f"stopped {', '.join(sorted(pids)) or 'nothing'}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__)
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    directory = args.directory.resolve()
    return _up(directory) if args.command == "up" else _down(directory)


if __name__ == "__main__":
    sys.exit(main())
