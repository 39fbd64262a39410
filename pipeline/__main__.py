"""`python -m pipeline <command>`: the same as the `quadrant` command."""

from pipeline.cli import main

raise SystemExit(main())
