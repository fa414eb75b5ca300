"""The ``fedrun`` command: render, budget, demo-data, and how it reports a bad spec."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from fedrun_cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "federatedrun-local.yaml"


@pytest.fixture(autouse=True)
def keep_root_logger() -> Iterator[None]:
    """main() points the root logger at the (captured) stderr: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_render_prints_the_runs_children(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLE)]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d is not None]
    kinds = Counter(d["kind"] for d in docs)
    assert kinds["Deployment"] == 1
    assert kinds["Service"] == 1
    assert kinds["Job"] == 3
    assert kinds["ServiceAccount"] == 3
    jobs = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Job")
    assert jobs == ["stroke-demo-hospital-a", "stroke-demo-hospital-b", "stroke-demo-hospital-c"]
    assert all(d["metadata"]["labels"]["fedrun.io/run"] == "stroke-demo" for d in docs)


def status_port_namespaces(text: str) -> list[dict[str, Any]]:
    """namespaceSelectors of the status-port rule of the server NetworkPolicy in `text`."""
    (server,) = [
        d
        for d in yaml.safe_load_all(text)
        if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-server")
    ]
    (rule,) = [
        r for r in server["spec"]["ingress"] if {"protocol": "TCP", "port": 9100} in r["ports"]
    ]
    return [peer["namespaceSelector"] for peer in rule["from"]]


@pytest.mark.parametrize(
    ("flags", "namespace"),
    [([], "fedrun-system"), (["--operator-namespace", "platform-ops"], "platform-ops")],
)
def test_render_pins_the_status_port_to_the_operator_namespace(
    flags: list[str], namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", str(EXAMPLE), *flags]) == 0
    assert status_port_namespaces(capsys.readouterr().out) == [
        {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    ]


def test_render_refuses_a_bad_operator_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["render", str(EXAMPLE), "--operator-namespace", "Fedrun_System"])
    assert exit_.value.code == 2
    assert "--operator-namespace" in capsys.readouterr().err


def test_bad_spec_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    spec["spec"]["rounds"] = 0
    spec["spec"]["privacy"]["targetEpsilonn"] = 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert main(["render", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedrun: invalid FederatedRun")
    assert str(bad) in captured.err
    assert "spec.rounds" in captured.err
    assert "spec.privacy.targetEpsilonn: unknown field" in captured.err


def test_missing_spec_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_budget_prints_sigma_and_epsilon_per_round_within_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["budget", str(EXAMPLE), "--rows", "1200"]) == 0
    out = capsys.readouterr().out
    sigmas = re.findall(r"σ=([0-9.]+)", out)
    assert len(sigmas) == 3 and all(float(s) > 0 for s in sigmas)
    per_round = re.findall(r"ε after each round: (.*)", out)
    assert len(per_round) == 3  # one line per hospital
    for line in per_round:
        eps = [float(v) for v in line.split(", ")]
        assert len(eps) == 5  # spec.rounds
        assert eps == sorted(eps) and eps[0] > 0
        assert eps[-1] <= 1.0  # targetEpsilon
    assert "1200 training rows" in out


def test_demo_data_writes_three_hospital_csvs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo-data", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert files == ["hospital-a.csv", "hospital-b.csv", "hospital-c.csv"]
    for name in files:
        df = pd.read_csv(tmp_path / name)
        assert len(df) > 100
        assert "stroke" in df.columns
    assert "SYNTHETIC" in capsys.readouterr().out


def test_every_subcommand_is_known_to_the_parser() -> None:
    parser = build_parser()
    for argv in (
        ["render", "f.yaml"],
        ["local", "f.yaml"],
        ["server", "--config", "c.json", "--tls-dir", "tls"],
        ["server", "--config", "c.json", "--insecure"],
        ["client", "--config", "c.json", "--hospital", "h", "--server", "s:1", "--tls-dir", "t"],
        ["budget", "f.yaml"],
        ["demo-data", "d"],
    ):
        assert parser.parse_args(argv).command == argv[0]


@pytest.mark.parametrize("command", ["server", "client"])
def test_server_and_client_need_tls_or_an_explicit_insecure(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--config", "c.json", "--hospital", "h", "--server", "s:1"]
    if command == "server":
        argv = argv[:3]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "one of the arguments --tls-dir --insecure is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--tls-dir", "t", "--insecure"])


def test_demo_data_refuses_a_missing_real_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-stroke.csv"
    assert main(["demo-data", str(tmp_path / "out"), "--real", str(missing)]) == 2
    assert "no-such-stroke.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_budget_names_the_hospital_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    missing = tmp_path / "gone.csv"
    doc["spec"]["hospitals"][0]["dataUri"] = missing.as_uri()
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert main(["budget", str(run_file)]) == 1
    out = capsys.readouterr().out
    assert "hospital-a: cannot read data" in out
    assert "gone.csv" in out
