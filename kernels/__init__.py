"""Triton kernels of din_ext, installed as the package ``din_ext.kernels``."""
