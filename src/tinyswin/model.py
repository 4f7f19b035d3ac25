"""Swin Transformer, from scratch (placeholder until the model lands)."""
