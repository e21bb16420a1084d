"""Allow ``python -m pacsvault`` where the console script is not on PATH."""

from pacsvault.cli.main import main

raise SystemExit(main())
