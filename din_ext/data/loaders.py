"""``load_dataset(name, path, **options)``: one entry point over every loader, extensible by name."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from din_ext.data.amazon import load_amazon
from din_ext.data.core import Interactions, Schema
from din_ext.data.recbole import load_recbole
from din_ext.data.synthetic import load_synthetic
from din_ext.data.taobao import load_taobao

Loader = Callable[..., Tuple[Interactions, Interactions, Schema]]

# name -> loader(path, **options) returning (train, test, schema); other modules add theirs with register_loader.
# synthetic generates its data (path None) from its options seed, users, conversion.
LOADERS: Dict[str, Loader] = {"synthetic": load_synthetic, "amazon": load_amazon, "taobao": load_taobao,
                              "recbole": load_recbole}


def _open_prepared(path, **options):
    from din_ext.data.stream import open_prepared  # imports polars, an optional extra: only when asked for

    return open_prepared(path, **options)


# name -> opener(path, **options) returning (train, test, schema) whose splits stream (``batches()``), nothing read
# up front: the CLI's --data choices besides LOADERS
SOURCES: Dict[str, Callable] = {"prepared": _open_prepared}


def register_loader(name: str, loader: Loader, *, replace: bool = False) -> None:
    """Make ``load_dataset(name, ...)`` call ``loader``."""
    if name in LOADERS and not replace:
        raise ValueError(f"a loader named {name!r} is already registered (pass replace=True)")
    LOADERS[name] = loader


def load_dataset(name: str, path=None, **options) -> Tuple[Interactions, Interactions, Schema]:
    """``(train, test, schema)`` of dataset format ``name`` read from ``path``; options go to its loader."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](path, **options)
