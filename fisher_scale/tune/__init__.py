"""Sweeps: Ray Tune + Optuna studies over the experiment config (``study``), run side by side in one Tune
experiment (``concurrent``), their search spaces, arms and seeds (``space``), the comparison (``compare``) and
its report (``report``); the machinery shared with ``scale`` is in ``fisher_scale.study``."""
