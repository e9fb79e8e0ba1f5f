"""``python -m spotpipe``: the same as the ``spotpipe`` command."""

from spotpipe.cli import main

raise SystemExit(main())
