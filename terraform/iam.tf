# IRSA roles. A hospital's role can be assumed only through the cluster's OIDC provider, only
# by that hospital's ServiceAccounts (<run>-<hospital> in var.namespace, one per approved run),
# and grants exactly the S3 and KMS calls the trainer makes on its own bucket:
#   get_object   data (fedrun_trainer/common/data.py) and the privacy ledger (privacy.py)
#   put_object   the privacy ledger, only at fedrun-ledger/<namespace>/<run>/<uid>/<hospital>.json
#                (any uid: a run's uid exists only once the run is created)
#   ListBucket   so that a ledger not written yet reads as NoSuchKey (S3 answers 403, not 404,
#                to a caller without it, and the trainer would stop instead of starting at ε=0)

data "aws_iam_policy_document" "hospital_trust" {
  for_each = local.hospitals

  statement {
    sid     = "OnlyThisHospitalsServiceAccounts"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = each.value.service_accounts
    }
  }
}

resource "aws_iam_role" "hospital" {
  for_each = local.hospitals

  name                 = each.value.role
  description          = "fedrun: ${each.key}'s client reads its own data and writes its own privacy ledger"
  assume_role_policy   = data.aws_iam_policy_document.hospital_trust[each.key].json
  max_session_duration = 3600

  tags = {
    "fedrun.io/hospital" = each.key
  }

  lifecycle {
    precondition {
      condition     = alltrue([for sa in each.value.service_accounts : length(split(":", sa)[3]) <= 63])
      error_message = "A ServiceAccount name <run>-${each.key} would exceed 63 characters: shorten the run or hospital name."
    }
    # `<run>-<hospital>` is ambiguous across runs: run "stroke-a" with hospital "b" and run
    # "stroke" with hospital "a-b" share the ServiceAccount stroke-a-b, which would let one
    # hospital's pod assume the other's role.
    precondition {
      condition     = length(distinct(flatten([for h in values(local.hospitals) : h.service_accounts]))) == length(var.run_names) * length(local.hospitals)
      error_message = "Two (run, hospital) pairs give the same ServiceAccount name <run>-<hospital>: rename a run in run_names or a hospital so that every <run>-<hospital> is unique."
    }
    precondition {
      condition     = length(each.value.role) <= 64
      error_message = "The role name ${each.value.role} exceeds IAM's 64 characters: shorten name or the hospital name."
    }
  }
}

data "aws_iam_policy_document" "hospital_access" {
  for_each = local.hospitals

  statement {
    sid       = "ReadOwnData"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.hospital[each.key].arn}/*"]
  }

  statement {
    sid       = "ListOwnBucket"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.hospital[each.key].arn]
  }

  statement {
    sid       = "WriteOwnPrivacyLedger"
    effect    = "Allow"
    actions   = ["s3:PutObject"]
    resources = [for key in each.value.ledger_keys : "${aws_s3_bucket.hospital[each.key].arn}/${key}"]
  }

  statement {
    sid       = "UseOwnKeyThroughS3"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.hospital[each.key].arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "hospital" {
  for_each = local.hospitals

  name   = "own-data-and-ledger"
  role   = aws_iam_role.hospital[each.key].id
  policy = data.aws_iam_policy_document.hospital_access[each.key].json
}

# --------------------------------------------------------------------------- MLflow

# The MLflow tracking server proxies artifact uploads (mlflow server --serve-artifacts), so
# only its ServiceAccount touches the artifacts bucket; run servers talk HTTP to MLflow.
data "aws_iam_policy_document" "mlflow_trust" {
  statement {
    sid     = "OnlyTheMlflowServer"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = ["system:serviceaccount:${var.mlflow_namespace}:${var.mlflow_service_account}"]
    }
  }
}

resource "aws_iam_role" "mlflow" {
  name                 = "${var.name}-mlflow"
  description          = "fedrun: the MLflow tracking server stores run artifacts"
  assume_role_policy   = data.aws_iam_policy_document.mlflow_trust.json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "mlflow_access" {
  statement {
    sid       = "ReadWriteArtifacts"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }

  statement {
    sid       = "ListArtifacts"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid       = "UsePlatformKeyThroughS3"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "mlflow" {
  name   = "artifacts"
  role   = aws_iam_role.mlflow.id
  policy = data.aws_iam_policy_document.mlflow_access.json
}
