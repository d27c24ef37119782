"""`python -m nbdcache`: the same as the `nbdcache` console script."""

from nbdcache.cli import main

raise SystemExit(main())
