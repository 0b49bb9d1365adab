"""Python components of the MCPM noisy-label segmentation bundle, referenced by the configs as ``scripts.*``."""
