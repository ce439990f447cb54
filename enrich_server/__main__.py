"""``python -m enrich_server``: the same CLI as ``enrich-server``."""

from enrich_server.cli import main

raise SystemExit(main())
