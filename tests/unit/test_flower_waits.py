"""What fedrun changes around Flower's processes to shorten the waits of a run.

The SuperNode wrapper's clock, the warm executor's roles, the in-process Control API
client (against a real SuperLink in tests/e2e) and the imports the ServerApp leaves for
later. Each test fails if the change is undone.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import subprocess
import sys
import time
import tomllib
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import flwr
import pytest
import yaml

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_trainer import supernode, warm_executor
from fedrun_trainer.common import flwr_env, privacy
from fedrun_trainer.common.data import DataError
from fedrun_trainer.hospital import session
from fedrun_trainer.server.control import RunStatus, build_fab

REPO = Path(__file__).resolve().parents[2]


class RecordingClock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return 42.0


def test_the_supernode_clock_maps_only_flower_s_two_waits() -> None:
    real = RecordingClock()
    clock = supernode.PollClock(real)  # type: ignore[arg-type]
    for seconds in (3, 0.5, 1.0, 0.1):
        clock.sleep(seconds)
    assert real.slept == [supernode.IDLE_POLL_S, supernode.REPLY_POLL_S, 1.0, 0.1]
    assert supernode.IDLE_POLL_S < 3 and supernode.REPLY_POLL_S < 0.5
    assert clock.monotonic() == 42.0  # everything else is the real module's


def test_idle_polls_back_off_to_flower_s_wait_and_a_message_starts_them_over() -> None:
    real = RecordingClock()
    clock = supernode.PollClock(real)  # type: ignore[arg-type]
    for _ in range(40):
        clock.sleep(3)  # a long wait for other hospitals to join
    idle = real.slept
    assert idle[0] == supernode.IDLE_POLL_S
    assert all(b >= a for a, b in itertools.pairwise(idle))
    assert idle[-1] == 3.0 and max(idle) == 3.0
    # In a minute of waiting a hospital asks about 30 times (stock Flower: 20), not 240.
    in_a_minute = sum(1 for t in itertools.accumulate(idle) if t <= 60)
    assert in_a_minute < 35
    # Just after a reply the next round comes quickly: the first second is polled closely.
    real.slept = []
    clock.sleep(0.5)  # a message was handled
    for _ in range(4):
        clock.sleep(3)
    assert real.slept[0] == supernode.REPLY_POLL_S
    assert sum(real.slept[1:]) < 1.0 and real.slept[1] == supernode.IDLE_POLL_S


def test_the_supernode_hook_check_passes_with_the_installed_flwr() -> None:
    supernode.check_hook()


def test_the_supernode_hook_check_refuses_another_flwr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(RuntimeError, match=r"flwr is 1\.42\.0"):
        supernode.check_hook()


def test_the_supernode_declares_a_heartbeat_flower_s_superlink_accepts() -> None:
    from flwr.common import constant

    assert constant.HEARTBEAT_MIN_INTERVAL <= supernode.HEARTBEAT_S
    assert supernode.HEARTBEAT_S < constant.HEARTBEAT_DEFAULT_INTERVAL


def test_the_warm_executor_takes_its_options_out_of_flower_s_arguments() -> None:
    args = ["--runtime-api-address", "127.0.0.1:1", "--insecure"]
    assert warm_executor.split_options(args) == (warm_executor.WarmOptions(), args)
    options, rest = warm_executor.split_options(
        ["--fedrun-role", "client", "--fedrun-preload", "run.json", "hospital-a", "/s", *args]
    )
    assert rest == args
    assert options == warm_executor.WarmOptions("client", ("run.json", "hospital-a", "/s"))
    assert warm_executor.split_options(["--fedrun-role", "server", *args])[0].role == "server"
    with pytest.raises(SystemExit):
        warm_executor.split_options(["--fedrun-role", "superlink"])


def test_the_fab_is_flower_s_bundle_of_the_app_s_pyproject() -> None:
    pyproject = resources.files("fedrun_trainer").joinpath("flower_app/pyproject.toml").read_bytes()
    fab, digest = build_fab(pyproject)
    assert digest == hashlib.sha256(fab).hexdigest()
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        # Flower rewrites the file (comments go); what it says is kept.
        assert tomllib.loads(bundle.read("pyproject.toml").decode()) == tomllib.loads(
            pyproject.decode()
        )


def test_run_status_reads_as_flower_s_cli_prints_it() -> None:
    assert str(RunStatus("finished", "completed")) == "finished:completed"
    assert RunStatus("finished", "failed").finished
    assert not RunStatus("running", "").finished


@pytest.mark.parametrize(
    "module",
    ["fedrun_trainer.server.federation", "fedrun_trainer.common.privacy"],
)
def test_the_serverapp_waits_for_hospitals_without_torch_or_opacus(module: str) -> None:
    """Seconds of imports on a small node: the ServerApp takes them while hospitals join."""
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('torch', 'opacus', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def run_file(tmp_path: Path, rows: int) -> Path:
    """The demo spec with hospital-a reading a synthetic file of ``rows`` rows."""
    data = tmp_path / "a.csv"
    synthetic_stroke(rows, seed=3).to_csv(data, index=False)
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "federatedrun-local.yaml").read_text()
    )
    doc["metadata"]["uid"] = "uid-1"
    doc["spec"]["hospitals"][0]["dataUri"] = data.as_uri()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return config


def test_a_prepared_session_is_what_forked_tasks_open_and_its_sigma_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "_PREPARED", {})
    config = str(run_file(tmp_path, 300))
    privacy.noise_multiplier_for_run.cache_clear()
    prepared = session.prepare(config, "hospital-a", tmp_path / "state")
    assert privacy.noise_multiplier_for_run.cache_info().currsize == 1  # σ was calibrated
    assert session.HospitalSession.open(config, "hospital-a", tmp_path / "state") is prepared
    misses = privacy.noise_multiplier_for_run.cache_info().misses
    prepared.open_ledger()  # what every train task does: no second σ search
    assert privacy.noise_multiplier_for_run.cache_info().misses == misses
    # Another hospital, or another state dir, is opened afresh.
    other = session.HospitalSession.open(config, "hospital-a", tmp_path / "other")
    assert other is not prepared


def test_a_session_that_cannot_be_prepared_is_left_for_the_task_to_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "_PREPARED", {})
    config = run_file(tmp_path, 300)
    (tmp_path / "a.csv").write_text("age,gender\n", encoding="utf-8")  # no target column
    warm_executor.preload(str(config), "hospital-a", str(tmp_path / "state"))  # no raise
    assert session._PREPARED == {}
    with pytest.raises(DataError):
        session.HospitalSession.open(str(config), "hospital-a", tmp_path / "state")


def test_flower_retries_a_missing_object_after_the_short_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.inflatable import inflatable_utils as objects

    for fn in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        assert fn.__kwdefaults__ is not None
        monkeypatch.setitem(fn.__kwdefaults__, "initial_backoff", 1)  # Flower's own
    flwr_env.shorten_object_pull_backoff()
    tries: list[float] = []

    def pull(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise objects.ObjectUnavailableError(object_id)
        return b"content"

    assert objects.pull_objects(["o"], pull) == {"o": b"content"}
    assert tries[1] - tries[0] < 0.5  # Flower's own back-off waits about 1 s
