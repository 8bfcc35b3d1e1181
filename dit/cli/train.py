"""Console entry point `dit-train` (same as `python train.py`)."""
from ..training import main

__all__ = ["main"]
