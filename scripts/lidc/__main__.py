"""``python -m scripts.lidc stats|convert ...``: the command line of :py:mod:`scripts.lidc.cli`."""

import sys

from scripts.lidc.cli import main

sys.exit(main())
