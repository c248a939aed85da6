"""Datasets for DIN: the common in-memory form, batching, and loaders of the public formats."""

from din_ext.data.core import OOV, Interactions, Schema, concat, iterate_batches

__all__ = ["OOV", "Interactions", "Schema", "concat", "iterate_batches"]
