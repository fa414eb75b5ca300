"""A Flower SuperExec that forks each app task from a warm, pre-imported parent.

Stock Flower starts a fresh ``flwr-clientapp`` process for every message, and each one
re-imports torch and Opacus (about 5 s on this project's 2-core machines); the server's
``flwr-serverapp`` process likewise imports Flower's SuperLink (SQLAlchemy and all),
and fedrun's ServerApp before the run can wait for its first hospital. This executor
imports what its role needs once (``--fedrun-role client``, the default: torch and
Opacus, warmed up; ``server``: Flower's ServerApp runtime and fedrun's ServerApp), and
then ``fork()``s a child per task that runs Flower's own ``run_clientapp`` or
``run_serverapp`` with the task's one-time token. Every child reseeds Python, NumPy and
torch from ``os.urandom``: a forked child inherits its parent's random state, and without
the reseed every hospital and round would draw the same DP noise.

It plugs into Flower through ``flwr.supercore.superexec.run_superexec.get_executor``, an
internal hook. That is why flwr is pinned exactly and :func:`check_hook` (run at start
and by the tests) refuses any other flwr version or a changed hook.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedrun.warm_executor")

PINNED_FLWR = "1.41.0"


def check_hook() -> None:
    """Raise ``RuntimeError`` unless Flower's internals are the ones this module was built on."""
    import flwr
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
    from flwr.superlink.runtime import run_serverapp
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    version = getattr(flwr, "__version__", "")
    problems = []
    if version != PINNED_FLWR:
        problems.append(f"flwr is {version}, the warm executor is built for {PINNED_FLWR}")
    if "get_executor" not in rs.run_superexec.__code__.co_names:
        problems.append("run_superexec no longer looks up get_executor by name")
    fields = set(getattr(ExecutionSpec, "__dataclass_fields__", {}))
    needed = {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path"}
    if not needed <= fields:
        problems.append(f"ExecutionSpec lacks {sorted(needed - fields)}")
    params = set(inspect.signature(run_clientapp).parameters)
    if not {"runtime_api_address", "token", "insecure", "certificates"} <= params:
        problems.append(f"run_clientapp's parameters changed: {sorted(params)}")
    server_params = set(inspect.signature(run_serverapp).parameters)
    if not {"runtime_api_address", "log_queue", "token", "insecure", "certificates"} <= (
        server_params
    ):
        problems.append(f"run_serverapp's parameters changed: {sorted(server_params)}")
    if not hasattr(LaunchResult, "accepted"):
        problems.append("LaunchResult.accepted is gone")
    if problems:
        raise RuntimeError("warm executor hook check failed: " + "; ".join(problems))


def reseed() -> int:
    """Seed Python, NumPy and torch from fresh OS entropy; returns the seed used.

    torch is seeded only when the parent imported it (the client role): a child that
    imports it later starts from torch's own seed like any new process, and importing it
    here would cost the server's child seconds before it can take its task.
    """
    import numpy as np

    seed = int.from_bytes(os.urandom(8), "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    return seed


ROLES = ("client", "server")


def warm_up_server() -> None:
    """Import what the ServerApp needs to start waiting for hospitals, once, in the parent.

    Only that: the parent must be ready by the time the run is submitted (its imports run
    beside the SuperLink's). torch, Opacus and MLflow are imported by the ServerApp itself,
    on background threads, while it waits for the hospitals (see ``federation``).
    """
    from flwr.superlink.runtime import run_serverapp  # noqa: F401

    import fedrun_trainer.apps
    import fedrun_trainer.server.federation  # noqa: F401 - coordinator, strategy, state


def warm_up() -> None:
    """Import and exercise what a ClientApp task needs, once, in the parent."""
    import torch

    # One intra-op thread: the models are small, the hospitals share the cores, and an
    # OpenMP pool started before fork() can deadlock the children.
    torch.set_num_threads(1)
    import numpy as np

    import fedrun_trainer.apps
    import fedrun_trainer.hospital.session  # noqa: F401 - data, model, privacy, training
    from fedrun_core.api import PrivacySpec, TrainingSpec
    from fedrun_trainer.common.data import Table
    from fedrun_trainer.hospital.train import start_training

    rng = np.random.default_rng(0)
    table = Table(
        rng.standard_normal((32, 3)).astype(np.float32),
        (rng.random(32) < 0.5).astype(np.float32),
        ["a", "b", "c"],
    )
    spec = TrainingSpec(batch_size=8)
    run = start_training(
        torch.nn.Linear(3, 1), table, spec, PrivacySpec(enabled=True), noise_multiplier=1.0
    )
    for x, y in run.loader:
        run.step(x, y)
    assert run.engine is not None
    run.engine.accountant.get_epsilon(delta=1e-5)


class ForkExecutor:
    """Flower ``Executor`` that forks ClientApp tasks; other task types run as subprocesses."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Every task type can launch at once (no pool to wait for)."""
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, **_: Any) -> None:
        """No capacity gate."""

    def launch(self, spec: Any) -> Any:
        """Fork a child that runs the task with Flower's own ``run_clientapp`` or
        ``run_serverapp``; other task types start as Flower would start them."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type not in (TaskType.CLIENT_APP, TaskType.SERVER_APP):
            return self.fallback.launch(spec)
        pid = os.fork()
        if pid == 0:  # child: never returns
            _run_task(spec, server=spec.task_type == TaskType.SERVER_APP)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (nothing else would)."""
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.children.discard(pid)

    def close(self) -> None:
        """Stop children still running."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _run_task(spec: Any, server: bool) -> None:
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        reseed()
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        certificates = validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        )
        if server:
            _run_serverapp(spec, certificates)
        else:
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            run_clientapp(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                certificates=certificates,
                parent_pid=None,
                runtime_dependency_install=False,
            )
        code = 0
    except SystemExit as exc:  # flwr_exit() ends every task this way
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        log.exception("ClientApp task failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_serverapp(spec: Any, certificates: bytes | None) -> None:
    """What ``flwr-serverapp`` does: mirror the output to the SuperLink, run the app."""
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.superlink.runtime import run_serverapp

    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(
            runtime_api_address=spec.runtime_api_address,
            log_queue=log_queue,
            token=spec.token,
            insecure=spec.insecure,
            certificates=certificates,
            parent_pid=None,
            runtime_dependency_install=False,
        )
    finally:
        restore_output()


@dataclass(frozen=True)
class WarmOptions:
    """fedrun's own options of the warm executor (the rest are ``flower-superexec``'s).

    ``--fedrun-role client|server``; ``--fedrun-preload CONFIG HOSPITAL STATE_DIR`` (client
    role): the hospital whose session and privacy plan the parent prepares for its children.
    """

    role: str = "client"
    preload: tuple[str, str, str] | None = None


def split_options(argv: list[str]) -> tuple[WarmOptions, list[str]]:
    """fedrun's options taken out of ``argv``; the rest is ``flower-superexec``'s."""
    parser = argparse.ArgumentParser(prog="fedrun_trainer.warm_executor", allow_abbrev=False)
    parser.add_argument("--fedrun-role", choices=ROLES, default="client")
    parser.add_argument("--fedrun-preload", nargs=3, metavar=("CONFIG", "HOSPITAL", "STATE_DIR"))
    known, rest = parser.parse_known_args(argv)
    preload = tuple(known.fedrun_preload) if known.fedrun_preload else None
    return WarmOptions(known.fedrun_role, preload), rest  # type: ignore[arg-type]


def preload(config: str, hospital: str, state_dir: str) -> None:
    """Prepare the hospital's session in the parent (see ``session.prepare``); a failure is
    left for the child that needs the session to report."""
    from fedrun_trainer.hospital import session

    try:
        session.prepare(config, hospital, Path(state_dir))
    except Exception as err:  # bad data, a bad spec: the task's own child reports it
        log.info("could not prepare hospital %s's session ahead: %s", hospital, type(err).__name__)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedrun_trainer.warm_executor [fedrun's options] ARGS``, ARGS being
    ``flower-superexec``'s (see :class:`WarmOptions`)."""
    options, rest = split_options(sys.argv[1:] if argv is None else argv)
    check_hook()
    from fedrun_trainer.common import flwr_env

    flwr_env.shorten_object_pull_backoff()  # inherited by every forked task
    if options.role == "server":
        warm_up_server()
    else:
        warm_up()
        if options.preload is not None:
            preload(*options.preload)
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as rs

    rs.get_executor = lambda *args, **kwargs: ForkExecutor()  # type: ignore[attr-defined]
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()
