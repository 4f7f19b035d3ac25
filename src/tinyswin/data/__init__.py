"""Data: sources -> uint8 cache -> device batches -> augmented float batches."""

from tinyswin.data.cache import Cache, is_cache, load_cache, prepare, write_cache
from tinyswin.data.loader import BatchLoader

__all__ = [
    "BatchLoader",
    "Cache",
    "is_cache",
    "load_cache",
    "prepare",
    "write_cache",
]
