"""Data tools: the synthetic noisy-label generator, the label-corruption library and datalists of MSD/LiTS folders."""
