"""``python -m medmoe.experiments``: see :func:`medmoe.experiments.cli.main`."""

import sys

from medmoe.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
