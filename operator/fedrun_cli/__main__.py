"""``python -m fedrun_cli`` is ``fedrun``."""

from fedrun_cli.main import main

raise SystemExit(main())
