"""The Argo CD examples: the Application, and the FederatedRun health check under Argo CD's
Lua sandbox."""
