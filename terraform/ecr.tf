# ECR repositories for the two images: tags are immutable (a tag names one image forever,
# so a FederatedRun's image cannot change under it), images are scanned on push and
# encrypted with the platform key.

locals {
  images = toset(["fedrun-operator", "fedrun-trainer"])
}

resource "aws_ecr_repository" "image" {
  for_each = local.images

  name                 = each.key
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.platform.arn
  }
}

resource "aws_ecr_lifecycle_policy" "image" {
  for_each = local.images

  repository = aws_ecr_repository.image[each.key].name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Drop untagged images after 14 days"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = 14
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the newest 100 images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = 100
        }
        action = { type = "expire" }
      },
    ]
  })
}
