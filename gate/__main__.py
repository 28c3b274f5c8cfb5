"""``python -m gate`` is the ``ugate`` command."""

import sys

from gate.cli import main

sys.exit(main())
