"""Experiments around the bundle, not shipped in its zip: the methods compared (``methods``), the benchmark over
noise settings and seeds (``benchmark``) and its report (``report``), the main job (``demo``) and the per-iteration
cost benchmark (``step_benchmark``)."""
