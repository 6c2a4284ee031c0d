"""Sweeps: Ray Tune + Optuna studies over the experiment config (``study``), run side by side in one Tune
experiment (``concurrent``), their search spaces and arms (``space``), MLflow/terminal callbacks
(``callbacks``), the comparison (``compare``) and its report (``report``)."""
