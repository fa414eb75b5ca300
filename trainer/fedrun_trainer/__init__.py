"""What runs in fedrun's pods, by role: ``server``, ``hospital`` and what both share (``common``).

``apps`` (the Flower App's ServerApp and ClientApp) and ``warm_executor`` sit on top of both roles.
It imports the core only, never the operator, rendering, the local runner or the CLI."""
