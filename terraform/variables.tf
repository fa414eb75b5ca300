# Inputs. Only `region` and `api_public_access_cidrs` have no default; see
# terraform.tfvars.example for a complete file.

variable "region" {
  description = "AWS region for the cluster, the hospitals' buckets and the ECR repositories. Choose it for data residency: hospital data never leaves it."
  type        = string
}

variable "name" {
  description = "Prefix of every named resource (cluster, roles, buckets, keys). A short DNS label."
  type        = string
  default     = "fedrun"

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$", var.name))
    error_message = "name must be a DNS label of at most 20 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "hospitals" {
  description = <<-EOT
    The participating hospitals, keyed by the hospital name used in FederatedRun
    spec.hospitals[].name (a DNS-1123 label). Each gets its own S3 bucket, KMS key and IAM
    role. bucket_name overrides the default bucket name <name>-<hospital>-<account id>.
  EOT
  type = map(object({
    bucket_name = optional(string)
  }))
  default = {
    "hospital-a" = {}
    "hospital-b" = {}
    "hospital-c" = {}
  }

  validation {
    condition     = length(var.hospitals) >= 1 && length(var.hospitals) <= 50
    error_message = "hospitals must name between 1 and 50 hospitals (a FederatedRun takes at most 50)."
  }

  validation {
    condition     = alltrue([for h in keys(var.hospitals) : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", h)) && length(h) <= 62])
    error_message = "Every hospital name must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit), as in FederatedRun spec.hospitals[].name."
  }

  validation {
    condition = alltrue([
      for h in values(var.hospitals) :
      h.bucket_name == null ? true : can(regex("^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$", h.bucket_name))
    ])
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits and '-' (no dots: TLS to virtual-hosted buckets breaks on them)."
  }
}

variable "namespace" {
  description = "Kubernetes namespace of the FederatedRuns whose hospital ServiceAccounts may assume the hospital roles. With install_chart = true the operator follows runs there (the chart's watchNamespaces); it must exist before the chart is installed (docs/aws.md)."
  type        = string
  default     = "fedrun"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace)) && length(var.namespace) <= 63
    error_message = "namespace must be a DNS-1123 label."
  }
}

variable "run_names" {
  description = <<-EOT
    Names of the FederatedRuns allowed to use the hospitals' data. The operator names a
    hospital's ServiceAccount <run>-<hospital>, and each hospital role trusts exactly
    system:serviceaccount:<namespace>:<run>-<hospital> for these runs and no other subject.
    Adding a run here (and applying) is how a study is approved; see docs/aws.md.
  EOT
  type        = list(string)
  default     = ["stroke"]

  validation {
    condition     = length(var.run_names) >= 1 && length(distinct(var.run_names)) == length(var.run_names)
    error_message = "run_names must name at least one FederatedRun, each once."
  }

  validation {
    condition     = alltrue([for r in var.run_names : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", r)) && length(r) <= 56])
    error_message = "Every run name must be a DNS-1123 label of at most 56 characters (the server's objects are named <run>-server)."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version. Keep it in standard support: a version in extended support costs six times as much per cluster hour."
  type        = string
  default     = "1.35"
}

variable "availability_zones" {
  description = "Availability zones of the subnets (two or three). Empty: <region>a, <region>b and <region>c."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || (length(var.availability_zones) >= 2 && length(var.availability_zones) <= 3)
    error_message = "availability_zones must name two or three zones (EKS needs subnets in at least two)."
  }
}

variable "vpc_cidr" {
  description = "CIDR of the cluster's VPC: three private subnets (nodes) and three public ones (NAT, load balancers) are cut from it."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be an IPv4 CIDR of size /18 or larger."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for the whole VPC (cheaper) instead of one per availability zone (survives the loss of a zone)."
  type        = bool
  default     = true
}

variable "api_public_access_cidrs" {
  description = "CIDRs allowed to reach the cluster's public API endpoint (for kubectl and helm). Empty: the endpoint is private to the VPC."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.api_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "api_public_access_cidrs must be IPv4 CIDRs, and not 0.0.0.0/0: name the networks kubectl runs from."
  }
}

variable "cluster_admin_arns" {
  description = "IAM principals (roles or users) given cluster-admin through EKS access entries, besides the identity that runs terraform apply."
  type        = list(string)
  default     = []
}

variable "system_node_group" {
  description = "Managed node group for cluster add-ons (CoreDNS and the like). Tainted CriticalAddonsOnly, so workloads stay off it."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  })
  default = {
    instance_types = ["t3.medium"]
    min_size       = 2
    max_size       = 3
    desired_size   = 2
    disk_size_gib  = 20
  }
}

variable "training_node_group" {
  description = "Managed node group for the fedrun operator, run servers and hospital clients (labelled fedrun.io/pool=training)."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  })
  default = {
    instance_types = ["m6i.xlarge"]
    min_size       = 0
    max_size       = 6
    desired_size   = 2
    disk_size_gib  = 50
  }
}

variable "mlflow_namespace" {
  description = "Namespace of the MLflow tracking server that stores run artifacts in the artifacts bucket."
  type        = string
  default     = "mlflow"
}

variable "mlflow_service_account" {
  description = "ServiceAccount of the MLflow tracking server; it alone may assume the MLflow artifacts role."
  type        = string
  default     = "mlflow"
}

variable "noncurrent_version_retention_days" {
  description = "Days a replaced or deleted object version (data or privacy ledger) is kept before S3 expires it."
  type        = number
  default     = 365
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs are kept."
  type        = number
  default     = 365
}

variable "log_retention_days" {
  description = "Days the EKS control-plane and VPC flow logs are kept in CloudWatch."
  type        = number
  default     = 90
}

variable "kms_deletion_window_days" {
  description = "Waiting period before a deleted KMS key is destroyed (7-30 days); data encrypted with it is unreadable afterwards."
  type        = number
  default     = 30

  validation {
    condition     = var.kms_deletion_window_days >= 7 && var.kms_deletion_window_days <= 30
    error_message = "kms_deletion_window_days must be between 7 and 30."
  }
}

variable "force_destroy" {
  description = "Let terraform destroy delete buckets that still hold objects (every version) and ECR repositories that still hold images. Keep false for real hospital data."
  type        = bool
  default     = false
}

variable "install_chart" {
  description = "Install charts/fedrun with Terraform's helm provider after the cluster is up (otherwise use helm install, see docs/aws.md), following runs in var.namespace. That namespace must exist first: apply with false, create it with kubectl, then set true (docs/aws.md)."
  type        = bool
  default     = false
}

variable "chart_namespace" {
  description = "Namespace of the fedrun operator when install_chart = true."
  type        = string
  default     = "fedrun-system"
}

variable "chart_values" {
  description = "Values for the fedrun chart when install_chart = true, e.g. { image = { tag = \"0.1.0\" } } (keys: docs/install.md). They override image.repository (this stack's ECR) and watchNamespaces ([var.namespace]; none with clusterWide = true)."
  type        = any
  default     = {}
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
