# One KMS key per hospital (its bucket's SSE-KMS key; only that hospital's role is granted
# its use in iam.tf) and one platform key for the MLflow artifacts and the ECR images.
#
# Key policies keep AWS's default shape: the account may delegate use of a key through IAM
# policies, and nothing is granted to any principal outside the account.

data "aws_iam_policy_document" "key_admin" {
  #checkov:skip=CKV_AWS_109:This is a KMS key policy, not an IAM policy: it names only this account, which then grants use of the key through IAM (iam.tf).
  #checkov:skip=CKV_AWS_111:Same key policy: in a key policy the resource "*" is the key itself, and the only principal is this account.
  #checkov:skip=CKV_AWS_356:Same key policy: a key policy's resource must be "*" (the key it is attached to).
  statement {
    sid       = "AccountDelegatesThroughIam"
    effect    = "Allow"
    actions   = ["kms:*"]
    resources = ["*"] # In a key policy, "*" means this key.

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "hospital" {
  for_each = local.hospitals

  description             = "fedrun: S3 encryption of ${each.key}'s data and privacy ledger"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.key_admin.json

  tags = {
    "fedrun.io/hospital" = each.key
  }
}

resource "aws_kms_alias" "hospital" {
  for_each = local.hospitals

  name          = "alias/${var.name}-${each.key}"
  target_key_id = aws_kms_key.hospital[each.key].key_id
}

resource "aws_kms_key" "platform" {
  description             = "fedrun: S3 encryption of MLflow artifacts, ECR image encryption"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
  policy                  = data.aws_iam_policy_document.key_admin.json
}

resource "aws_kms_alias" "platform" {
  name          = "alias/${var.name}-platform"
  target_key_id = aws_kms_key.platform.key_id
}
