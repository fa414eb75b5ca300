# Terraform and provider versions. `terraform init` writes .terraform.lock.hcl with the
# exact provider builds: commit it, so every apply uses the same providers.
#
# State: this configuration names no backend, so state is local until you add one.
# docs/aws.md ("Remote state") shows backend.tf.example -> backend.tf for S3.
terraform {
  required_version = ">= 1.7"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # The EKS module's v20 line requires AWS provider 5.x (>= 5.95, < 6).
      version = "~> 5.95"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.17"
    }
  }
}
