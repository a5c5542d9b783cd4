"""Forgeline's Kubernetes operator and command line.

The package root stays import-light (no kopf, no Ray): `forgeline validate` only needs the API
models. Layers: api (models) ← builders ← handlers ← main; nothing here imports torch or ray.train.
"""

__version__ = "0.1.0"
