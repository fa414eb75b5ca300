provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}

# Used only when install_chart = true. Credentials come from `aws eks get-token` at apply
# time (the AWS CLI must be on PATH), so no cluster token is stored in state.
provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Zones are named, not discovered: a zone AWS adds later must not move the subnets.
data "aws_availability_zones" "selected" {
  state = "available"

  filter {
    name   = "zone-name"
    values = local.az_names
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) >= 2
      error_message = "Fewer than two of the zones ${join(", ", local.az_names)} are available in this account: name two or three in availability_zones."
    }
  }
}
