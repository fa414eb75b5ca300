"""A round the server asks again is answered, never trained or charged twice.

Through the real ClientApp handlers with a real run file, data, DP-SGD and ledger: the
server's record of the hospital's steps (``spent_*``) and its lineage come in the train
message, as the coordinator sends them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_trainer.common import protocol
from fedrun_trainer.common.model import build_model, get_weights
from fedrun_trainer.common.privacy import LedgerRefused, load_ledger
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.hospital import handlers as hospital

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ClientApp process before the app may create a Message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class Site:
    """hospital-a of the demo spec (ε 1.0 over 5 rounds) on 300 synthetic rows."""

    def __init__(self, tmp_path: Path) -> None:
        data = tmp_path / "a.csv"
        synthetic_stroke(300, seed=5).to_csv(data, index=False)
        doc: dict[str, Any] = yaml.safe_load(
            (REPO / "examples" / "federatedrun-local.yaml").read_text()
        )
        doc["metadata"]["uid"] = "uid-7"
        doc["spec"]["hospitals"][0]["dataUri"] = data.as_uri()
        self.ledger_path = tmp_path / "ledger.json"
        doc["spec"]["hospitals"][0]["ledgerUri"] = self.ledger_path.as_uri()
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(doc), encoding="utf-8")
        self.context = Context(
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
        hello = hospital.hello(self._message(protocol.HELLO, RecordDict()), self.context)
        features = int(hello.content.metric_records[protocol.METRICS]["num_features"])
        settings = RunSettings.load(str(config))
        self.start = get_weights(build_model(settings.model_spec(), features, seed=1))

    def _message(self, kind: str, content: RecordDict) -> Message:
        msg = Message(content, 1, kind)
        msg.metadata.__dict__["_message_id"] = f"m-{kind}"
        return msg

    def reply(
        self,
        server_round: int,
        lineage: str,
        record: list[tuple[float, float, int]],
        content: RecordDict | None = None,
    ) -> RecordDict:
        """The content of the hospital's reply to a train request."""
        if content is None:
            content = self.request(server_round, lineage, record)
        return hospital.train(self._message(protocol.TRAIN, content), self.context).content

    def request(
        self, server_round: int, lineage: str, record: list[tuple[float, float, int]]
    ) -> RecordDict:
        """A train request as the coordinator sends it."""
        config: dict[str, Any] = {
            "server_round": server_round,
            "evaluate_first": False,
            "lineage": lineage,
        }
        if record:
            config["spent_sigma"] = [s for s, _, _ in record]
            config["spent_q"] = [q for _, q, _ in record]
            config["spent_steps"] = [n for _, _, n in record]
        return RecordDict(
            {protocol.WEIGHTS: ArrayRecord(self.start), protocol.CONFIG: ConfigRecord(config)}
        )

    def train(
        self, server_round: int, lineage: str, record: list[tuple[float, float, int]]
    ) -> tuple[list[np.ndarray], dict[str, float], float]:
        """(update, privacy figures, examples) of the reply to a train request."""
        reply = self.reply(server_round, lineage, record)
        info = reply.config_records[protocol.INFO]
        assert info["outcome"] == "ok", info["message"]
        privacy = {k: float(v) for k, v in reply.metric_records[protocol.PRIVACY].items()}  # type: ignore[arg-type]
        examples = float(reply.metric_records[protocol.METRICS]["num_examples"])  # type: ignore[arg-type]
        return reply.array_records[protocol.WEIGHTS].to_numpy_ndarrays(), privacy, examples


def test_a_lost_round_is_answered_from_the_kept_update_and_caught_up(tmp_path: Path) -> None:
    site = Site(tmp_path)
    update, privacy, examples = site.train(1, "aa", [])
    per_round = int(privacy["steps"])
    entry = (privacy["noise_multiplier"], privacy["sample_rate"], per_round)
    assert per_round == privacy["steps_per_round"] > 0 and examples > 0
    ledger = load_ledger(site.ledger_path.as_uri())
    assert ledger is not None and ledger.steps == per_round

    # The server died before it recorded round 1, came back from its checkpoint (same
    # lineage) and asks again: the same update, the steps its record lacks, no training.
    again, caught_up, examples_again = site.train(1, "aa", [])
    assert all(np.array_equal(a, b) for a, b in zip(again, update, strict=True))
    assert (caught_up["steps"], examples_again) == (per_round, examples)
    assert load_ledger(site.ledger_path.as_uri()).steps == per_round  # type: ignore[union-attr]

    # Asked once more by a server that did record it: nothing is missing any more.
    _, nothing_missing, _ = site.train(1, "aa", [entry])
    assert nothing_missing["steps"] == 0


def test_a_reply_also_reports_the_steps_of_a_round_the_server_never_heard_of(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    _, first, _ = site.train(1, "aa", [])
    per_round = int(first["steps"])
    # Round 1's reply was lost and round 2 went on without it.
    _, second, _ = site.train(2, "aa", [])
    assert second["steps"] == 2 * per_round
    assert second["steps_per_round"] == per_round


def test_a_server_that_started_over_gets_new_rounds_trained_and_charged_once(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    _, first, _ = site.train(1, "aa", [])
    per_round = int(first["steps"])
    # A new server without the checkpoint (lineage bb) counts rounds from 1 again: this is
    # a new round, trained and charged; what lineage aa spent is not reported again.
    update, privacy, examples = site.train(1, "bb", [])
    assert examples > 0 and privacy["steps"] == per_round
    ledger = load_ledger(site.ledger_path.as_uri())
    assert ledger is not None
    assert ledger.steps == 2 * per_round
    assert (ledger.lineage, ledger.lineage_steps, ledger.rounds_trained) == ("bb", per_round, [1])
    assert privacy["epsilon"] == pytest.approx(ledger.epsilon, rel=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(update, site.start, strict=True))


def test_a_lineage_that_is_not_an_id_fails_the_hospital_before_it_trains(tmp_path: Path) -> None:
    site = Site(tmp_path)
    info = site.reply(1, "../../not-an-id", []).config_records[protocol.INFO]
    assert info["outcome"] == "failed"
    assert "lineage that is not an id" in str(info["message"])
    assert load_ledger(site.ledger_path.as_uri()) is None  # nothing was trained or charged


def test_a_ledger_whose_lineage_is_not_an_id_is_refused_naming_it(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.train(1, "aa", [])
    text = site.ledger_path.read_text(encoding="utf-8").replace('"aa"', '"../x"')
    site.ledger_path.write_text(text, encoding="utf-8")
    with pytest.raises(LedgerRefused, match=str(site.ledger_path.name)):
        load_ledger(site.ledger_path.as_uri())
