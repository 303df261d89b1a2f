"""``python -m pruner.cli <command> ...``: the ``pruner`` command without the installed script."""
import sys

from pruner.cli import main

sys.exit(main())
