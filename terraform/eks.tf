# EKS with IRSA: the module creates the cluster's IAM OIDC provider, which the hospital
# roles (iam.tf) trust. terraform-aws-modules/eks, pinned to the v20 line (AWS provider 5.x).

module "eks" {
  #checkov:skip=CKV_TF_1:Pinned to one exact Terraform Registry release; a commit hash needs a git source instead of the registry.
  source  = "terraform-aws-modules/eks/aws"
  version = "20.37.2"

  cluster_name    = local.cluster_name
  cluster_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  # The API is reachable inside the VPC, and from outside only from the listed networks.
  cluster_endpoint_private_access      = true
  cluster_endpoint_public_access       = length(var.api_public_access_cidrs) > 0
  cluster_endpoint_public_access_cidrs = var.api_public_access_cidrs

  enable_irsa = true

  # Kubernetes Secrets (the runs' TLS keys among them) are envelope-encrypted with a KMS
  # key the module creates and rotates.
  create_kms_key          = true
  enable_kms_key_rotation = true
  cluster_encryption_config = {
    resources = ["secrets"]
  }

  cluster_enabled_log_types              = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
  cloudwatch_log_group_retention_in_days = var.log_retention_days

  # Access entries instead of the aws-auth ConfigMap.
  authentication_mode                      = "API"
  enable_cluster_creator_admin_permissions = true
  access_entries = {
    for i, arn in var.cluster_admin_arns : "admin-${i}" => {
      principal_arn = arn
      policy_associations = {
        admin = {
          policy_arn = "arn:${local.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
          access_scope = {
            type = "cluster"
          }
        }
      }
    }
  }

  cluster_addons = {
    coredns = {
      most_recent = true
    }
    kube-proxy = {
      most_recent = true
    }
    # The VPC CNI enforces NetworkPolicy (off by default): fedrun's policies keep hospitals
    # away from the server's control API.
    vpc-cni = {
      most_recent    = true
      before_compute = true
      configuration_values = jsonencode({
        enableNetworkPolicy = "true"
      })
    }
  }

  eks_managed_node_group_defaults = {
    ami_type = "AL2023_x86_64_STANDARD"
    # IMDSv2 only, and one network hop: pods cannot reach the instance metadata service,
    # so no pod can borrow the node's IAM role. Pods get AWS credentials from IRSA only.
    metadata_options = {
      http_endpoint               = "enabled"
      http_tokens                 = "required"
      http_put_response_hop_limit = 1
    }
  }

  eks_managed_node_groups = {
    system = {
      name           = "${var.name}-system"
      iam_role_name  = "${var.name}-system-nodes"
      instance_types = var.system_node_group.instance_types
      min_size       = var.system_node_group.min_size
      max_size       = var.system_node_group.max_size
      desired_size   = var.system_node_group.desired_size

      labels = {
        "fedrun.io/pool" = "system"
      }
      # CoreDNS and the other EKS add-ons tolerate this taint; nothing else does.
      taints = {
        critical-addons = {
          key    = "CriticalAddonsOnly"
          value  = "true"
          effect = "NO_SCHEDULE"
        }
      }

      block_device_mappings = {
        root = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = var.system_node_group.disk_size_gib
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
    }

    training = {
      name           = "${var.name}-training"
      iam_role_name  = "${var.name}-training-nodes"
      instance_types = var.training_node_group.instance_types
      min_size       = var.training_node_group.min_size
      max_size       = var.training_node_group.max_size
      desired_size   = var.training_node_group.desired_size

      labels = {
        "fedrun.io/pool" = "training"
      }

      block_device_mappings = {
        root = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = var.training_node_group.disk_size_gib
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
    }
  }
}
