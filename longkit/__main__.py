"""``python -m longkit`` = the ``longkit`` command (``doctor``, ``demo``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
