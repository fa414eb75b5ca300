# Optional: install the fedrun chart from this checkout once the cluster is up, with the
# operator image from this stack's ECR repository. The runs' namespace (var.namespace) is
# not created here: docs/aws.md creates it with kubectl.

resource "helm_release" "fedrun" {
  count = var.install_chart ? 1 : 0

  name             = "fedrun"
  chart            = "${path.module}/../charts/fedrun"
  namespace        = var.chart_namespace
  create_namespace = true
  atomic           = true
  wait             = true
  timeout          = 600

  # Helm merges these in order, so chart_values may override the repository too.
  values = [
    yamlencode({
      image = {
        repository = aws_ecr_repository.image["fedrun-operator"].repository_url
      }
    }),
    yamlencode(var.chart_values),
  ]

  # Node groups and add-ons first: the operator needs a node and DNS to become ready.
  depends_on = [module.eks]
}
