# Names and per-hospital facts every other file uses.

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  cluster_name = var.name
  az_names     = length(var.availability_zones) > 0 ? var.availability_zones : [for s in ["a", "b", "c"] : "${var.region}${s}"]
  azs          = data.aws_availability_zones.selected.names

  tags = merge(var.tags, {
    "app.kubernetes.io/part-of" = "fedrun"
    "fedrun.io/stack"           = var.name
  })

  # Where the trainer keeps each hospital's privacy ledger beside its data (the operator's
  # default ledgerUri): s3://<bucket>/fedrun-ledger/<namespace>/<run>/<uid>/<hospital>.json.
  # The run's uid is known only once the run exists, hence the wildcard in its place.
  ledger_prefix = "fedrun-ledger/${var.namespace}"

  hospitals = {
    for h, cfg in var.hospitals : h => {
      bucket = coalesce(cfg.bucket_name, "${var.name}-${h}-${local.account_id}")
      role   = "${var.name}-${h}"
      # The only Kubernetes identities that may assume this hospital's role.
      service_accounts = [for run in var.run_names : "system:serviceaccount:${var.namespace}:${run}-${h}"]
      ledger_keys      = [for run in var.run_names : "${local.ledger_prefix}/${run}/*/${h}.json"]
    }
  }
}
