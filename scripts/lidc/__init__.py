from scripts.lidc._all import *  # noqa: F401,F403
from scripts.lidc._all import __all__  # noqa: F401
