"""What every study shares, below ``tune`` (Optuna searches) and ``scale`` (grids): the study folder and
``study.json``, the MLflow parent run, the trainable that runs one training job per trial and the Tuner
(``experiment``), and the driver-side callbacks: MLflow child runs, the live trial table (``callbacks``)."""
