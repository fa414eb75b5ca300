# Optional: install the fedrun chart from this checkout once the cluster is up, with the
# operator image from this stack's ECR repository, following the runs' namespace
# (var.namespace): the chart's operator watches, and is granted its rules (one RoleBinding
# each), only in the namespaces watchNamespaces names, by default only its own.
#
# Precondition: var.namespace must exist before this release is installed, or the
# RoleBinding there fails the install. This configuration creates no Kubernetes objects
# besides the release (no kubernetes provider), so docs/aws.md creates the namespace with
# kubectl: apply with install_chart = false first, create it, then set install_chart = true.

resource "helm_release" "fedrun" {
  count = var.install_chart ? 1 : 0

  name             = "fedrun"
  chart            = "${path.module}/../charts/fedrun"
  namespace        = var.chart_namespace
  create_namespace = true
  atomic           = true
  wait             = true
  timeout          = 600

  # Helm merges these in order, so chart_values may override both (lists are replaced
  # whole: chart_values' watchNamespaces wins). With chart_values' clusterWide = true no
  # watchNamespaces is passed, since the chart refuses both.
  values = [
    yamlencode({
      image = {
        repository = aws_ecr_repository.image["fedrun-operator"].repository_url
      }
      watchNamespaces = try(var.chart_values.clusterWide, false) ? [] : [var.namespace]
    }),
    yamlencode(var.chart_values),
  ]

  # Node groups and add-ons first: the operator needs a node and DNS to become ready.
  depends_on = [module.eks]
}
