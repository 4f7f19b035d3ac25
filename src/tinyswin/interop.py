"""Weights in and out (placeholder)."""
