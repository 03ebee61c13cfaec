"""``python -m anyedit_lightning bench|grid|demo ...`` (see :mod:`anyedit_lightning.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
