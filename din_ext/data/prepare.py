"""Streaming, memory-bounded preparation of a click log into parquet shards that ``din_ext.data.stream`` reads.

    prepare("taobao", "raw/", "prepared/", memory_limit="2G")      # or: din-ext prepare --data taobao ...
    prepare("amazon", "raw/", "prepared/")                         # the same for "recbole"

The raw files are scanned with polars' streaming engine and partitioned by user into buckets (K chosen so that one
bucket fits the memory limit); each bucket is then sorted and joined in memory on its own (``prepare_core``). The
result has the semantics of the format's in-memory loader (``load_taobao``, ``load_amazon``, ``load_recbole``): the
same impressions (sampled negatives included: the same draws), vocabularies (fitted on the training split,
histories included), frequencies, histories (the most recent ``max_history``), time split and features. Layout of
``out``:

    schema.json                       fields, table sizes, OOV counts, options, shards and their row counts
    vocab/<field>.parquet             key (raw id of rows 1..V-1, in row order), count (training occurrences)
    shards/<k>/sequences.parquet      the bucket's users' behaviours that some history holds, one row each
                                      (history fields, encoded): each user's sequence once, oldest first
    shards/<k>/{train,test}.parquet   impressions: row (the impression's place in the loader's order), user_id,
                                      user.<field> and item.<field> (encoded), dense.<name>, label.<task>, time,
                                      hist_start / hist_end (the history is sequences[hist_start:hist_end])

Peak memory: one bucket (its behaviours and impressions) plus polars' streaming buffers, bounded by
``memory_limit``; the vocabularies (and, for amazon and recbole, the sorted user and item ids, which the
loaders' user_id codes and orders are made of) are held whole: small next to the log.
"""

from __future__ import annotations

from din_ext.data.prepare_amazon import prepare_amazon
from din_ext.data.prepare_core import DEFAULT_MEMORY_LIMIT, FORMAT, parse_memory, require_polars
from din_ext.data.prepare_recbole import prepare_recbole
from din_ext.data.prepare_taobao import prepare_taobao

__all__ = ["DEFAULT_MEMORY_LIMIT", "FORMAT", "PREPARERS", "parse_memory", "prepare", "prepare_amazon",
           "prepare_recbole", "prepare_taobao", "require_polars"]

PREPARERS = {"taobao": prepare_taobao, "amazon": prepare_amazon, "recbole": prepare_recbole}


def prepare(name: str, path, out, **options) -> dict:
    """Prepare raw data of format ``name`` (``PREPARERS``) into the folder ``out``; returns its schema.json dict.

    options: the preparer's (the loader's options, plus memory_limit, shard_rows and log).
    """
    if name not in PREPARERS:
        raise ValueError(f"prepare supports {sorted(PREPARERS)}, got {name!r}")
    return PREPARERS[name](path, out, **options)
