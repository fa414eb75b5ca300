# S3: one bucket per hospital (its data and its privacy ledger), one for MLflow artifacts,
# one for the server access logs of the other two kinds. Every bucket is versioned,
# encrypted by default, closed to the public, ACL-free and refuses requests without TLS.

locals {
  hospital_role_arns = [for role in aws_iam_role.hospital : role.arn]
}

# --------------------------------------------------------------------------- hospital data

resource "aws_s3_bucket" "hospital" {
  for_each = local.hospitals
  #checkov:skip=CKV_AWS_144:Cross-region replication would copy patient data out of the region the hospitals agreed to; versioning and KMS protect it in place.

  bucket        = each.value.bucket
  force_destroy = var.force_destroy

  tags = {
    "fedrun.io/hospital" = each.key
  }

  lifecycle {
    precondition {
      condition     = length(each.value.bucket) <= 63
      error_message = "The bucket name ${each.value.bucket} is longer than 63 characters: shorten the hospital name or set hospitals[\"${each.key}\"].bucket_name."
    }
  }
}

resource "aws_s3_bucket_ownership_controls" "hospital" {
  for_each = local.hospitals

  bucket = aws_s3_bucket.hospital[each.key].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "hospital" {
  for_each = local.hospitals

  bucket                  = aws_s3_bucket.hospital[each.key].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "hospital" {
  for_each = local.hospitals

  bucket = aws_s3_bucket.hospital[each.key].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "hospital" {
  for_each = local.hospitals

  bucket = aws_s3_bucket.hospital[each.key].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.hospital[each.key].arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "hospital" {
  for_each = local.hospitals

  bucket        = aws_s3_bucket.hospital[each.key].id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "s3/${each.value.bucket}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "hospital" {
  for_each = local.hospitals

  bucket = aws_s3_bucket.hospital[each.key].id

  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# Object-level events go to EventBridge, where an audit rule can watch for unexpected writes.
resource "aws_s3_bucket_notification" "hospital" {
  for_each = local.hospitals

  bucket      = aws_s3_bucket.hospital[each.key].id
  eventbridge = true
}

data "aws_iam_policy_document" "hospital_bucket" {
  for_each = local.hospitals

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.hospital[each.key].arn, "${aws_s3_bucket.hospital[each.key].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyOldTls"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.hospital[each.key].arn, "${aws_s3_bucket.hospital[each.key].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }

  # A second lock besides the roles' own policies: every other hospital's role is refused
  # here even if someone grants it access in IAM.
  statement {
    sid       = "DenyOtherHospitals"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.hospital[each.key].arn, "${aws_s3_bucket.hospital[each.key].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:PrincipalArn"
      values   = local.hospital_role_arns
    }
    condition {
      test     = "ArnNotEquals"
      variable = "aws:PrincipalArn"
      values   = [aws_iam_role.hospital[each.key].arn]
    }
  }

  # The hospital's own role works only through the cluster VPC's S3 endpoint.
  statement {
    sid       = "DenyOwnRoleOutsideVpc"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.hospital[each.key].arn, "${aws_s3_bucket.hospital[each.key].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:PrincipalArn"
      values   = [aws_iam_role.hospital[each.key].arn]
    }
    condition {
      test     = "StringNotEquals"
      variable = "aws:SourceVpce"
      values   = [aws_vpc_endpoint.s3.id]
    }
  }
}

resource "aws_s3_bucket_policy" "hospital" {
  for_each = local.hospitals

  bucket = aws_s3_bucket.hospital[each.key].id
  policy = data.aws_iam_policy_document.hospital_bucket[each.key].json

  # The public access block must exist before a policy is judged against it.
  depends_on = [aws_s3_bucket_public_access_block.hospital]
}

# --------------------------------------------------------------------------- MLflow artifacts

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_144:Artifacts are derived from patient data and stay in the chosen region, as the data does.
  bucket        = "${var.name}-mlflow-artifacts-${local.account_id}"
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.platform.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "artifacts" {
  bucket        = aws_s3_bucket.artifacts.id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "s3/${aws_s3_bucket.artifacts.bucket}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_notification" "artifacts" {
  bucket      = aws_s3_bucket.artifacts.id
  eventbridge = true
}

data "aws_iam_policy_document" "artifacts_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  # Hospitals send model updates to the server, never artifacts to MLflow's store.
  statement {
    sid       = "DenyHospitals"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:PrincipalArn"
      values   = local.hospital_role_arns
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket     = aws_s3_bucket.artifacts.id
  policy     = data.aws_iam_policy_document.artifacts_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

# --------------------------------------------------------------------------- access logs

resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log target; logging it into itself would log its own log deliveries without end.
  #checkov:skip=CKV_AWS_144:Access logs stay in the region of the buckets they describe.
  #checkov:skip=CKV_AWS_145:S3 server access log delivery is documented for SSE-S3 default encryption; the logs hold request metadata, never object contents.
  #checkov:skip=CKV2_AWS_62:No consumer for object events here; every log delivery would emit one.
  bucket        = "${var.name}-access-logs-${local.account_id}"
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

data "aws_iam_policy_document" "logs_bucket" {
  statement {
    sid       = "S3ServerAccessLogDelivery"
    effect    = "Allow"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.logs.arn}/s3/*"]

    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = concat([for b in aws_s3_bucket.hospital : b.arn], [aws_s3_bucket.artifacts.arn])
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.logs.arn, "${aws_s3_bucket.logs.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "logs" {
  bucket     = aws_s3_bucket.logs.id
  policy     = data.aws_iam_policy_document.logs_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.logs]
}
