"""A hospital pod: the SuperNode wrapper and the ClientApp handlers that train on local data."""
