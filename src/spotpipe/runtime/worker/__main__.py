"""``python -m spotpipe.runtime.worker --join HOST:PORT``: how the controller starts a local worker."""

from spotpipe.runtime.worker.entry import main

raise SystemExit(main())
