"""Functional din_ext ops: each validates its inputs, picks a backend and calls its torch.library op."""

from din_ext.ops.attention import local_activation_attention
from din_ext.ops.dice import dice
from din_ext.ops.mba import mba_embedding

__all__ = ["local_activation_attention", "dice", "mba_embedding"]
