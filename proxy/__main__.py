"""`python -m proxy` is the `turnout` command."""

from .cli import main

raise SystemExit(main())
