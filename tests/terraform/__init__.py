"""The Terraform configuration: validated, evaluated for several hospital counts, its IAM read."""
