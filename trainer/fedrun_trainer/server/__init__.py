"""The server pod: SuperLink, fleet proxy, the ServerApp's round loop, status, metrics, MLflow."""
