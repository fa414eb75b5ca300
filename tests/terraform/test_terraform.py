"""Terraform for EKS (terraform/): formatting, the security scan, and hospital isolation.

No provider can be downloaded here, so nothing runs `terraform init` or `plan`. Instead:
`terraform fmt -check`; checkov on the configuration; and checks on the configuration
evaluated for 3 and for 10 hospitals (tests/unit/terraform_config.py) that every hospital's
role reaches only its own bucket and key, is assumable only by its own ServiceAccounts, and
that every bucket is encrypted, versioned, private and TLS-only. The `broken` tests apply a
deliberate mistake to a copy of terraform/ and prove the same checks report it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_cli.terraform_hospitals import hospitals_block
from fedrun_core.api import ledger_uri, parse_run
from fedrun_render.identity import hospital_name

from .terraform_config import Config, EvalError, Instance, role_policies

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
CHECKOV = REPO / ".tools" / "venv" / "bin" / "checkov"
REGION = "eu-central-1"
REQUIRED = {"region": REGION, "api_public_access_cidrs": ["203.0.113.10/32"]}

THREE = ["hospital-a", "hospital-b", "hospital-c"]
# Ten names, among them pairs where one is a '-'-suffix of another (b / a-b, east / north-east),
# which a trust policy matching `*-<hospital>` would confuse.
TEN = [
    "a",
    "b",
    "a-b",
    "east",
    "north-east",
    "charite",
    "karolinska",
    "st-marys",
    "st-marys-2",
    "z9",
]
SIZES = {"3 hospitals": (THREE, ["stroke"]), "10 hospitals": (TEN, ["stroke", "sepsis"])}

# What the trainer does in S3 (fedrun_trainer/common/data.py, privacy.py), as IAM actions.
S3_CALL_ACTIONS = {
    "get_object": "s3:GetObject",
    "head_object": "s3:GetObject",
    "put_object": "s3:PutObject",
    "list_objects_v2": "s3:ListBucket",
}


def load(
    hospitals: list[str], runs: list[str] | None = None, directory: Path = TERRAFORM
) -> Config:
    """The configuration in `directory` evaluated for these hospitals and runs."""
    variables: dict[str, Any] = {**REQUIRED, "hospitals": {h: {} for h in hospitals}}
    if runs is not None:
        variables["run_names"] = runs
    return Config(directory, variables)


@pytest.fixture(params=list(SIZES), scope="module")
def config(request: pytest.FixtureRequest) -> Config:
    hospitals, runs = SIZES[request.param]
    return load(hospitals, runs)


# --------------------------------------------------------------------------- IAM semantics


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _operator_holds(op: str, actual: str | None, values: list[str]) -> bool:
    negated = "Not" in op
    if actual is None:  # a key missing from the request: only negated operators match
        return negated
    base = op.replace("Not", "")
    if base == "StringEquals":
        result = actual in values
    elif base in ("StringLike", "ArnLike", "ArnEquals"):  # ArnEquals matches wildcards too
        result = any(fnmatchcase(actual, v) for v in values)
    elif base == "Bool":
        result = actual.lower() in [v.lower() for v in values]
    elif base == "NumericLessThan":
        result = any(float(actual) < float(v) for v in values)
    else:
        raise AssertionError(f"condition operator {op} is not modelled by this test")
    return result != negated


def conditions_hold(conditions: dict[str, dict[str, list[str]]], context: dict[str, str]) -> bool:
    """Whether every condition of a statement holds for a request with `context`."""
    return all(
        _operator_holds(op, context.get(key), _list(values))
        for op, tests in conditions.items()
        for key, values in tests.items()
    )


def statement_applies(
    stmt: dict[str, Any], principal: str, action: str, resource: str, context: dict[str, str]
) -> bool:
    """Whether a resource-policy statement matches this request (principal, action, resource)."""
    principals = stmt.get("Principal", {})
    if principals != {"*": ["*"]} and principal not in principals.get("AWS", []):
        return False
    if not any(fnmatchcase(action, a) for a in _list(stmt.get("Action", []))):
        return False
    if not any(fnmatchcase(resource, r) for r in _list(stmt.get("Resource", []))):
        return False
    return conditions_hold(stmt.get("Condition", {}), {**context, "aws:PrincipalArn": principal})


def denied(
    policy: dict[str, Any],
    principal: str,
    action: str,
    resource: str,
    context: dict[str, str] | None = None,
) -> bool:
    """Whether an explicit Deny in `policy` refuses the request (over TLS 1.3 unless `context`
    says otherwise)."""
    ctx = {"aws:SecureTransport": "true", "s3:TlsVersion": "1.3", **(context or {})}
    return any(
        s["Effect"] == "Deny" and statement_applies(s, principal, action, resource, ctx)
        for s in policy["Statement"]
    )


# --------------------------------------------------------------------------- facts


def hospital_facts(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per hospital: its role (name, ARN, trust policy), bucket ARN and KMS key ARN."""
    roles = cfg.resource("aws_iam_role", "hospital").items()
    buckets = cfg.resource("aws_s3_bucket", "hospital").items()
    keys = cfg.resource("aws_kms_key", "hospital").items()
    assert set(roles) == set(buckets) == set(keys)
    return {
        h: {
            "role": roles[h].attr("name"),
            "role_arn": roles[h].attr("arn"),
            "trust": json.loads(roles[h].attr("assume_role_policy")),
            "bucket": buckets[h].attr("bucket"),
            "bucket_arn": buckets[h].attr("arn"),
            "key_arn": keys[h].attr("arn"),
        }
        for h in roles
    }


def service_accounts(cfg: Config, hospital: str) -> list[str]:
    """The `system:serviceaccount:` subjects the operator gives `hospital`, one per run."""
    namespace = cfg.variable("namespace")
    return [
        f"system:serviceaccount:{namespace}:{run}-{hospital}" for run in cfg.variable("run_names")
    ]


def allow_statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in document["Statement"] if s.get("Effect", "Allow") == "Allow"]


def reaches(resource: str, bucket_arn: str, key_arn: str) -> bool:
    """Whether an IAM resource ARN (wildcards allowed) covers the bucket, its objects or the key."""
    if resource in (bucket_arn, key_arn) or resource.startswith(f"{bucket_arn}/"):
        return True
    return any(fnmatchcase(arn, resource) for arn in (bucket_arn, f"{bucket_arn}/any/key", key_arn))


# --------------------------------------------------------------------------- checks


def isolation_violations(cfg: Config) -> list[str]:
    """Grants that let a role reach a hospital's bucket or key other than its own."""
    facts = hospital_facts(cfg)
    by_role = role_policies(cfg).by_role
    owner_of_role = {f["role"]: h for h, f in facts.items()}
    problems = []
    for role, policies in sorted(by_role.items()):
        own = owner_of_role.get(role)
        for policy in policies:
            if policy.document is None:
                problems.append(
                    f"role {role}: {policy.source} attaches {policy.arn}, a policy whose "
                    "statements this configuration does not show"
                )
                continue
            for stmt in allow_statements(policy.document):
                for forbidden in ("NotAction", "NotResource"):
                    if forbidden in stmt:
                        problems.append(f"role {role}: {policy.source} allows by {forbidden}")
                for resource in _list(stmt.get("Resource", [])):
                    for h, f in facts.items():
                        if h == own:
                            continue
                        if reaches(resource, f["bucket_arn"], f["key_arn"]):
                            problems.append(
                                f"role {role}: {policy.source} grants {resource}, "
                                f"which reaches hospital {h}'s bucket or key"
                            )
                    if own is not None:
                        f = facts[own]
                        mine = resource in (f["bucket_arn"], f["key_arn"]) or resource.startswith(
                            f"{f['bucket_arn']}/"
                        )
                        if not mine:
                            problems.append(
                                f"role {role}: {policy.source} grants {resource}, which is not "
                                f"hospital {own}'s own bucket or key"
                            )
    for h in facts:
        if facts[h]["role"] not in by_role:
            problems.append(f"hospital {h}: its role has no policy at all")
    # A bucket policy can grant too: a hospital's bucket may allow no principal but its role.
    policies = _by_bucket(cfg, "aws_s3_bucket_policy")
    for h, f in facts.items():
        if f["bucket"] not in policies:
            continue
        for stmt in allow_statements(json.loads(policies[f["bucket"]].attr("policy"))):
            for kind, principals in stmt.get("Principal", {}).items():
                strangers = [p for p in principals if (kind, p) != ("AWS", f["role_arn"])]
                if strangers:
                    problems.append(f"hospital {h}'s bucket policy allows {kind} {strangers}")
    return problems


def trust_violations(cfg: Config) -> list[str]:
    """Trust policies that admit anything but the hospital's own ServiceAccounts via IRSA."""
    facts = hospital_facts(cfg)
    issuer = cfg.module_output("eks", "oidc_provider")
    provider_arn = cfg.module_output("eks", "oidc_provider_arn")
    sub, aud = f"{issuer}:sub", f"{issuer}:aud"
    namespace = cfg.variable("namespace")
    problems = []
    for h, f in facts.items():
        expected = sorted(service_accounts(cfg, h))
        for stmt in f["trust"]["Statement"]:
            if stmt["Effect"] != "Allow":
                continue
            if _list(stmt.get("Action")) != ["sts:AssumeRoleWithWebIdentity"]:
                problems.append(f"{h}: trust allows {stmt.get('Action')}")
            if stmt.get("Principal") != {"Federated": [provider_arn]}:
                problems.append(f"{h}: trust names {stmt.get('Principal')}, not the cluster's OIDC")
            conditions = stmt.get("Condition", {})
            if set(conditions) != {"StringEquals"}:
                problems.append(f"{h}: trust uses {sorted(conditions)}, not only StringEquals")
            equals = conditions.get("StringEquals", {})
            if sorted(_list(equals.get(sub, []))) != expected:
                problems.append(f"{h}: trust admits {equals.get(sub)}, expected {expected}")
            if _list(equals.get(aud, [])) != ["sts.amazonaws.com"]:
                problems.append(f"{h}: trust does not pin the audience to sts.amazonaws.com")

        def admits(subject: str, trust: dict[str, Any] = f["trust"]) -> bool:
            return any(
                s["Effect"] == "Allow"
                and conditions_hold(
                    s.get("Condition", {}), {sub: subject, aud: "sts.amazonaws.com"}
                )
                for s in trust["Statement"]
            )

        others = [sa for g in facts if g != h for sa in service_accounts(cfg, g)]
        strangers = [
            f"system:serviceaccount:{namespace}:default",
            f"system:serviceaccount:{namespace}:fedrun-operator",
            *(
                f"system:serviceaccount:{namespace}:{run}-server"
                for run in cfg.variable("run_names")
            ),
            *(f"system:serviceaccount:other-{namespace}:{sa.rsplit(':', 1)[1]}" for sa in expected),
        ]
        for subject in others + strangers:
            if admits(subject):
                problems.append(f"{h}'s role admits {subject}")
        if not all(admits(sa) for sa in expected):
            problems.append(f"{h}'s role refuses its own ServiceAccounts")
    return problems


def wildcard_violations(cfg: Config) -> list[str]:
    """Allow statements with wildcard actions, `*` resources or wildcard bucket names."""
    documents = [
        (f"role {p.role} ({p.source})", p.document)
        for policies in role_policies(cfg).by_role.values()
        for p in policies
        if p.document is not None
    ]
    documents += [
        (inst.address, json.loads(inst.attr("policy")))
        for inst in cfg.instances_of("aws_s3_bucket_policy")
    ]
    problems = []
    for where, document in documents:
        for stmt in allow_statements(document):
            for action in _list(stmt.get("Action", [])):
                if "*" in action or "?" in action:
                    problems.append(f"{where}: wildcard action {action}")
            for resource in _list(stmt.get("Resource", [])):
                bucket = resource.split(":::", 1)[1].split("/", 1)[0] if ":::" in resource else ""
                if resource == "*" or "*" in bucket or "?" in bucket or resource.endswith(":*"):
                    problems.append(f"{where}: wildcard resource {resource}")
            if stmt.get("Principal") in ({"*": ["*"]}, {"AWS": ["*"]}):
                problems.append(f"{where}: allows everyone")
    return problems


def _by_bucket(cfg: Config, kind: str) -> dict[str, Instance]:
    return {inst.attr("bucket"): inst for inst in cfg.instances_of(kind)}


def bucket_violations(cfg: Config) -> list[str]:
    """Buckets that are not encrypted, versioned, private, ACL-free, TLS-only and logged."""
    facts = {f["bucket"]: (h, f) for h, f in hospital_facts(cfg).items()}
    sse = _by_bucket(cfg, "aws_s3_bucket_server_side_encryption_configuration")
    versioning = _by_bucket(cfg, "aws_s3_bucket_versioning")
    blocks = _by_bucket(cfg, "aws_s3_bucket_public_access_block")
    ownership = _by_bucket(cfg, "aws_s3_bucket_ownership_controls")
    policies = _by_bucket(cfg, "aws_s3_bucket_policy")
    logging = _by_bucket(cfg, "aws_s3_bucket_logging")
    log_targets = {inst.attr("target_bucket") for inst in logging.values()}
    problems = []
    for inst in cfg.instances_of("aws_s3_bucket"):
        name, arn = inst.attr("bucket"), inst.attr("arn")
        where = f"{inst.address} ({name})"
        if name not in sse:
            problems.append(f"{where}: no default encryption")
        else:
            rules = [
                d
                for r in sse[name].nested("rule")
                for d in r["apply_server_side_encryption_by_default"]
            ]
            algorithms = {d["sse_algorithm"] for d in rules}
            if not algorithms or not algorithms <= {"aws:kms", "aws:kms:dsse", "AES256"}:
                problems.append(f"{where}: encryption {algorithms}")
            if name in facts:
                h, f = facts[name]
                if [(d["sse_algorithm"], d.get("kms_master_key_id")) for d in rules] != [
                    ("aws:kms", f["key_arn"])
                ]:
                    problems.append(f"{where}: not SSE-KMS with hospital {h}'s own key")
        if (
            name not in versioning
            or versioning[name].nested("versioning_configuration")[0]["status"] != "Enabled"
        ):
            problems.append(f"{where}: versioning is not enabled")
        flags = (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        )
        if name not in blocks or not all(blocks[name].attr(flag) is True for flag in flags):
            problems.append(f"{where}: public access is not fully blocked")
        if name not in ownership or ownership[name].nested("rule")[0]["object_ownership"] != (
            "BucketOwnerEnforced"
        ):
            problems.append(f"{where}: ACLs are not disabled (BucketOwnerEnforced)")
        if name not in policies:
            problems.append(f"{where}: no bucket policy")
        else:
            policy = json.loads(policies[name].attr("policy"))
            for resource in (arn, f"{arn}/some/object"):
                if not denied(
                    policy,
                    "arn:aws:iam::123456789012:role/x",
                    "s3:GetObject",
                    resource,
                    {"aws:SecureTransport": "false"},
                ):
                    problems.append(f"{where}: plain HTTP to {resource} is not refused")
        # Every bucket logs to a log bucket, except the log buckets themselves.
        if name not in log_targets and name not in logging:
            problems.append(f"{where}: no server access logging")
    return problems


# --------------------------------------------------------------------------- the tests


def test_terraform_fmt() -> None:
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not on PATH (CI and this machine have it: see docs/facts.md)")
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}"


def _checkov(directory: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            str(CHECKOV),
            "--skip-download",
            "--framework",
            "terraform",
            "--compact",
            "-o",
            "json",
            "-d",
            str(directory),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.stdout.strip(), f"checkov printed nothing:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert isinstance(report, dict), "checkov ran more than the terraform framework"
    return report


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.skip(f"checkov not installed at {CHECKOV}: run `make tools`")
    return _checkov(TERRAFORM)


def test_checkov_finds_no_failed_check(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in checkov_report["results"]["failed_checks"]
    ]
    assert summary["parsing_errors"] == 0
    assert summary["failed"] == 0, "\n".join(failed)
    # The scan saw the configuration: the hospital buckets' own checks ran and passed.
    passed = {(c["check_id"], c["resource"]) for c in checkov_report["results"]["passed_checks"]}
    for check in ("CKV_AWS_21", "CKV_AWS_145", "CKV2_AWS_6", "CKV_AWS_18"):
        assert (check, "aws_s3_bucket.hospital") in passed, check


def test_checkov_skips_are_explained(checkov_report: dict[str, Any]) -> None:
    skipped = checkov_report["results"]["skipped_checks"]
    assert skipped, "expected the documented skips (modules by registry version, key policy)"
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, (
            f"{check['check_id']} on {check['resource']} skipped without a reason"
        )


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, target, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    return target


def _edit(directory: Path, file: str, old: str, new: str) -> None:
    path = directory / file
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the mutation must match {file} exactly once: {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_broken_checkov_reports_an_unversioned_bucket(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.skip(f"checkov not installed at {CHECKOV}: run `make tools`")
    broken = _copy(tmp_path)
    _remove_block("buckets.tf", 'resource "aws_s3_bucket_versioning" "hospital"')(broken)
    failed = {(c["check_id"], c["resource"]) for c in _checkov(broken)["results"]["failed_checks"]}
    assert ("CKV_AWS_21", "aws_s3_bucket.hospital") in failed


@pytest.mark.parametrize("size", list(SIZES))
def test_inputs_pass_validations_and_preconditions(size: str) -> None:
    hospitals, runs = SIZES[size]
    cfg = load(hospitals, runs)
    assert cfg.validation_errors() == []
    assert cfg.precondition_errors() == []
    assert sorted(hospital_facts(cfg)) == sorted(hospitals)


def test_no_role_reaches_another_hospitals_bucket_or_key(config: Config) -> None:
    problems = isolation_violations(config)
    assert not problems, "\n".join(problems)


def test_each_hospital_role_trusts_only_its_own_service_accounts(config: Config) -> None:
    problems = trust_violations(config)
    assert not problems, "\n".join(problems)


def test_no_wildcard_actions_or_resources_on_data(config: Config) -> None:
    problems = wildcard_violations(config)
    assert not problems, "\n".join(problems)


def test_every_bucket_is_encrypted_versioned_private_tls_only_and_logged(config: Config) -> None:
    problems = bucket_violations(config)
    assert not problems, "\n".join(problems)


def test_hospital_roles_grant_exactly_the_trainers_calls(config: Config) -> None:
    # The S3 calls the trainer makes, read from its source, so a new call fails here until
    # the role grants it.
    sources = "".join(
        p.read_text(encoding="utf-8") for p in (REPO / "trainer" / "fedrun_trainer").rglob("*.py")
    )
    calls = set(re.findall(r"s3_client\(\w*\)\.(\w+)\(", sources))
    assert calls, "found no boto3 S3 calls in the trainer: has the data path moved?"
    assert calls <= set(S3_CALL_ACTIONS), f"unmapped S3 calls {calls - set(S3_CALL_ACTIONS)}"
    needed = {S3_CALL_ACTIONS[c] for c in calls} | {"s3:ListBucket"}  # NoSuchKey, not 403

    namespace = config.variable("namespace")
    by_role = role_policies(config).by_role
    for h, f in hospital_facts(config).items():
        grants: set[tuple[str, str]] = set()
        for policy in by_role[f["role"]]:
            assert policy.document is not None
            for stmt in allow_statements(policy.document):
                if any(a.startswith("kms:") for a in _list(stmt["Action"])):
                    assert stmt["Condition"] == {
                        "StringEquals": {"kms:ViaService": [f"s3.{REGION}.amazonaws.com"]}
                    }
                grants |= {(a, r) for a in _list(stmt["Action"]) for r in _list(stmt["Resource"])}
        ledgers = {
            ("s3:PutObject", f"{f['bucket_arn']}/fedrun-ledger/{namespace}/{run}/*/{h}.json")
            for run in config.variable("run_names")
        }
        assert grants == {
            ("s3:GetObject", f"{f['bucket_arn']}/*"),
            ("s3:ListBucket", f["bucket_arn"]),
            ("kms:Decrypt", f["key_arn"]),
            ("kms:GenerateDataKey", f["key_arn"]),
            *ledgers,
        }
        assert {a for a, _ in grants if a.startswith("s3:")} == needed


def test_bucket_policies_refuse_other_hospitals_and_admit_the_owner(config: Config) -> None:
    facts = hospital_facts(config)
    endpoint = config.resource("aws_vpc_endpoint", "s3").attr("id")
    policies = _by_bucket(config, "aws_s3_bucket_policy")
    for h, f in facts.items():
        policy = json.loads(policies[f["bucket"]].attr("policy"))
        table = f"{f['bucket_arn']}/stroke/stroke.csv"
        ledger = f"{f['bucket_arn']}/fedrun-ledger/fedrun/stroke/{h}.json"
        for action, resource in (
            ("s3:GetObject", table),
            ("s3:PutObject", ledger),
            ("s3:ListBucket", f["bucket_arn"]),
        ):
            assert not denied(
                policy, f["role_arn"], action, resource, {"aws:SourceVpce": endpoint}
            ), (
                h,
                action,
            )
        # Its own role outside the cluster's VPC, or over old TLS, is refused.
        assert denied(policy, f["role_arn"], "s3:GetObject", table)
        assert denied(
            policy,
            f["role_arn"],
            "s3:GetObject",
            table,
            {"aws:SourceVpce": endpoint, "s3:TlsVersion": "1.1"},
        )
        for g, other in facts.items():
            if g != h:
                assert denied(
                    policy, other["role_arn"], "s3:GetObject", table, {"aws:SourceVpce": endpoint}
                ), (h, g)
    artifacts = json.loads(
        policies[config.resource("aws_s3_bucket", "artifacts").attr("bucket")].attr("policy")
    )
    artifact = f"{config.resource('aws_s3_bucket', 'artifacts').attr('arn')}/model.pt"
    for f in facts.values():
        assert denied(artifacts, f["role_arn"], "s3:PutObject", artifact)


def test_key_policies_name_no_hospital_role_and_no_stranger(config: Config) -> None:
    account_root = "arn:aws:iam::123456789012:root"
    for inst in config.instances_of("aws_kms_key"):
        policy = json.loads(inst.attr("policy"))
        principals = [p for s in policy["Statement"] for p in s.get("Principal", {}).get("AWS", [])]
        assert principals == [account_root], inst.address
        assert all("Principal" in s and s["Principal"] != {"*": ["*"]} for s in policy["Statement"])
        assert inst.attr("enable_key_rotation") is True


def test_the_generated_hospitals_block_fits_the_roles(config: Config) -> None:
    """Terraform's output, through `terraform_hospitals`, makes a run the roles admit.

    The example FederatedRun with its hospitals replaced by the generated block validates;
    each hospital's ServiceAccount is trusted by its role, its table is readable and the
    operator's default ledger URI is writable by exactly that role.
    """
    output = {"hospitals": {"sensitive": False, "value": config.output("hospitals")}}
    example = yaml.safe_load((REPO / "examples" / "federatedrun.yaml").read_text(encoding="utf-8"))
    by_role = role_policies(config).by_role
    facts = hospital_facts(config)
    for run_name in config.variable("run_names"):
        example["metadata"]["name"] = run_name
        example["metadata"]["namespace"] = config.output("namespace")
        example["metadata"]["uid"] = "0b5f3c4e-7a1d-4f2e-9c3b-5d6e7f8a9b0c"  # as once applied
        example["spec"]["minHospitals"] = 1
        example["spec"]["hospitals"] = hospitals_block(output, "stroke/{hospital}.csv")
        run = parse_run(example)
        for hospital in run.spec.hospitals:
            f = facts[hospital.name]
            assert hospital.role_arn == f["role_arn"]
            subject = f"system:serviceaccount:{run.namespace}:{hospital_name(run, hospital)}"
            assert subject in service_accounts(config, hospital.name)
            statements = [s for p in by_role[f["role"]] for s in allow_statements(p.document or {})]

            def granted(
                action: str, uri: str, statements: list[dict[str, Any]] = statements
            ) -> bool:
                arn = "arn:aws:s3:::" + uri.removeprefix("s3://")
                return any(
                    any(fnmatchcase(action, a) for a in _list(s["Action"]))
                    and any(fnmatchcase(arn, r) for r in _list(s["Resource"]))
                    for s in statements
                )

            assert granted("s3:GetObject", hospital.data_uri)
            assert granted("s3:PutObject", ledger_uri(run, hospital))
            assert "/0b5f3c4e-7a1d-4f2e-9c3b-5d6e7f8a9b0c/" in ledger_uri(run, hospital)
            assert not granted("s3:PutObject", hospital.data_uri)


def test_module_inputs_keep_the_cluster_private_and_pods_off_the_node_role() -> None:
    cfg = load(THREE)
    defaults = cfg.module_input("eks", "eks_managed_node_group_defaults")
    assert defaults["metadata_options"] == {
        "http_endpoint": "enabled",
        "http_tokens": "required",
        "http_put_response_hop_limit": 1,
    }
    assert cfg.module_input("eks", "enable_irsa") is True
    assert cfg.module_input("eks", "cluster_encryption_config") == {"resources": ["secrets"]}
    assert cfg.module_input("eks", "cluster_endpoint_public_access_cidrs") == ["203.0.113.10/32"]
    assert "audit" in cfg.module_input("eks", "cluster_enabled_log_types")
    cni = json.loads(cfg.module_input("eks", "cluster_addons")["vpc-cni"]["configuration_values"])
    assert cni == {"enableNetworkPolicy": "true"}  # fedrun's NetworkPolicies are enforced
    groups = cfg.module_input("eks", "eks_managed_node_groups")
    assert groups["system"]["taints"]["critical-addons"]["key"] == "CriticalAddonsOnly"
    assert groups["training"]["labels"] == {"fedrun.io/pool": "training"}
    assert "taints" not in groups["training"]
    for group in groups.values():
        assert group["block_device_mappings"]["root"]["ebs"]["encrypted"] is True
    assert cfg.module_input("eks", "subnet_ids") == cfg.module_output("vpc", "private_subnets")
    assert cfg.module_input("vpc", "map_public_ip_on_launch") is False
    assert cfg.module_input("vpc", "enable_flow_log") is True
    assert len(cfg.module_input("vpc", "private_subnets")) == 3
    private = Config(TERRAFORM, {**REQUIRED, "api_public_access_cidrs": []})
    assert private.module_input("eks", "cluster_endpoint_public_access") is False


def test_every_output_evaluates_and_names_what_was_created() -> None:
    cfg = load(THREE)
    values = {name: cfg.output(name) for name in cfg.outputs}
    assert sorted(values["hospitals"]) == THREE
    assert (
        values["configure_kubectl"] == f"aws eks update-kubeconfig --region {REGION} --name fedrun"
    )
    for url in values["ecr_repository_urls"].values():
        assert url.startswith(values["ecr_registry"] + "/")
    assert values["mlflow_role_arn"] == cfg.resource("aws_iam_role", "mlflow").attr("arn")


def helm_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Two values files merged as Helm merges them: maps key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = value
    return out


def chart_values(cfg: Config) -> dict[str, Any]:
    """The values the helm_release passes to the chart, merged in order."""
    [release] = cfg.instances_of("helm_release")
    merged: dict[str, Any] = {}
    for document in release.attr("values"):
        merged = helm_merge(merged, yaml.safe_load(document) or {})
    return merged


def test_the_chart_is_installed_only_on_request() -> None:
    assert not load(THREE).instances_of("helm_release")
    cfg = Config(TERRAFORM, {**REQUIRED, "install_chart": True})
    assert len(cfg.instances_of("helm_release")) == 1


@pytest.mark.parametrize(
    ("inputs", "watched"),
    [
        ({}, ["fedrun"]),
        ({"namespace": "trials"}, ["trials"]),
        ({"chart_values": {"image": {"tag": "0.1.0"}}}, ["fedrun"]),
        ({"chart_values": {"watchNamespaces": ["fedrun", "research"]}}, ["fedrun", "research"]),
        # The chart refuses clusterWide with watchNamespaces: none is passed then.
        ({"chart_values": {"clusterWide": True}}, []),
    ],
    ids=["default", "namespace", "image tag", "more namespaces", "clusterWide"],
)
def test_the_chart_follows_the_runs_namespace(inputs: dict[str, Any], watched: list[str]) -> None:
    # The chart's operator follows runs (and is granted its rules) only in the namespaces
    # watchNamespaces names, by default only its own: the runs' namespace, which the
    # hospital roles trust, must be among them.
    cfg = Config(TERRAFORM, {**REQUIRED, "install_chart": True, **inputs})
    values = chart_values(cfg)
    assert values["watchNamespaces"] == watched
    assert values["image"]["repository"] == cfg.output("ecr_repository_urls")["operator"]
    if not values.get("clusterWide"):
        assert cfg.output("namespace") in values["watchNamespaces"]
    [release] = cfg.instances_of("helm_release")
    assert release.attr("namespace") not in values["watchNamespaces"]


def test_the_terraform_chart_values_render_a_role_binding_in_the_runs_namespace(
    tmp_path: Path,
) -> None:
    helm = REPO / ".tools" / "bin" / "helm"
    if not helm.exists():
        pytest.skip(f"helm not installed at {helm}: run `make tools`")
    cfg = Config(TERRAFORM, {**REQUIRED, "install_chart": True, "namespace": "trials"})
    [release] = cfg.instances_of("helm_release")
    args = [str(helm), "template", release.attr("name"), str(REPO / "charts" / "fedrun")]
    args += ["--namespace", release.attr("namespace")]
    for i, document in enumerate(release.attr("values")):
        path = tmp_path / f"values-{i}.yaml"
        path.write_text(document, encoding="utf-8")
        args += ["--values", str(path)]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    runs_rules = [b for b in bindings if b["roleRef"]["name"] != "fedrun-operator-leader"]
    assert [b["metadata"]["namespace"] for b in runs_rules] == ["trials"]
    leader = [b for b in bindings if b not in runs_rules]  # its own Lease, release namespace
    assert [b["metadata"]["namespace"] for b in leader] == [release.attr("namespace")]
    cluster_bindings = [d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert cluster_bindings == ["fedrun-operator-scan"], "the operator's rules only in trials"


def test_ecr_repositories_are_immutable_scanned_and_encrypted() -> None:
    cfg = load(THREE)
    repos = cfg.resource("aws_ecr_repository", "image").items()
    assert sorted(repos) == ["fedrun-operator", "fedrun-trainer"]
    for repo in repos.values():
        assert repo.attr("image_tag_mutability") == "IMMUTABLE"
        assert repo.nested("image_scanning_configuration") == [{"scan_on_push": True}]
        assert repo.nested("encryption_configuration")[0]["encryption_type"] == "KMS"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("hospitals", {"Hospital_A": {}}, "DNS-1123 label"),
        ("hospitals", {"-a": {}}, "DNS-1123 label"),
        ("hospitals", {}, "between 1 and 50"),
        ("hospitals", {"a": {"bucket_name": "My.Bucket"}}, "bucket_name"),
        ("run_names", ["Stroke"], "DNS-1123 label"),
        ("run_names", ["stroke", "stroke"], "each once"),
        ("run_names", ["r" * 57], "at most 56"),
        ("api_public_access_cidrs", ["0.0.0.0/0"], "not 0.0.0.0/0"),
        ("api_public_access_cidrs", ["10.0.0.0/33"], "IPv4 CIDRs"),
        ("namespace", "Fed_Run", "DNS-1123"),
    ],
)
def test_bad_inputs_are_refused_by_validations(variable: str, value: Any, message: str) -> None:
    cfg = Config(TERRAFORM, {**REQUIRED, variable: value})
    errors = cfg.validation_errors()
    assert any(e.startswith(f"var.{variable}:") and message in e for e in errors), errors


def test_run_and_hospital_names_sharing_a_service_account_are_refused() -> None:
    # Run "stroke-a" with hospital "b" and run "stroke" with hospital "a-b" both give the
    # ServiceAccount stroke-a-b: hospital a-b's pod could assume hospital b's role.
    cfg = load(["b", "a-b"], ["stroke", "stroke-a"])
    assert any("same ServiceAccount name" in e for e in cfg.precondition_errors())
    assert "b's role admits system:serviceaccount:fedrun:stroke-a-b" in trust_violations(cfg)


def test_long_names_are_refused_by_preconditions() -> None:
    cfg = load(["h" * 50], ["stroke"])
    errors = cfg.precondition_errors()
    assert any("longer than 63 characters" in e for e in errors), errors


# --------------------------------------------------------------------------- broken copies

LEAK = """
resource "aws_iam_role_policy" "leak" {
  name = "leak"
  role = aws_iam_role.hospital["hospital-a"].id
  policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["s3:GetObject"]
      Resource = ["${aws_s3_bucket.hospital["hospital-b"].arn}/*"]
    }]
  })
}
"""

MANAGED = """
resource "aws_iam_role_policy_attachment" "read_all" {
  role       = aws_iam_role.hospital["hospital-c"].name
  policy_arn = "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"
}
"""

BUCKET_ALLOW = """  statement {
    sid       = "ShareWithPartners"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.hospital[each.key].arn}/*"]

    principals {
      type        = "AWS"
      identifiers = local.hospital_role_arns
    }
  }

"""

READ_OWN = 'resources = ["${aws_s3_bucket.hospital[each.key].arn}/*"]'
EVERY_BUCKET = 'resources = [for b in aws_s3_bucket.hospital : "${b.arn}/*"]'


def _add_file(text: str) -> Callable[[Path], None]:
    return lambda d: (d / "broken.tf").write_text(text, encoding="utf-8")


def _replace(file: str, old: str, new: str) -> Callable[[Path], None]:
    return lambda d: _edit(d, file, old, new)


def _remove_block(file: str, header: str) -> Callable[[Path], None]:
    def remove(directory: Path) -> None:
        text = (directory / file).read_text(encoding="utf-8")
        block = re.search(re.escape(header) + r" \{.*?\n\}\n", text, re.S)
        assert block is not None, header
        (directory / file).write_text(text.replace(block.group(0), ""), encoding="utf-8")

    return remove


SUB_CONDITION = """test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = each.value.service_accounts"""
OTHERS_LOCK = (
    'values   = local.hospital_role_arns\n    }\n    condition {\n      test     = "ArnNotEquals"'
)


@dataclass
class Mistake:
    """A deliberate mistake in a copy of terraform/, the check that must see it, and how."""

    apply: Callable[[Path], None]
    check: Callable[[Config], list[str]]
    reported: str
    hospitals: list[str] = field(default_factory=lambda: list(THREE))


BROKEN: dict[str, Mistake] = {
    "hospital-a's role is given hospital-b's bucket": Mistake(
        _add_file(LEAK),
        isolation_violations,
        "role fedrun-hospital-a: aws_iam_role_policy.leak grants arn:aws:s3:::fedrun-hospital-b",
    ),
    "a bucket pattern that matches every hospital": Mistake(
        _replace("iam.tf", READ_OWN, 'resources = ["arn:aws:s3:::${var.name}-*/*"]'),
        isolation_violations,
        "which reaches hospital hospital-b's bucket or key",
    ),
    "every hospital's bucket through a for expression": Mistake(
        _replace(
            "iam.tf", READ_OWN, 'resources = [for b in aws_s3_bucket.hospital : "${b.arn}/x"]'
        ),
        isolation_violations,
        "which reaches hospital hospital-c's bucket or key",
    ),
    "a hospital bucket policy that allows every hospital's role": Mistake(
        _replace(
            "buckets.tf",
            '  statement {\n    sid       = "DenyOldTls"',
            BUCKET_ALLOW + '  statement {\n    sid       = "DenyOldTls"',
        ),
        isolation_violations,
        "hospital hospital-a's bucket policy allows AWS "
        "['arn:aws:iam::123456789012:role/fedrun-hospital-b'",
    ),
    "an AWS managed read-all policy": Mistake(
        _add_file(MANAGED),
        isolation_violations,
        "attaches arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
    ),
    "the same grant as a wildcard action": Mistake(
        _replace("iam.tf", 'actions   = ["s3:GetObject"]', 'actions   = ["s3:Get*"]'),
        wildcard_violations,
        "wildcard action s3:Get*",
    ),
    "a trust policy for any ServiceAccount in the namespace": Mistake(
        _replace(
            "iam.tf",
            SUB_CONDITION,
            SUB_CONDITION.replace("StringEquals", "StringLike").replace(
                "each.value.service_accounts", '["system:serviceaccount:${var.namespace}:*"]'
            ),
        ),
        trust_violations,
        "hospital-a's role admits system:serviceaccount:fedrun:stroke-hospital-b",
    ),
    "a trust policy matching *-<hospital>, with hospitals b and a-b": Mistake(
        _replace(
            "iam.tf",
            SUB_CONDITION,
            SUB_CONDITION.replace("StringEquals", "StringLike").replace(
                "each.value.service_accounts",
                '["system:serviceaccount:${var.namespace}:*-${each.key}"]',
            ),
        ),
        trust_violations,
        "b's role admits system:serviceaccount:fedrun:stroke-a-b",
        ["b", "a-b"],
    ),
    "a bucket policy without the other-hospitals lock": Mistake(
        _replace("buckets.tf", OTHERS_LOCK, OTHERS_LOCK.replace("local.hospital_role_arns", "[]")),
        lambda cfg: [] if _others_denied(cfg) else ["other hospitals are not denied"],
        "other hospitals are not denied",
    ),
    "an artifacts bucket without encryption": Mistake(
        _remove_block(
            "buckets.tf",
            'resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts"',
        ),
        bucket_violations,
        "aws_s3_bucket.artifacts (fedrun-mlflow-artifacts-123456789012): no default encryption",
    ),
    "a hospital bucket without versioning": Mistake(
        _remove_block("buckets.tf", 'resource "aws_s3_bucket_versioning" "hospital"'),
        bucket_violations,
        "versioning is not enabled",
    ),
}


def _others_denied(cfg: Config) -> bool:
    facts = hospital_facts(cfg)
    endpoint = cfg.resource("aws_vpc_endpoint", "s3").attr("id")
    policies = _by_bucket(cfg, "aws_s3_bucket_policy")
    return all(
        denied(
            json.loads(policies[f["bucket"]].attr("policy")),
            o["role_arn"],
            "s3:GetObject",
            f"{f['bucket_arn']}/x",
            {"aws:SourceVpce": endpoint},
        )
        for h, f in facts.items()
        for g, o in facts.items()
        if g != h
    )


@pytest.mark.parametrize("mistake", list(BROKEN))
def test_broken_copies_are_reported(mistake: str, tmp_path: Path) -> None:
    case = BROKEN[mistake]
    assert case.check(load(case.hospitals)) == [], "the unbroken configuration must pass"
    broken = _copy(tmp_path)
    case.apply(broken)
    try:
        problems = case.check(load(case.hospitals, directory=broken))
    except EvalError as exc:
        pytest.fail(f"the checks could not evaluate the broken copy: {exc}")
    assert any(case.reported in p for p in problems), problems
