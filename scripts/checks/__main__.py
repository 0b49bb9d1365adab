"""``python -m scripts.checks --datalist DATALIST``: check a datalist and every file it references."""

import sys

from scripts.checks.datalist import main

if __name__ == "__main__":
    sys.exit(main())
