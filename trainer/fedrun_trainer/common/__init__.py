"""What the server pod and the hospital pods share: the run's settings, data, model, privacy ledger,
the messages they exchange and how Flower's processes are started."""
