"""Turn `terraform output -json` (terraform/) into the `hospitals:` block of a FederatedRun.

    terraform -chdir=terraform output -json \\
        | python -m fedrun_cli.terraform_hospitals --data-key stroke/stroke.csv

prints, for every hospital Terraform created, its name, the `s3://` URI of its table inside its
own bucket and its IRSA role, ready to paste under a FederatedRun's `spec:`. Each entry is
validated against the FederatedRun API, so what is printed is accepted by `kubectl apply`.
`make hospitals` runs the command above.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from fedrun_core.api import Hospital

__all__ = ["HospitalsOutputError", "configure_parser", "hospitals_block", "main", "run", "to_yaml"]

# The trainer keeps each hospital's privacy ledger under this prefix of its bucket, and the
# hospital's role may write there; a data table there would be confused with a ledger.
LEDGER_PREFIX = "fedrun-ledger/"
HOSPITAL_PLACEHOLDER = "{hospital}"


class HospitalsOutputError(ValueError):
    """The Terraform output, or the data key, cannot give a valid hospitals block."""


def _hospitals_output(tf_output: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `hospitals` output's value, from `terraform output -json` or `... -json hospitals`."""
    if "hospitals" in tf_output:
        output = tf_output["hospitals"]
        value = output.get("value") if isinstance(output, Mapping) else None
        if not isinstance(value, Mapping):
            raise HospitalsOutputError(
                "the `hospitals` output has no map `value`: is this `terraform output -json`?"
            )
        return value
    if tf_output and all(
        isinstance(v, Mapping) and "role_arn" in v and "bucket" in v for v in tf_output.values()
    ):
        return tf_output  # `terraform output -json hospitals` prints the value alone
    raise HospitalsOutputError(
        "no `hospitals` output: run `terraform output -json` in terraform/ after "
        "`terraform apply` (it lists the outputs)"
    )


def _data_key(data_key: str, hospital: str) -> str:
    key = data_key.replace(HOSPITAL_PLACEHOLDER, hospital)
    if not key or key.startswith("/"):
        raise HospitalsOutputError(
            f"data key {data_key!r}: give the object's key inside the bucket, "
            "e.g. stroke/stroke.csv (no leading '/')"
        )
    if key.startswith(LEDGER_PREFIX):
        raise HospitalsOutputError(
            f"data key {key!r} lies under {LEDGER_PREFIX}, where the privacy ledgers are kept"
        )
    return key


def hospitals_block(tf_output: Mapping[str, Any], data_key: str) -> list[dict[str, str]]:
    """The FederatedRun `spec.hospitals` entries for the hospitals in `tf_output`.

    Parameters
    ----------
    tf_output
        The parsed JSON of `terraform output -json` (all outputs), or of
        `terraform output -json hospitals` (that output's value alone).
    data_key
        The key of each hospital's table inside its own bucket, e.g. `stroke/stroke.csv`;
        `{hospital}` in it is replaced by the hospital's name.

    Returns
    -------
    One `{name, dataUri, roleArn}` mapping per hospital, sorted by name.

    Raises
    ------
    HospitalsOutputError
        When the output lacks the hospitals, an entry lacks its bucket or role, the key is
        not a key inside a bucket, or an entry would not be a valid FederatedRun hospital.
    """
    block: list[dict[str, str]] = []
    for name, entry in sorted(_hospitals_output(tf_output).items()):
        if not isinstance(entry, Mapping) or not entry.get("bucket") or not entry.get("role_arn"):
            raise HospitalsOutputError(f"hospital {name!r}: the output lacks bucket or role_arn")
        hospital = {
            "name": name,
            "dataUri": f"s3://{entry['bucket']}/{_data_key(data_key, name)}",
            "roleArn": str(entry["role_arn"]),
        }
        try:
            Hospital.model_validate(hospital)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            raise HospitalsOutputError(f"hospital {name!r}: {problems}") from None
        block.append(hospital)
    return block


class _IndentedDumper(yaml.SafeDumper):
    """Indents list items under their key, as the examples/ files are written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def to_yaml(block: list[dict[str, str]], indent: int = 0) -> str:
    """`hospitals:` and its entries as YAML, every line shifted right by `indent` spaces."""
    text = yaml.dump(
        {"hospitals": block}, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False
    )
    pad = " " * indent
    return "".join(pad + line for line in text.splitlines(keepends=True))


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add this command's options to `parser` (for `fedrun` to offer it as a subcommand)."""
    parser.add_argument(
        "--data-key",
        default="stroke/stroke.csv",
        help="key of each hospital's table in its bucket; {hospital} is replaced by the "
        "hospital's name (default: stroke/stroke.csv)",
    )
    parser.add_argument(
        "--indent",
        type=int,
        default=0,
        help="shift the block right by this many spaces (2 to paste under spec:)",
    )
    parser.add_argument(
        "input",
        nargs="?",
        default="-",
        help="file with `terraform output -json` (default: standard input)",
    )
    return parser


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read the Terraform output named by `args`, print the block.

    Exit code 1 with a message when the output cannot give a valid block (not JSON, no
    `hospitals` output, a bad data key); 2 when the input file cannot be read.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    source = "stdin" if args.input == "-" else args.input
    try:
        if args.input == "-":
            text = stdin.read()
        else:
            with open(args.input, encoding="utf-8") as handle:
                text = handle.read()
        try:
            tf_output = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (it is empty)" if not text.strip() else ""
            raise HospitalsOutputError(
                f"{source} is not the JSON of `terraform output -json`{hint}: {exc.msg} at "
                f"line {exc.lineno}, column {exc.colno}; run `terraform -chdir=terraform "
                "output -json` after `terraform apply` and pipe it in"
            ) from None
        if not isinstance(tf_output, Mapping):
            raise HospitalsOutputError(
                f"{source}: expected a JSON object from `terraform output -json`"
            )
        block = hospitals_block(tf_output, args.data_key)
    except OSError as exc:
        print(f"fedrun hospitals: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except HospitalsOutputError as exc:
        print(f"fedrun hospitals: {exc}", file=sys.stderr)
        return 1
    stdout.write(to_yaml(block, args.indent))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m fedrun_cli.terraform_hospitals`."""
    parser = configure_parser(
        argparse.ArgumentParser(
            prog="python -m fedrun_cli.terraform_hospitals",
            description="Print a FederatedRun's hospitals: block from `terraform output -json`.",
        )
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
