"""Data: sources -> uint8 cache -> device batches -> augmented float batches."""

from tinyswin.data.augment import Augment, AugmentConfig, augment_preset, build_augment
from tinyswin.data.cache import Cache, is_cache, load_cache, write_cache
from tinyswin.data.loader import BatchLoader
from tinyswin.data.prepare_source import prepare

__all__ = [
    "Augment",
    "AugmentConfig",
    "BatchLoader",
    "Cache",
    "augment_preset",
    "build_augment",
    "is_cache",
    "load_cache",
    "prepare",
    "write_cache",
]
