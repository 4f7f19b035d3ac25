"""The package version (a leaf: the data layer records it in caches without importing the model)."""

__version__ = "0.1.0"
