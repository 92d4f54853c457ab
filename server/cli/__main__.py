"""``python -m gradwatch.server.cli``: the ``gradwatch`` console script."""

from . import main

main()
