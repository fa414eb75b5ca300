# `terraform output -json | python -m fedrun_cli.terraform_hospitals` (or
# `make hospitals`) turns the `hospitals` output into a FederatedRun's spec.hospitals.

output "hospitals" {
  description = "Per hospital: its IRSA role, its bucket, the KMS key of that bucket and the ServiceAccounts its role trusts."
  value = {
    for h, cfg in local.hospitals : h => {
      role_arn         = aws_iam_role.hospital[h].arn
      bucket           = aws_s3_bucket.hospital[h].id
      bucket_uri       = "s3://${aws_s3_bucket.hospital[h].id}"
      kms_key_arn      = aws_kms_key.hospital[h].arn
      service_accounts = cfg.service_accounts
      ledger_uri       = "s3://${aws_s3_bucket.hospital[h].id}/${local.ledger_prefix}/"
    }
  }
}

output "namespace" {
  description = "Namespace the FederatedRuns must be applied in."
  value       = var.namespace
}

output "run_names" {
  description = "FederatedRun names the hospital roles trust."
  value       = var.run_names
}

output "region" {
  description = "AWS region of everything above."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.cluster_name
}

output "configure_kubectl" {
  description = "Command that adds the cluster to your kubeconfig."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "oidc_provider_arn" {
  description = "The cluster's IAM OIDC provider, which every IRSA role trusts."
  value       = module.eks.oidc_provider_arn
}

output "ecr_repository_urls" {
  description = "Where to push the images: operator and trainer."
  value = {
    operator = aws_ecr_repository.image["fedrun-operator"].repository_url
    trainer  = aws_ecr_repository.image["fedrun-trainer"].repository_url
  }
}

output "ecr_registry" {
  description = "The registry host, for docker login and image names."
  value       = "${local.account_id}.dkr.ecr.${var.region}.amazonaws.com"
}

output "artifacts_bucket_uri" {
  description = "MLflow artifact store (mlflow server --artifacts-destination)."
  value       = "s3://${aws_s3_bucket.artifacts.id}"
}

output "mlflow_role_arn" {
  description = "IRSA role for the MLflow server's ServiceAccount (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.mlflow.arn
}
