"""``python -m colofn ...``: the same command line as the ``colofn`` script."""

import sys

from colofn.cli import main

if __name__ == "__main__":
    sys.exit(main())
