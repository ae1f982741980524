"""The version of cbir, recorded in every index and model file (a leaf: importing it loads nothing)."""

__version__ = "0.1.0"
