"""DIN as a graph of plain tensors for serving: ``torch.export`` of the eval model and the AOTInductor package.

The serving form of a batch is five tensors (``ServingDIN.forward``): the profile ids of B users, C candidates per
user, their jagged histories and the dense features, all already mapped to table rows. Batch, candidates and history
total are dynamic dimensions of the exported graph. The values (offsets, id ranges) are not checked inside the graph:
``check_serving_inputs`` checks them before it (the predictor calls it on every batch). The ONNX form of the same
graph, in standard ops only, is ``din_ext.onnx_export``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from din_ext import _validate
from din_ext.data.core import Interactions, Schema
from din_ext.model import DIN

PACKAGE_FORMAT = 1
METADATA_FILE = "din_ext.json"  # the serving metadata inside a .pt2 package (its extra files)


def user_columns(schema: Schema) -> Tuple[str, ...]:
    return tuple(schema.user_fields)


def item_columns(schema: Schema) -> Tuple[str, ...]:
    return tuple(schema.item_fields)


def dense_width(schema: Schema, use_dense: bool) -> int:
    return schema.dense_dim if use_dense else 0


class ServingDIN(nn.Module):
    """A DIN in eval mode over plain tensors, for torch.export, AOTInductor and the predictor.

    forward(user, items, hist_offsets, hist, dense) -> probabilities (B, C, T):
    user: (B, U) int64 rows of ``schema.user_fields`` in order; items: (B, C, I) int64 rows of
    ``schema.item_fields`` in order, C >= 1 candidates per user; hist_offsets: (B+1,) int64; hist: (N, H) int64 rows
    of ``schema.history_fields`` in order, N = hist_offsets[-1]; dense: (B, dense_dim) float32, (B, 0) for a model
    without dense features.
    """

    def __init__(self, model: DIN):
        super().__init__()
        self.model = model.eval()
        schema = model.schema
        self.users, self.items, self.history = user_columns(schema), item_columns(schema), schema.history_fields

    def forward(self, user: torch.Tensor, items: torch.Tensor, hist_offsets: torch.Tensor, hist: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        batch = Interactions(
            user_id=items.new_zeros(items.shape[0]), user={f: user[:, i] for i, f in enumerate(self.users)},
            item={f: items[:, :, i] for i, f in enumerate(self.items)}, hist_offsets=hist_offsets,
            hist={f: hist[:, i] for i, f in enumerate(self.history)}, labels={},
            dense=dense if self.model.use_dense else None)
        return torch.sigmoid(self.model(batch))


def check_serving_inputs(schema: Schema, use_dense: bool, user: torch.Tensor, items: torch.Tensor,
                         hist_offsets: torch.Tensor, hist: torch.Tensor, dense: torch.Tensor) -> None:
    """Raises ValueError naming the input unless the five tensors fit ``schema`` (dtypes, shapes, offsets and ids
    within the tables): the checks a graph cannot make on its own data."""
    rows = hist_offsets.shape[0] - 1
    shapes = {"user": (rows, len(schema.user_fields)), "items": (rows, None, len(schema.item_fields)),
              "hist": (None, len(schema.history_fields)), "dense": (rows, dense_width(schema, use_dense))}
    if hist_offsets.dtype != torch.long or hist_offsets.dim() != 1 or rows < 1:
        raise ValueError(f"hist_offsets must be int64 [B + 1] with B >= 1, got {hist_offsets.dtype} "
                         f"{tuple(hist_offsets.shape)}")
    for name, x in (("user", user), ("items", items), ("hist", hist), ("dense", dense)):
        want = shapes[name]
        fits = x.dim() == len(want) and all(w is None or s == w for s, w in zip(x.shape, want))
        dtype_ok = x.is_floating_point() if name == "dense" else x.dtype == torch.long
        if not fits or not dtype_ok or (name == "items" and x.shape[1] < 1):
            text = ", ".join("*" if w is None else str(w) for w in want)
            raise ValueError(f"{name} must be {'float32' if name == 'dense' else 'int64'} [{text}], got {x.dtype} "
                             f"{tuple(x.shape)}")
    _validate.check_offsets(torch.stack(_validate.offsets_summary(hist_offsets)).tolist(), hist.shape[0], None)
    if int(hist_offsets[-1]) != hist.shape[0]:
        raise ValueError(f"hist must have hist_offsets[-1] = {int(hist_offsets[-1])} rows, got {hist.shape[0]}")
    sizes = (("user", user, list(schema.user_fields.items())), ("items", items, list(schema.item_fields.items())),
             ("hist", hist, [(f, schema.item_fields[f]) for f in schema.history_fields]))
    for name, x, fields in sizes:
        if not x.numel():
            continue
        flat = x.reshape(-1, len(fields))
        lo, hi = flat.amin(0).tolist(), flat.amax(0).tolist()
        for (field, size), a, b in zip(fields, lo, hi):
            if a < 0 or b >= size:
                raise ValueError(f"{name}[..., {field!r}] has rows outside [0, {size}) (the table size)")


def example_inputs(schema: Schema, use_dense: bool, rows: int = 3, candidates: int = 5, total: int = 7
                   ) -> Tuple[torch.Tensor, ...]:
    """Inputs of ServingDIN with sizes distinct from each other and from 0 and 1 (so export keeps them dynamic)."""
    lengths = torch.tensor([total - total // 2] + [total // 2] + [0] * (rows - 2))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    user = torch.ones(rows, len(schema.user_fields), dtype=torch.long)
    items = torch.ones(rows, candidates, len(schema.item_fields), dtype=torch.long)
    hist = torch.ones(total, len(schema.history_fields), dtype=torch.long)
    dense = torch.zeros(rows, dense_width(schema, use_dense))
    return user, items, offsets, hist, dense


def dynamic_shapes() -> Tuple[Dict[int, Any], ...]:
    """The dynamic dimensions of ServingDIN's five inputs: batch, candidates and history total."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    candidates = torch.export.Dim("candidates", min=1, max=1 << 16)
    total = torch.export.Dim("history", min=0, max=1 << 30)
    return {0: batch}, {0: batch, 1: candidates}, {0: batch + 1}, {0: total}, {0: batch}


def export(model: DIN) -> torch.export.ExportedProgram:
    """``torch.export`` of the eval model (ServingDIN) with a dynamic batch, candidates and history total."""
    serving = ServingDIN(model)
    with torch.no_grad():
        return torch.export.export(serving, example_inputs(model.schema, model.use_dense),
                                   dynamic_shapes=dynamic_shapes())


def serving_metadata(model: DIN, data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a package needs beside its graph, as JSON-able data: the schema (vocabularies included, frequencies
    not), whether dense features are used, and the data options of the checkpoint (for ``din-ext predict``)."""
    schema = model.schema
    return {"format": PACKAGE_FORMAT, "user_fields": dict(schema.user_fields),
            "item_fields": dict(schema.item_fields), "history_fields": list(schema.history_fields),
            "dense_dim": int(schema.dense_dim), "tasks": list(schema.tasks), "use_dense": bool(model.use_dense),
            "vocabularies": {f: list(v) for f, v in schema.vocabularies.items()}, "data": data}


def schema_of_metadata(meta: Dict[str, Any]) -> Schema:
    return Schema(user_fields=dict(meta["user_fields"]), item_fields=dict(meta["item_fields"]),
                  history_fields=tuple(meta["history_fields"]), dense_dim=int(meta["dense_dim"]),
                  tasks=tuple(meta["tasks"]), vocabularies=dict(meta["vocabularies"]))


def export_package(model: DIN, path: str, data: Optional[Dict[str, Any]] = None) -> str:
    """Compiles the eval model with AOTInductor for the CPU into the .pt2 package ``path``, with the serving
    metadata (din_ext.json) inside. The package calls the din_ext ops through the dispatcher: load it after
    ``import din_ext`` (Python) or with the din_ext op library loaded (C++)."""
    from torch._inductor import aot_compile
    from torch.export.pt2_archive._package import package_pt2

    if not os.fspath(path).endswith(".pt2"):
        raise ValueError(f"a package path must end in .pt2, got {path!r}")
    model = model.to("cpu")
    program = export(model)
    args, kwargs = program.example_inputs
    files = aot_compile(program.module(), args, kwargs, options={"aot_inductor.package": True})
    package_pt2(path, aoti_files={"model": files},
                extra_files={METADATA_FILE: json.dumps(serving_metadata(model, data))})
    return os.fspath(path)


def load_package(path: str) -> Tuple[Any, Dict[str, Any]]:
    """(the AOTInductor runner, the serving metadata) of a .pt2 package written by export_package."""
    from torch.export.pt2_archive._package import load_pt2

    contents = load_pt2(os.fspath(path))
    if METADATA_FILE not in contents.extra_files or "model" not in contents.aoti_runners:
        raise ValueError(f"{path}: not a din_ext package (no {METADATA_FILE}; write it with din-ext export)")
    meta = json.loads(contents.extra_files[METADATA_FILE])
    if meta.get("format") != PACKAGE_FORMAT:
        raise ValueError(f"{path}: package format {meta.get('format')!r}, this din_ext reads {PACKAGE_FORMAT}")
    return contents.aoti_runners["model"], meta
