"""fedrun's core, shared by every side: the FederatedRun API, names, time and privacy maths, PKI.

It imports no other fedrun package: rendering, the operator, the local runner, the pods'
code and the CLI all build on it (docs/architecture.md).
"""
