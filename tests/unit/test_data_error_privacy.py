"""Data errors leave the hospital without the data: no cell value, no header name.

What a hospital reports about bad data goes to the server, the run's status and
Kubernetes Events, which far more people read than the data. A sentinel that looks like a
patient record is planted in each place a value could leak from; it must be absent from
``str(err)`` (what leaves), from the ClientApp's reply and from ``failed.json`` (what
the pod's termination message is made of), and present in the local detail and the
hospital's own log, so whoever may see the data can still find the cell.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_core.api import DataSpec, Feature
from fedrun_trainer.common import protocol
from fedrun_trainer.common.data import DataError, load_table, prepare
from fedrun_trainer.hospital import handlers as hospital

SENTINEL = "DOE JANE MRN 123456 HIV+"
REPO = Path(__file__).resolve().parents[2]
GENERIC = DataSpec(
    target_column="outcome",
    features=[
        Feature(name="age", type="numeric", min=0, max=100),
        Feature(name="smoker", type="categorical", categories=["yes", "no"]),
    ],
)
GOOD = "age,smoker,outcome\n50,yes,1\n20,no,0\n70,no,1\n30,yes,0\n"


def _error(tmp_path: Path, text: str) -> DataError:
    path = tmp_path / "h.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare(load_table(str(path), "csv"), GENERIC, str(path))
    return info.value


def _assert_private(err: DataError, *public_words: str) -> None:
    assert SENTINEL not in str(err), str(err)
    assert SENTINEL not in repr(err) and SENTINEL not in err.public
    assert all(SENTINEL not in str(arg) for arg in err.args)
    assert SENTINEL in err.detail, err.detail
    for word in public_words:
        assert word in str(err), (word, str(err))


def test_a_numeric_cell_is_located_not_quoted(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("70,no", f"{SENTINEL},no"))
    _assert_private(err, "h.csv", "line 4, column 'age': not a number")


def test_a_target_cell_is_counted_and_located_not_quoted(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace(",0\n", f",{SENTINEL}\n"))
    _assert_private(
        err, "target column 'outcome' must be binary (0/1): 2 rows are not (first at line 3)"
    )


def test_a_categorical_cell_shows_the_expected_categories_only(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("30,yes", f"30,{SENTINEL}"))
    _assert_private(err, "line 5, column 'smoker': unknown category (expected one of 'yes', 'no')")


def test_a_missing_column_is_named_but_the_file_s_headers_are_not(tmp_path: Path) -> None:
    text = GOOD.replace("age,smoker,outcome", f"{SENTINEL},smoker,outcome")
    err = _error(tmp_path, text)
    _assert_private(err, "missing column(s) 'age'", "3 columns")


def test_a_parser_failure_gives_a_fixed_description_and_the_line(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("70,no,1", f"70,no,1,{SENTINEL}"))
    _assert_private(err, "h.csv: cannot parse as csv (line 4)", "different number of fields")
    assert "Error tokenizing" not in str(err)  # pandas' own words stay local
    assert "Error tokenizing" in err.detail


def test_an_unclosed_quote_names_the_line_it_starts_on(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD.replace("70,no,1", f'70,"{SENTINEL},1'))
    _assert_private(err, "(line 4)", "quoted field is never closed")


def test_a_line_that_is_not_utf8_is_found_and_named(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_bytes(GOOD.replace("70,no", f"70,\xe9{SENTINEL}").encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_table(str(path), "csv")
    _assert_private(info.value, "h.csv: cannot parse as csv (line 4): not UTF-8 text")


def test_an_s3_error_sends_its_code_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.exceptions import ClientError

    class FakeS3:
        def get_object(self, **_: str) -> None:
            error = {"Error": {"Code": "NoSuchKey", "Message": f"no key {SENTINEL}"}}
            raise ClientError(error, "GetObject")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # configured, so no credentials error
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setattr(boto3.Session, "client", lambda *_: FakeS3())
    with pytest.raises(DataError) as info:
        load_table("s3://bucket/h.csv", "csv")
    _assert_private(info.value, "s3://bucket/h.csv: cannot read from S3 (NoSuchKey)")


def test_a_stroke_binary_flag_is_located_not_quoted(tmp_path: Path) -> None:
    df = synthetic_stroke(20, seed=3)
    df.loc[4, "hypertension"] = SENTINEL
    path = tmp_path / "s.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        prepare(load_table(str(path), "csv"), DataSpec(preset="stroke"), str(path))
    _assert_private(info.value, "line 6, column 'hypertension'")


def test_the_error_survives_pickling_with_both_texts() -> None:
    err = pickle.loads(pickle.dumps(DataError("public", f"public; found {SENTINEL!r}")))
    assert str(err) == "public" and SENTINEL in err.detail


# --------------------------------------------------------------------------- the ClientApp


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ClientApp process before the app may create a Message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _node(tmp_path: Path, data: Path) -> tuple[Message, Context, Path]:
    """A hello message and the Context ``fedrun client`` gives hospital-a, reading ``data``."""
    doc = yaml.safe_load((REPO / "examples" / "federatedrun-local.yaml").read_text())
    doc["spec"]["hospitals"][0]["dataUri"] = data.as_uri()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    state = tmp_path / "state"
    context = Context(
        run_id=7,
        node_id=1,
        node_config={
            "hospital": "hospital-a",
            "fedrun-config": str(config),
            "state-dir": str(state),
            "incarnation": "1",
        },
        state=RecordDict(),
        run_config={},
    )
    msg = Message(RecordDict(), 1, protocol.HELLO)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg, context, state


def _reply_text(reply: Message) -> str:
    info = reply.content.config_records[protocol.INFO]
    assert info["outcome"] == protocol.Outcome.FAILED.value
    return str(info["message"])


def _sentinel_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "fedrun.hospital" and r.levelno == logging.ERROR and SENTINEL in r.getMessage()
    ]


def test_bad_data_reaches_the_server_located_and_the_log_with_the_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    df = synthetic_stroke(30, seed=4)
    df.loc[15, "bmi"] = SENTINEL  # data row 16 -> line 17
    data = tmp_path / "hospital-a.csv"
    df.to_csv(data, index=False)
    msg, context, state = _node(tmp_path, data)

    with caplog.at_level(logging.ERROR, logger="fedrun.hospital"):
        reply = hospital.hello(msg, context)

    message = _reply_text(reply)
    assert "hospital-a.csv: line 17, column 'bmi': not a number" in message
    assert SENTINEL not in message
    marker = (state / hospital.FAILED_MARKER).read_text(encoding="utf-8")
    assert SENTINEL not in marker
    assert json.loads(marker)["message"] == message
    assert len(_sentinel_logs(caplog)) == 1  # the value is logged here, once


def test_a_crash_sends_its_type_only_and_logs_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedrun_trainer.hospital import session

    def crash(*_: object) -> None:
        raise RuntimeError(f"cannot convert {SENTINEL}")

    monkeypatch.setattr(session.HospitalSession, "open", crash)
    msg, context, state = _node(tmp_path, tmp_path / "unused.csv")

    with caplog.at_level(logging.ERROR, logger="fedrun.hospital"):
        reply = hospital.hello(msg, context)

    message = _reply_text(reply)
    assert message == "hello failed: RuntimeError; see the hospital's log"
    assert SENTINEL not in (state / hospital.FAILED_MARKER).read_text(encoding="utf-8")
    logged = _sentinel_logs(caplog)
    assert len(logged) == 1 and logged[0].exc_info is not None  # with the traceback
