"""Sweeps: Ray Tune + Optuna studies over the experiment config (``study``), their search spaces
(``space``), MLflow/terminal callbacks (``callbacks``) and the optimizer comparison (``compare``)."""
