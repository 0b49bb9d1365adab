"""``python -m scripts.data``: generate the synthetic noisy-label dataset (see :py:mod:`scripts.data.synthetic`)."""

from scripts.data.synthetic import main

main()
