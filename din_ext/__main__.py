"""``python -m din_ext``: the ``din-ext`` command line (din_ext.cli)."""

import sys

from din_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
