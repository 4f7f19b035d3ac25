"""Data: sources -> uint8 cache -> device batches -> augmented float batches."""
