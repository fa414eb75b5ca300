"""fedrun's Kubernetes side: the FederatedRun API, rendering, the operator and the CLI."""
