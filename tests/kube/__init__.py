"""An emulated Kubernetes API server for the operator's integration and e2e tests.

`FedrunEmulator` (emulator.py) is kmock's Kubernetes emulator with what kube-apiserver
adds; `EmulatedCluster` (cluster.py) runs it on a local port with kubectl-like helpers;
the `cluster` fixture (tests/conftest.py) gives each test a fresh one.
"""
