"""``python -m dtprobed``: the daemon (see :mod:`dtprobed.daemon.main`)."""

import sys

from dtprobed.daemon.main import main

if __name__ == "__main__":
    sys.exit(main())
