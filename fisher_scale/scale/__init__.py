"""Scaling studies: a grid of training runs (``grid``) and their measures, power-law fits and plots
(``analysis``)."""
