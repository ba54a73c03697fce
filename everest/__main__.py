"""``python -m everest``: the ``everest`` command, for batch jobs that name the interpreter."""

import sys

from everest.cli import main

if __name__ == "__main__":
    sys.exit(main())
