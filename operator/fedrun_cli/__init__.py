"""The ``fedrun`` command: the only package that imports every other fedrun package."""
