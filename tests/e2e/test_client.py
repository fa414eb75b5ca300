"""The hospital wrapper decides its pod's fate: exit codes and termination messages."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fedrun_cli.demo_data import write_demo_hospitals

from .conftest import EXAMPLE


def _run_file(tmp_path: Path) -> Path:
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(200, 200, 200), seed=1)
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc["spec"]["hospitals"] = [{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _fedrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    fedrun = str(Path(sys.executable).parent / "fedrun")
    # A bare PATH: the wrapper must find Flower's executables beside its interpreter.
    return subprocess.run(
        [fedrun, "--log-format", "text", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        check=False,
    )


def _auth_dir(tmp_path: Path) -> Path:
    """The hospital-a files of a run's Secret, as the pod mounts them."""
    from fedrun_core import pki

    material = pki.generate("demo", "default", ["hospital-a"], now=datetime.now(UTC))
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "ca.crt").write_bytes(material.ca_cert)
    (auth / "node.key").write_bytes(material.nodes["hospital-a"].private_key)
    return auth


def test_client_exits_3_naming_the_server_when_it_stays_unreachable(tmp_path):
    term = tmp_path / "termination-log"
    out = _fedrun(
        "client",
        "--config",
        str(_run_file(tmp_path)),
        "--hospital",
        "hospital-a",
        "--server",
        "127.0.0.1:1",
        "--state-dir",
        str(tmp_path / "state"),
        "--server-lost-timeout",
        "6",
        "--termination-log",
        str(term),
        "--tls-dir",
        str(_auth_dir(tmp_path)),
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert "server 127.0.0.1:1 not reachable within 6s" in term.read_text(encoding="utf-8")


def test_client_refuses_a_hospital_the_run_does_not_have(tmp_path):
    out = _fedrun(
        "client",
        "--config",
        str(_run_file(tmp_path)),
        "--hospital",
        "hospital-z",
        "--server",
        "127.0.0.1:1",
        "--state-dir",
        str(tmp_path / "state"),
        "--insecure",
    )
    assert out.returncode == 2
    assert "hospital 'hospital-z' is not in spec.hospitals" in out.stderr
