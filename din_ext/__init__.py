"""din_ext: fast, exact Deep Interest Network (DIN) attention, Dice and MBA regularization for PyTorch."""

from din_ext import _ext, ops, reference
from din_ext._backend import available_backends, use_backend
from din_ext.mba import MBAEmbedding, count_frequencies
from din_ext.model import DIN
from din_ext.modules import Dice, LocalActivationUnit

__version__ = "0.1.0"

__all__ = ["DIN", "Dice", "LocalActivationUnit", "MBAEmbedding", "available_backends", "count_frequencies", "ops",
           "reference", "use_backend", "__version__"]
