"""``fedrun local``: a FederatedRun on one machine, its rendered pods run as local processes."""
