"""The MCPM noisy-label segmentation bundle's Python code.

The modules of this folder are what the configs name (``scripts.trainer.MCPMTrainer``, ...) and what those import;
``data/`` holds the data tools (synthetic generator, corruption library, datalists), ``lidc/`` the LIDC-IDRI tools
and ``experiments/`` the benchmark and the main job. The bundle zip ships this folder's modules and ``data/``.
"""
