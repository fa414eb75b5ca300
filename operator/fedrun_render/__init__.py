"""From a FederatedRun to the Kubernetes objects that carry it out: pure, on top of the core."""
