"""The ``fedrun`` command: one entry point, a subcommand per job.

- ``fedrun render FILE [--operator-namespace NS]``: the Kubernetes manifests for a
  FederatedRun (a review aid for GitOps)
- ``fedrun local FILE --out DIR``: run the FederatedRun on this machine as local processes
- ``fedrun server`` / ``fedrun client``: what the server and hospital pods run
- ``fedrun budget FILE``: the noise multiplier and ε per round each hospital will get
- ``fedrun demo-data DIR``: synthetic (or real, split) hospital files for the demo
- ``fedrun check FILE [--hospital H] [--data F]``: a hospital's preflight of its own file
- ``fedrun schema infer FILE [--target COL]``: a suggested ``data:`` block from one file
- ``fedrun validate FILE...``: the API server's checks (CEL included) and fedrun's, offline

Heavy imports (torch, Flower) happen inside the subcommands that need them, so the
operator image and ``fedrun render`` work without the trainer extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedrun_core import names as c
from fedrun_core.logs import setup_logging

#: Exit codes every subcommand keeps (docs/cli.md): 0 it did what was asked; 1 what it
#: checked or ran failed (an invalid run for `validate`, a hospital's data for `check`, a run
#: that did not succeed for `local`); 2 it was called wrongly or its input cannot be used
#: (argparse's usage errors, a FederatedRun that cannot be read or is invalid); 3 a hospital
#: lost its server (`fedrun client`); 130 interrupted.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVER_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _render(args: argparse.Namespace) -> int:
    from fedrun_core.api import load_run
    from fedrun_render.workloads import render_run, to_yaml

    run = load_run(Path(args.file))
    sys.stdout.write(to_yaml(render_run(run, operator_namespace=args.operator_namespace)))
    return 0


def _local(args: argparse.Namespace) -> int:
    from fedrun_local.runner import LocalOptions, run_local

    return run_local(
        LocalOptions(
            file=Path(args.file),
            out=Path(args.out),
            data_dir=Path(args.data_dir) if args.data_dir else None,
            progress=not args.no_progress,
            timeout_s=args.timeout,
            budget_files=tuple(Path(b) for b in args.budget or ()),
        )
    )


def _transport_flags(p: argparse.ArgumentParser, tls_dir_help: str) -> None:
    """`--tls-dir DIR` or `--insecure`: exactly one, so insecure is never a silent default."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tls-dir", help=f"TLS and node-key files: {tls_dir_help}")
    group.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no node authentication (spec.security.insecure: local debugging only)",
    )


def _server(args: argparse.Namespace) -> int:
    from fedrun_trainer.server.main import ServerOptions, main_server

    return main_server(
        ServerOptions(
            config=args.config,
            state_dir=Path(args.state_dir),
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
            fleet_port=args.fleet_port,
            status_port=args.status_port,
            host=args.host,
            tls_dir=Path(args.tls_dir) if args.tls_dir else None,
            **({"max_request_bytes": args.max_request_bytes} if args.max_request_bytes else {}),
        )
    )


def _client(args: argparse.Namespace) -> int:
    from fedrun_trainer.hospital.main import ClientOptions, run_client

    return run_client(
        ClientOptions(
            config=args.config,
            hospital=args.hospital,
            server=args.server,
            state_dir=Path(args.state_dir),
            server_lost_timeout_s=args.server_lost_timeout,
            termination_log=Path(args.termination_log) if args.termination_log else None,
            isolation=args.isolation,
            tls_dir=Path(args.tls_dir) if args.tls_dir else None,
        )
    )


def _demo_data(args: argparse.Namespace) -> int:
    from fedrun_cli.demo_data import split_real_stroke, write_demo_hospitals

    out = Path(args.dir)
    if args.real:
        real = Path(args.real)
        if not real.is_file():
            sys.stderr.write(f"fedrun: {real}: no such file (the Kaggle stroke CSV)\n")
            return 2
        paths = split_real_stroke(real, out, seed=args.seed)
        kind = f"the real data in {real}, split by label skew"
    else:
        paths = write_demo_hospitals(out, seed=args.seed)
        kind = "SYNTHETIC stroke-like records (not real patients)"
    for name, path in sorted(paths.items()):
        sys.stdout.write(f"{name}: {path}\n")
    sys.stdout.write(f"wrote {len(paths)} hospital files: {kind}\n")
    return 0


def _operator(args: argparse.Namespace) -> int:
    # Settings travel as environment variables: fedrun_operator.main reads them at import,
    # the same way whether kopf is started here or by `kopf run` in tests.
    env = {
        "FEDRUN_OPERATOR_METRICS_PORT": str(args.metrics_port),
        "FEDRUN_OPERATOR_POLL_SECONDS": str(args.poll_seconds),
    }
    if args.server_url:
        env["FEDRUN_OPERATOR_SERVER_URL"] = args.server_url
    os.environ.update(env)
    from fedrun_operator import main as operator_main

    namespaces = list(args.namespace or [])
    if not namespaces and os.environ.get("FEDRUN_WATCH_NAMESPACES"):
        namespaces = [n for n in os.environ["FEDRUN_WATCH_NAMESPACES"].split(",") if n]
    operator_main.run(namespaces, args.health_port)
    return 0


def _budget(args: argparse.Namespace) -> int:
    from fedrun_cli.budget import print_budget

    return print_budget(
        Path(args.file), rows=args.rows, budget_files=[Path(b) for b in args.budget or []]
    )


def _check(args: argparse.Namespace) -> int:
    from fedrun_cli.tables import check_files

    return check_files(Path(args.file), args.hospital, args.data)


def _validate(args: argparse.Namespace) -> int:
    from fedrun_cli.validate import validate_files

    return validate_files(args.files)


def _schema_infer(args: argparse.Namespace) -> int:
    from fedrun_cli.tables import print_schema

    return print_schema(args.file, args.target, args.format)


def _version() -> str:
    """``fedrun X.Y.Z (Flower A.B.C)``: the installed distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    flwr = installed("flwr")
    return f"fedrun {installed('fedrun') or 'unknown'}" + (f" (Flower {flwr})" if flwr else "")


def _positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (argparse turns the error into exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="fedrun", description="Privacy-preserving federated learning across hospitals."
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=None,
        help="log format (default: json, text for `fedrun local`)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from fedrun_core.names import DEFAULT_OPERATOR_NAMESPACE, namespace_name

    p = sub.add_parser("render", help="print the Kubernetes manifests for a FederatedRun")
    p.add_argument("file", help="FederatedRun YAML")
    p.add_argument(
        "--operator-namespace",
        metavar="NS",
        type=namespace_name,
        default=DEFAULT_OPERATOR_NAMESPACE,
        help="namespace the operator runs in (the chart's release namespace): the run "
        "server's NetworkPolicy admits status reads from the operator's pods there only "
        f"(default: {DEFAULT_OPERATOR_NAMESPACE})",
    )
    p.set_defaults(func=_render)

    p = sub.add_parser("local", help="run a FederatedRun on this machine, no cluster")
    p.add_argument("file", help="FederatedRun YAML")
    p.add_argument("--out", default="out/local", help="output directory (default: out/local)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="read each hospital's data from DIR/<hospital>.csv (or .parquet) "
        "instead of its dataUri",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: from the spec)",
    )
    p.add_argument(
        "--budget",
        action="append",
        metavar="B.yaml",
        help="a PrivacyBudget file a hospital's budgetRef names (repeat for more): the run "
        "starts only if each admits it, and charges what it spends there (docs/privacy.md)",
    )
    p.set_defaults(func=_local)

    p = sub.add_parser("server", help="the server pod: Flower SuperLink + run driver")
    p.add_argument("--config", required=True, help="the run's config.json (from its ConfigMap)")
    p.add_argument("--state-dir", default=c.STATE_DIR)
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where the per-round checkpoint is kept (default: STATE_DIR/checkpoint); a "
        "restarted server resumes from it (docs/reliability.md)",
    )
    p.add_argument("--fleet-port", type=int, default=c.FLEET_PORT)
    p.add_argument("--status-port", type=int, default=c.STATUS_PORT)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="largest request body the fleet port accepts (default 64 MiB; Flower sends each "
        "array in chunks of at most 5 MiB)",
    )
    _transport_flags(
        p, "the run's <run>-server-tls Secret, mounted (ca.crt, tls.crt, tls.key, <hospital>.pub)"
    )
    p.set_defaults(func=_server)

    p = sub.add_parser("client", help="a hospital pod: Flower SuperNode + wrapper")
    p.add_argument("--config", required=True)
    p.add_argument("--hospital", required=True)
    p.add_argument("--server", required=True, help="host:port of the server's fleet API")
    p.add_argument("--state-dir", default=c.STATE_DIR)
    p.add_argument(
        "--server-lost-timeout",
        type=float,
        default=300.0,
        help="exit 3 after the server is unreachable this long (seconds)",
    )
    p.add_argument(
        "--isolation",
        choices=["warm", "subprocess"],
        default=os.environ.get("FEDRUN_ISOLATION", "warm"),
        help="warm: fork ClientApp tasks from a pre-imported executor (default); "
        "subprocess: Flower's stock process per message "
        "(env FEDRUN_ISOLATION sets the default)",
    )
    p.add_argument(
        "--termination-log",
        default=None,
        help="write the final message here (e.g. /dev/termination-log)",
    )
    _transport_flags(p, "this hospital's <run>-<hospital>-auth Secret, mounted (ca.crt, node.key)")
    p.set_defaults(func=_client)

    p = sub.add_parser("operator", help="the Kubernetes operator (kopf) for FederatedRuns")
    p.add_argument(
        "--namespace",
        action="append",
        help="watch this namespace (repeat for more; default: all namespaces, or the "
        "comma-separated FEDRUN_WATCH_NAMESPACES)",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="port of /healthz (0: off)")
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=float(os.environ.get("FEDRUN_OPERATOR_POLL_SECONDS", "5")),
        help="seconds between two looks at a running run (default 5)",
    )
    p.add_argument(
        "--server-url",
        default=os.environ.get("FEDRUN_OPERATOR_SERVER_URL"),
        help="how to reach a run server's status port; placeholders {service}, {namespace}, "
        "{port} (default http://{service}.{namespace}.svc:{port})",
    )
    p.set_defaults(func=_operator)

    from fedrun_cli import terraform_hospitals

    p = sub.add_parser(
        "hospitals",
        help="the hospitals: block of a FederatedRun from `terraform output -json` (stdin)",
    )
    terraform_hospitals.configure_parser(p)
    p.set_defaults(func=terraform_hospitals.run)

    p = sub.add_parser("demo-data", help="write demo hospital files (synthetic, or a real split)")
    p.add_argument("dir", help="directory for <hospital>.csv files")
    p.add_argument(
        "--real",
        default=None,
        help="split this Kaggle stroke CSV into 3 hospitals instead of synthesising",
    )
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("budget", help="noise multiplier and ε per round for each hospital")
    p.add_argument("file", help="FederatedRun YAML")
    p.add_argument(
        "--rows",
        type=_positive_int,
        default=None,
        help="training rows per hospital (default: read each hospital's data)",
    )
    p.add_argument(
        "--budget",
        action="append",
        metavar="B.yaml",
        help="a PrivacyBudget file (repeat for more): show what the run would reserve from "
        "each hospital's budget (spec.hospitals[].budgetRef) and what it would leave",
    )
    p.set_defaults(func=_budget)

    p = sub.add_parser(
        "check",
        help="preflight a hospital's own data file against a run's schema (rows, columns, "
        "what is used, dropped and imputed)",
    )
    p.add_argument("file", help="FederatedRun YAML")
    p.add_argument("--hospital", default=None, help="check this hospital's dataUri (default: all)")
    p.add_argument("--data", default=None, help="check this file instead of the dataUri")
    p.set_defaults(func=_check)

    p = sub.add_parser(
        "validate",
        help="check FederatedRun files as the API server would (schema, CEL rules) and as "
        "fedrun does; exit 0 when all are valid, 1 when not",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files (several documents OK)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("schema", help="work with a run's table schema")
    schema = p.add_subparsers(dest="schema_command", required=True)
    p = schema.add_parser(
        "infer", help="suggest a data: block from one hospital's file, read on this machine"
    )
    p.add_argument("file", help="a CSV or Parquet table")
    p.add_argument(
        "--target", default=None, help="the 0/1 label column (default: the last such column)"
    )
    p.add_argument(
        "--format", choices=["csv", "parquet"], default=None, help="(default: by suffix)"
    )
    p.set_defaults(func=_schema_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedrun`` console script."""
    args = build_parser().parse_args(argv)
    interactive = ("local", "budget", "check", "schema", "validate")
    setup_logging(args.log_format or ("text" if args.command in interactive else "json"))
    from fedrun_core.api import SpecError
    from fedrun_core.budgets import BudgetFileError

    try:
        code: int = args.func(args)
    except BudgetFileError as err:
        sys.stderr.write(f"fedrun: {err}\n")
        return EXIT_USAGE
    except SpecError as err:  # its text names the file: "invalid FederatedRun in F:" or
        sys.stderr.write(f"fedrun: {err}\n")  # "cannot read F: ..."
        return EXIT_USAGE
    except LookupError as err:  # e.g. a hospital the run does not have
        sys.stderr.write(f"fedrun: {err.args[0] if err.args else err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
