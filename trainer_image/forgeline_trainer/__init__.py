"""Forgeline's trainer: the code that runs inside the Ray cluster (never imports kopf)."""

__version__ = "0.1.0"
