"""``din_ext.serving.DINPredictor``: click probabilities of candidate ads for requests with raw ids.

A request is a dict::

    {"user": {field: raw value, ...},                 # every schema.user_fields entry (None: OOV)
     "history": {field: [raw id, ...], ...},          # every schema.history_fields entry, oldest first, same length
     "candidates": {field: [raw id, ...], ...},       # every schema.item_fields entry, C >= 1 candidates, same length
     "dense": [float, ...]}                           # schema.dense_dim values, if the model uses dense features

Raw ids map to table rows through ``Schema.vocabularies`` (ids unseen in training, and None, map to row 0, OOV).
``predict(requests)`` returns, per request, ``{task: [probability of each candidate]}``. The model runs as the
eager checkpoint (``.pt``, the fastest backend of the machine), as an AOTInductor package (``.pt2``) or as an ONNX
file on onnxruntime (``.onnx``; the extra ``din_ext[onnx]``), the last two from ``din-ext export``; all three take
the same five tensors (``din_ext.export.ServingDIN``), checked before the graph, and give the same probabilities.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from din_ext import export as _export
from din_ext.data.core import OOV, Interactions, Schema, iterate_batches
from din_ext.model import DIN, load_checkpoint

Runner = Callable[..., torch.Tensor]


def _encoder(field: str, vocabulary: Sequence[Any]) -> Tuple[Dict[Any, int], bool]:
    """(raw id -> row for rows 1.., whether the raw ids are strings)."""
    rows = {raw: row for row, raw in enumerate(vocabulary) if row != OOV}
    return rows, any(isinstance(raw, str) for raw in rows)


class DINPredictor:
    """Scores candidates for requests with raw ids; safe to call from several threads.

    runner: the model over the five serving tensors -> probabilities (B, C, T); schema: its fields, vocabularies
    and tasks; use_dense: whether the model reads dense features; data: the data options it was trained on;
    serial: the runner is not reentrant (an AOTInductor runner), so one call runs at a time.
    """

    def __init__(self, runner: Runner, schema: Schema, use_dense: bool, data: Optional[Dict[str, Any]] = None,
                 source: str = "model", serial: bool = True):
        self.runner, self.schema, self.use_dense, self.data, self.source = runner, schema, use_dense, data, source
        self.tasks = tuple(schema.tasks)
        self._encoders = {f: _encoder(f, v) for f, v in schema.vocabularies.items()}
        self._lock = threading.Lock() if serial else contextlib.nullcontext()

    @classmethod
    def load(cls, path: str, backend: str = "auto", threads: Optional[int] = None,
             device: Optional[torch.device] = None) -> "DINPredictor":
        """The predictor of a checkpoint (``.pt``, run eagerly with ``backend`` on ``device``, default the CPU), a
        ``.pt2`` package (CPU) or an ``.onnx`` file (onnxruntime's CPU provider). threads: onnxruntime's intra-op
        threads for ``.onnx``; for ``.pt``/``.pt2``, torch's (``torch.set_num_threads``, process-wide); None
        leaves the default. Raises ValueError (a CheckpointError for ``.pt``) naming the file when it cannot be
        served."""
        source = os.fsdecode(path)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if source.endswith(".onnx"):
            from din_ext.onnx_export import load_onnx

            runner, meta = load_onnx(source, threads)
            return cls(runner, _export.schema_of_metadata(meta), bool(meta["use_dense"]), meta.get("data"), source,
                       serial=False)  # an onnxruntime session runs concurrent calls
        if threads is not None:
            torch.set_num_threads(threads)
        if source.endswith(".pt2"):
            runner, meta = _export.load_package(source)
            return cls(runner, _export.schema_of_metadata(meta), bool(meta["use_dense"]), meta.get("data"), source)
        checkpoint = load_checkpoint(source)
        device = torch.device("cpu") if device is None else torch.device(device)
        model = DIN.from_checkpoint(checkpoint, backend=backend).eval().to(device)
        serving = _export.ServingDIN(model)

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return serving(*(x.to(device) for x in inputs)).cpu()

        return cls(run, model.schema, model.use_dense, checkpoint.get("data"), source, serial=False)

    # -- row ids ------------------------------------------------------------------------------------------------

    def predict_rows(self, user: torch.Tensor, items: torch.Tensor, hist_offsets: torch.Tensor, hist: torch.Tensor,
                     dense: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, C, T) of inputs already mapped to table rows (``din_ext.export.ServingDIN``'s form);
        raises ValueError naming the input unless they fit the schema."""
        _export.check_serving_inputs(self.schema, self.use_dense, user, items, hist_offsets, hist, dense)
        with self._lock:
            return self.runner(user, items, hist_offsets, hist, dense.float())

    def predict_batch(self, batch: Interactions) -> torch.Tensor:
        """Probabilities (S, T) of an Interactions batch with one candidate per row (row ids, as the loaders give;
        history storage past hist_offsets[-1] is ignored)."""
        schema, rows = self.schema, len(batch)
        user = torch.stack([batch.user[f] for f in schema.user_fields], -1) if schema.user_fields else \
            torch.zeros(rows, 0, dtype=torch.long)
        items = torch.stack([batch.item[f] for f in schema.item_fields], -1)[:, None]
        total = int(batch.hist_offsets[-1])
        hist = torch.stack([batch.hist[f][:total] for f in schema.history_fields], -1)
        dense = batch.dense if self.use_dense else torch.zeros(rows, 0)
        return self.predict_rows(user, items, batch.hist_offsets, hist, dense)[:, 0]

    def predict_batches(self, batches: Iterable[Interactions]
                        ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(probabilities (S, T), user_id (S,), labels task -> (S,)) of every row of ``batches`` (at least one, with
        labels of every task) in order: what ``din-ext predict`` writes."""
        outputs, users, labels = [], [], {t: [] for t in self.tasks}
        for batch in batches:
            outputs.append(self.predict_batch(batch))
            users.append(batch.user_id)
            for task, parts in labels.items():
                parts.append(batch.labels[task])
        return torch.cat(outputs), torch.cat(users), {t: torch.cat(v) for t, v in labels.items()}

    def predict_interactions(self, batch: Interactions, batch_size: int = 4096) -> torch.Tensor:
        """Probabilities (S, T) of an Interactions table with one candidate per row, in batches of ``batch_size``
        rows."""
        return torch.cat([self.predict_batch(part) for part in iterate_batches(batch, batch_size)])

    # -- raw ids ------------------------------------------------------------------------------------------------

    def predict(self, requests: Sequence[Mapping[str, Any]]) -> List[Dict[str, List[float]]]:
        """Per request, ``{task: [probability of each candidate]}`` (the module docstring has the request form).
        Raises ValueError naming the request and field for a malformed request."""
        if isinstance(requests, Mapping) or not isinstance(requests, Sequence) or not requests:
            raise ValueError("requests must be a non-empty list of request dicts")
        encoded = [self._encode(i, r) for i, r in enumerate(requests)]
        counts = [len(e[1]) for e in encoded]
        width = max(counts)
        user = torch.tensor([e[0] for e in encoded], dtype=torch.long).reshape(len(encoded),
                                                                             len(self.schema.user_fields))
        items = torch.zeros(len(encoded), width, len(self.schema.item_fields), dtype=torch.long)
        for b, e in enumerate(encoded):  # candidate lists padded with OOV to the longest; the padding is dropped
            items[b, :counts[b]] = torch.tensor(e[1], dtype=torch.long)
        lengths = torch.tensor([len(e[2]) for e in encoded], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        hist = torch.tensor([row for e in encoded for row in e[2]], dtype=torch.long).reshape(
            int(offsets[-1]), len(self.schema.history_fields))
        dense = torch.tensor([e[3] for e in encoded], dtype=torch.float32).reshape(
            len(encoded), _export.dense_width(self.schema, self.use_dense))
        probabilities = self.predict_rows(user, items, offsets, hist, dense)
        return [{t: probabilities[b, :counts[b], k].tolist() for k, t in enumerate(self.tasks)}
                for b in range(len(encoded))]

    def _rows(self, where: str, field: str, values: Sequence[Any]) -> List[int]:
        if field not in self._encoders:
            raise ValueError(f"{self.source} has no vocabulary of field {field!r}, so raw ids cannot be mapped to "
                             f"rows: re-export from a checkpoint that has them (trained with this din_ext version)")
        rows, strings = self._encoders[field]
        out = []
        for raw in values:
            if raw is None:
                out.append(OOV)
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, str)) and not hasattr(raw, "__index__"):
                raise ValueError(f"{where}: ids must be ints or strings, got {type(raw).__name__} {raw!r}")
            if strings:
                raw = str(raw)
            elif isinstance(raw, str):
                raise ValueError(f"{where}: field {field!r} has integer ids, got the string {raw!r}")
            else:
                raw = int(raw)
            out.append(rows.get(raw, OOV))
        return out

    def _encode(self, index: int, request: Mapping[str, Any]) -> Tuple[list, list, list, list]:
        """(user rows [U], candidate rows [C][I], history rows [L][H], dense [Dd]) of one request."""
        schema, name = self.schema, f"request {index}"
        if not isinstance(request, Mapping):
            raise ValueError(f"{name} must be a dict, got {type(request).__name__}")
        unknown = sorted(set(request) - {"user", "history", "candidates", "dense"})
        if unknown:
            raise ValueError(f"{name} has unknown keys {unknown} (user, history, candidates, dense)")

        def columns(key: str, fields: Sequence[str], length_of: Optional[str]) -> Tuple[List[List[int]], int]:
            part = request.get(key)
            if not isinstance(part, Mapping):
                raise ValueError(f"{name}: '{key}' must be a dict field -> ids, got {type(part).__name__}")
            missing = [f for f in fields if f not in part]
            extra = sorted(set(part) - set(fields))
            if missing or extra:
                raise ValueError(f"{name}: '{key}' must have the fields {list(fields)} (missing {missing}, "
                                 f"unknown {extra})")
            cols, length = [], None
            for field in fields:
                values, where = part[field], f"{name}: {key}[{field!r}]"
                if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                    raise ValueError(f"{where} must be a list of ids, got {type(values).__name__}")
                if length is not None and len(values) != length:
                    raise ValueError(f"{where} has {len(values)} ids, but {key}[{fields[0]!r}] has {length}")
                length = len(values)
                cols.append(self._rows(where, field, values))
            return cols, length or 0

        user = request.get("user")
        if not isinstance(user, Mapping):
            raise ValueError(f"{name}: 'user' must be a dict field -> raw value, got {type(user).__name__}")
        missing = [f for f in schema.user_fields if f not in user]
        if missing:
            raise ValueError(f"{name}: 'user' lacks the fields {missing}")
        users = [self._rows(f"{name}: user[{f!r}]", f, [user[f]])[0] for f in schema.user_fields]
        candidates, count = columns("candidates", tuple(schema.item_fields), None)
        if count < 1:
            raise ValueError(f"{name}: 'candidates' must hold at least one candidate")
        history, _ = columns("history", schema.history_fields, None)
        dense: list = []
        if self.use_dense:
            dense = request.get("dense")
            ok = isinstance(dense, Sequence) and not isinstance(dense, str) and len(dense) == schema.dense_dim
            if not ok or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in dense):
                raise ValueError(f"{name}: 'dense' must be a list of {schema.dense_dim} numbers, got {dense!r}")
        return users, [list(c) for c in zip(*candidates)], [list(h) for h in zip(*history)], list(dense)
