"""DIN as an ONNX file of standard-domain ops only, which stock onnxruntime runs without din_ext installed.

The din_ext custom ops have no ONNX form, so the export runs on a translated copy of the eval model
(``translate``): the attention pooling becomes ``SegmentPooling``, a segment form in plain torch ops (the owner of
every behaviour by a scatter and a cumulative sum, the candidate of each (candidate, behaviour) pair gathered by
owner, the scores summed back per user by index_add, softmax through a per-user max), and every Dice becomes
``dice_eval`` (the running statistics). The result equals ``din_ext.reference`` (tested); it exports with
``torch.onnx.export(dynamo=True)`` to opset ``OPSET`` with a dynamic batch, candidates and history total. The graph
takes ``din_ext.export.ServingDIN``'s five inputs and gives its probabilities; the serving metadata (schema,
vocabularies, data options) is JSON in the model's ``metadata_props`` under ``METADATA_KEY``.

onnx, onnxscript and onnxruntime are the optional extra ``din_ext[onnx]``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from din_ext import _validate
from din_ext import export as _export
from din_ext.model import DIN
from din_ext.modules import Dice, LocalActivationUnit

OPSET = 18
METADATA_KEY = "din_ext"  # metadata_props key of the serving metadata (export.serving_metadata, as JSON)
INPUT_NAMES = ("user", "items", "hist_offsets", "hist", "dense")
OUTPUT_NAME = "probabilities"
STANDARD_DOMAINS = ("", "ai.onnx")  # the default ONNX domain, by either of its names
EXTRA = "onnx, onnxscript and onnxruntime (pip install 'din_ext[onnx]')"


def require(module: str):
    """Imports ``module`` of the onnx extra, or raises ImportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"ONNX export and serving need {EXTRA}: {exc}") from None


def behaviour_owners(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(N,) int64: the user (row of ``offsets``, (B+1,)) of each of ``total`` jagged rows; rows at or past
    offsets[-1] get B - 1 (the caller masks them). A scatter of the user starts and a cumulative sum: no
    data-dependent size, no searchsorted (which ONNX lacks)."""
    starts = torch.zeros(total + 1, dtype=torch.long, device=offsets.device)
    inner = offsets[1:-1]  # the start of users 1..B-1; equal starts (empty users) count once each
    starts = starts.index_add(0, inner, torch.ones_like(inner))
    return starts.cumsum(0)[:total]


def segment_pooling(unit: Optional[LocalActivationUnit], query: torch.Tensor, keys: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    """The attention pooling of ``unit`` (None: the sum, DIN's BaseModel) in segment form, eval mode.

    query: (B, Dq) or (B, C, Dq); keys: (N, Dq) jagged with offsets (B+1,) (rows past offsets[-1] are ignored).
    Returns (B, Dq) or (B, C, Dq), equal to ``din_ext.reference.local_activation_attention``: each (candidate,
    behaviour) pair is one row of the unit, computed once (no padding), a user without behaviours gets zeros.
    """
    single = query.dim() == 2
    q = query[:, None] if single else query  # (B, C, D)
    rows, count, total = q.shape[0], q.shape[1], keys.shape[0]
    owner = behaviour_owners(offsets, total)
    valid = (torch.arange(total, device=keys.device) < offsets[-1])[:, None]  # (N, 1)
    if unit is None:
        weights = valid.to(keys.dtype).expand(total, count)
    else:
        weights = _scores(unit, q, owner, keys)  # (N, C)
        if unit.normalization == "softmax":
            weights = _segment_softmax(weights, owner, valid, rows)
        weights = weights.masked_fill(~valid, 0.0)
    pooled = q.new_zeros(rows, count, keys.shape[1]).index_add(0, owner, weights[..., None] * keys[:, None, :])
    return pooled[:, 0] if single else pooled


def _scores(unit: LocalActivationUnit, query: torch.Tensor, owner: torch.Tensor, keys: torch.Tensor
            ) -> torch.Tensor:
    """score_scale * MLP([q, k, q - k, q * k]) of every (candidate, behaviour) pair: query (B, C, D), owner (N,),
    keys (N, D) -> (N, C). The first layer is split by its four column blocks, W [q, k, q-k, q*k] =
    (Wq + Wd) q + (Wk - Wd) k + Wp (q * k): the q and k terms once per candidate and per behaviour, only the
    product term per pair (a quarter of the pair work, no (N, C, 4D) concatenation)."""
    layers, dim = [*unit.linears, unit.out], query.shape[-1]
    wq, wk, wd, wp = layers[0].weight.split(dim, dim=1)
    per_query = nn.functional.linear(query, wq + wd, layers[0].bias)  # (B, C, H1)
    per_key = nn.functional.linear(keys, wk - wd)  # (N, H1)
    h = per_query[owner] + per_key[:, None] + nn.functional.linear(query[owner] * keys[:, None], wp)
    pairs = h.shape[:2]
    h = h.reshape(-1, h.shape[-1])  # 2-D, so that each layer is one Gemm with its bias
    for index, linear in enumerate(layers):
        if index:
            h = linear(h)
        if index < len(unit.linears):
            h = _activation(unit, index, h)
    return (h * unit.score_scale).view(pairs)


def _activation(unit: LocalActivationUnit, index: int, z: torch.Tensor) -> torch.Tensor:
    """The eval activation of hidden layer ``index`` of ``unit`` on z (..., H)."""
    if unit.activation == "dice":
        return dice_eval(unit.activations[index], z)
    if unit.activation == "prelu":
        return torch.where(z > 0, z, unit.activations[index].weight * z)
    return torch.sigmoid(z) if unit.activation == "sigmoid" else torch.relu(z)


def dice_eval(dice: Dice, x: torch.Tensor) -> torch.Tensor:
    """Dice in eval mode (running statistics) on x (..., H), as one affine map, a sigmoid and a blend:
    ``p = sigmoid(x * scale + shift)``, ``y = x * (alpha + (1 - alpha) * p)``, which is the reference's
    ``p * x + (1 - p) * alpha * x`` with ``p = sigmoid(gamma * (x - mean) / sqrt(var + eps) + beta)``; scale and
    shift depend on the parameters only (onnxruntime folds them into constants)."""
    scale = torch.rsqrt(dice.running_var + dice.eps)
    if dice.weight is not None:
        scale = dice.weight * scale
    shift = -dice.running_mean * scale
    if dice.bias is not None:
        shift = shift + dice.bias
    return x * (dice.alpha + (1 - dice.alpha) * torch.sigmoid(x * scale + shift))


class EvalDice(nn.Module):
    """A Dice module in eval mode through ``dice_eval`` (plain torch ops): forward(x (N, H)) -> (N, H)."""

    def __init__(self, dice: Dice):
        super().__init__()
        self.dice = dice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dice_eval(self.dice, x)


def _segment_softmax(scores: torch.Tensor, owner: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """Softmax of scores (N, C) over each user's valid rows (owner (N,)), per candidate."""
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    index = owner[:, None].expand(scores.shape)
    peak = scores.new_full((rows, scores.shape[1]), float("-inf")).scatter_reduce(0, index, scores, "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a user with no valid rows
    e = torch.exp(scores - peak[owner])
    denominator = scores.new_zeros(rows, scores.shape[1]).index_add(0, owner, e)
    return e / denominator[owner].clamp_min(torch.finfo(scores.dtype).tiny)


class SegmentPooling(nn.Module):
    """DIN's pooling in segment form (``segment_pooling``), with LocalActivationUnit's call signature (jagged
    keys only), so that a translated DIN calls it where it calls its attention."""

    def __init__(self, unit: Optional[LocalActivationUnit]):
        super().__init__()
        self.unit = unit

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                offsets: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                max_len: Optional[int] = None, *, checked: bool = False) -> torch.Tensor:
        if offsets is None or lengths is not None or values is not None:
            raise ValueError("SegmentPooling takes jagged keys with offsets, without lengths or values")
        return segment_pooling(self.unit, query, keys, offsets)


def translate(model: DIN) -> DIN:
    """A copy of ``model`` in eval mode on the CPU whose forward uses plain torch ops only: SegmentPooling for the
    pooling (attention or sum) and EvalDice for the tower's Dice."""
    twin = copy.deepcopy(model).cpu().eval()
    twin.attention = SegmentPooling(twin.attention)  # DIN.pool calls a non-None attention
    twin.tower_activations = nn.ModuleList(EvalDice(a) if isinstance(a, Dice) else a for a in twin.tower_activations)
    return twin


def export_program(model: DIN):
    """``torch.onnx.export(dynamo=True)`` of the translated eval model (ServingDIN's inputs): an ONNXProgram."""
    require("onnxscript")
    serving = _export.ServingDIN(translate(model)).eval()
    with torch.no_grad():
        return torch.onnx.export(serving, _export.example_inputs(model.schema, model.use_dense),
                                 dynamic_shapes=_export.dynamic_shapes(), input_names=list(INPUT_NAMES),
                                 output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=True, verbose=False,
                                 optimize=True)


def export_onnx(model: DIN, path: str, data: Optional[Dict[str, Any]] = None) -> str:
    """Writes the ONNX file ``path`` (ends in .onnx) of the eval model with the serving metadata inside."""
    onnx = require("onnx")
    if not os.fspath(path).endswith(".onnx"):
        raise ValueError(f"an ONNX path must end in .onnx, got {path!r}")
    proto = export_program(model).model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(_export.serving_metadata(model, data))
    onnx.save(proto, os.fspath(path))
    return os.fspath(path)


def foreign_ops(proto) -> Dict[str, int]:
    """{domain::op: count} of the nodes of an ONNX model (its functions included) outside the standard domain."""
    found: Dict[str, int] = {}
    graphs = [proto.graph] + [f for f in proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                name = f"{node.domain}::{node.op_type}"
                found[name] = found.get(name, 0) + 1
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return found


def load_onnx(path: str, threads: Optional[int] = None) -> Tuple[Callable[..., torch.Tensor], Dict[str, Any]]:
    """(a runner of the five serving tensors -> probabilities (B, C, T), the serving metadata) of an ONNX file
    written by export_onnx, on onnxruntime's default CPU provider with ``threads`` intra-op threads (None: its
    default). The runner is safe to call from several threads (onnxruntime sessions are)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (NoSuchFile, ...) subclass Exception only
        raise ValueError(f"{path}: onnxruntime cannot load it: {_validate.first_line(exc)}") from None
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ValueError(f"{path}: not a din_ext ONNX file (no {METADATA_KEY!r} metadata; write it with din-ext "
                         f"export --format onnx)")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format") != _export.PACKAGE_FORMAT:
        raise ValueError(f"{path}: metadata format {meta.get('format')!r}, this din_ext reads "
                         f"{_export.PACKAGE_FORMAT}")

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: x.contiguous().numpy() for name, x in zip(INPUT_NAMES, inputs)}
        return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])

    return run, meta
