"""Datasets for DIN: the common in-memory form, batching, vocabularies, and loaders of the public formats."""

from din_ext.data.amazon import load_amazon
from din_ext.data.core import OOV, Interactions, Schema, concat, iterate_batches
from din_ext.data.loaders import LOADERS, load_dataset, register_loader
from din_ext.data.recbole import load_recbole
from din_ext.data.samples import write_sample
from din_ext.data.synthetic import load_synthetic
from din_ext.data.taobao import load_taobao
from din_ext.data.vocab import Vocabulary, count_frequencies, fit_and_encode

__all__ = ["LOADERS", "OOV", "Interactions", "Schema", "Vocabulary", "concat", "count_frequencies",
           "fit_and_encode", "iterate_batches", "load_amazon", "load_dataset", "load_recbole", "load_synthetic",
           "load_taobao", "register_loader", "write_sample"]
