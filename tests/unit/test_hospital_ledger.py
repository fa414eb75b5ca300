"""A hospital refuses a stored privacy ledger that is not its run's, before any round.

Through the real ClientApp handler (``hospital.hello``) with a real run file and data:
the ledger at the hospital's ``ledgerUri`` was written by another run, or under looser
terms; the hospital fails at once with the reason, and nothing is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_trainer.common import protocol
from fedrun_trainer.common.privacy import new_ledger, save_ledger
from fedrun_trainer.hospital import handlers as hospital

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ClientApp process before the app may create a Message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def hello(tmp_path: Path, ledger: Path) -> tuple[str, str]:
    """hospital-a of run uid ``uid-2`` (the demo spec: target ε 1.0, δ 1e-5) says hello."""
    data = tmp_path / "a.csv"
    synthetic_stroke(120, seed=3).to_csv(data, index=False)
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "federatedrun-local.yaml").read_text()
    )
    doc["metadata"]["uid"] = "uid-2"
    doc["spec"]["hospitals"][0]["dataUri"] = data.as_uri()
    doc["spec"]["hospitals"][0]["ledgerUri"] = ledger.as_uri()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    context = Context(
        run_id=7,
        node_id=1,
        node_config={
            "hospital": "hospital-a",
            "fedrun-config": str(config),
            "state-dir": str(tmp_path / "state"),
            "incarnation": "1",
        },
        state=RecordDict(),
        run_config={},
    )
    msg = Message(RecordDict(), 1, protocol.HELLO)
    msg.metadata.__dict__["_message_id"] = "m-1"
    info = hospital.hello(msg, context).content.config_records[protocol.INFO]
    return str(info["outcome"]), str(info["message"])


def planted(**terms: Any) -> Any:
    args: dict[str, Any] = dict(
        hospital="hospital-a",
        n_train=100,
        batch_size=64,
        local_epochs=1,
        rounds=5,
        target_epsilon=1.0,
        delta=1e-5,
        run_uid="uid-2",
    )
    args.update(terms)
    return new_ledger(**args).with_round(1, [(0.7, 0.5, 2)])


@pytest.mark.parametrize(
    ("terms", "reason"),
    [
        pytest.param({"run_uid": "uid-1"}, "written by another run (uid uid-1)", id="other-run"),
        pytest.param(
            {"target_epsilon": 8.0, "delta": 1e-3}, "target ε=8.0, δ=0.001", id="looser-terms"
        ),
    ],
)
def test_a_ledger_not_this_run_s_fails_the_hospital_at_hello(
    tmp_path: Path, terms: dict[str, Any], reason: str
) -> None:
    ledger = tmp_path / "ledgers" / "a.json"
    save_ledger(ledger.as_uri(), planted(**terms))
    outcome, message = hello(tmp_path, ledger)
    assert outcome == protocol.Outcome.FAILED.value
    assert reason in message
    assert (tmp_path / "state" / hospital.FAILED_MARKER).is_file()


def test_this_run_s_own_ledger_is_resumed(tmp_path: Path) -> None:
    ledger = tmp_path / "ledgers" / "a.json"
    save_ledger(ledger.as_uri(), planted())
    assert hello(tmp_path, ledger) == (protocol.Outcome.OK.value, "")
