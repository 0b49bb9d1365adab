import sys

from scripts.lidc._all import main

sys.exit(main())
