"""One user's behaviours ranked by their attention weight for a candidate: the DIN paper's "illustration of local
activation" (Fig. 5), from a trained model.

    model = DIN.from_checkpoint("run/best.pt")
    result = explain_user(model, test, user=17)                 # the user's latest impression and its candidate
    result = explain_user(model, test, user=17, candidate=123)  # another candidate (raw id of the first item field)
    print(format_explanation(result))

The weights are the model's own: its local activation unit (any backend) pools one-hot values, so weight l is exactly
the coefficient of behaviour l in the user's interest vector for that candidate (``score_scale * score`` with
``normalization="none"``, the softmax weight with ``"softmax"``), in eval mode. Ids are raw ids where the schema has
vocabularies (``Schema.vocabularies``), table rows otherwise.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from din_ext.data.core import Interactions, Schema
from din_ext.model import DIN


def _raw(schema: Schema, field: str, row: int) -> Any:
    """The raw id of ``row`` of the table of ``field`` (the row itself without a vocabulary; row 0 is "OOV")."""
    vocabulary = schema.vocabularies.get(field)
    if row == 0:
        return "OOV"
    return vocabulary[row] if vocabulary else row


def _row_of(schema: Schema, field: str, raw: Any) -> int:
    """The table row of the raw id ``raw`` (text or value) of ``field``; raises ValueError if it has none."""
    vocabulary = schema.vocabularies.get(field)
    if vocabulary:
        for row, value in enumerate(vocabulary[1:], start=1):
            if value == raw or str(value) == str(raw):
                return row
        raise ValueError(f"{raw!r} is not in the vocabulary of {field!r} (an id unseen in training)")
    try:
        row = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{raw!r}: the schema has no vocabulary of {field!r}, so ids are table rows "
                         f"(integers)") from None
    if not 0 < row < schema.item_fields[field]:
        raise ValueError(f"{row} is not a row of the table of {field!r} (1..{schema.item_fields[field] - 1})")
    return row


def _user_row(data: Interactions, user: Any) -> int:
    """The index of the user's latest impression in ``data`` (by time where the data has it, else the last)."""
    try:
        key = int(user)
    except (TypeError, ValueError):
        raise ValueError(f"user {user}: user ids are integers in this data") from None
    rows = torch.nonzero(data.user_id == key).flatten()
    if rows.numel() == 0:
        raise ValueError(f"user {user} has no impression in the data")
    if data.time is not None:
        return int(rows[torch.argmax(data.time[rows])])
    return int(rows[-1])


def _candidate_fields(model: DIN, data: Interactions, first_row: int) -> Dict[str, int]:
    """Every item field of the candidate whose first item field is ``first_row``, from an impression or a behaviour
    of ``data`` that shows the item."""
    schema = model.schema
    first = next(iter(schema.item_fields))
    hits = torch.nonzero(data.item[first] == first_row).flatten()
    if hits.numel():
        return {f: int(data.item[f][hits[0]]) for f in schema.item_fields}
    if first in schema.history_fields and set(schema.item_fields) <= set(schema.history_fields):
        hits = torch.nonzero(data.hist[first] == first_row).flatten()
        if hits.numel():
            return {f: int(data.hist[f][hits[0]]) for f in schema.item_fields}
    raise ValueError(f"no impression in the data shows item {_raw(schema, first, first_row)!r}, so its other "
                     f"fields ({', '.join(list(schema.item_fields)[1:])}) are unknown")


@torch.no_grad()
def behaviour_weights(model: DIN, candidate: Dict[str, torch.Tensor], history: Dict[str, torch.Tensor]
                      ) -> torch.Tensor:
    """candidate: item field -> (C,) rows; history: history field -> (L,) rows of one user. Returns (C, L): the
    attention weight of each behaviour for each candidate (eval mode; the model's backend)."""
    if model.attention is None:
        raise ValueError("the model pools its history by sum (BaseModel): it has no attention weights")
    was_training = model.training
    model.eval()
    try:
        fields = model.schema.history_fields
        device = next(model.parameters()).device
        query = torch.cat([model.embeddings[f](candidate[f].to(device))[0] for f in fields], dim=-1)
        keys = torch.cat([model.embeddings[f](history[f].to(device))[0] for f in fields], dim=-1)
        length = keys.shape[0]
        offsets = torch.tensor([0, length], dtype=torch.long, device=device)
        one_hot = torch.eye(length, dtype=keys.dtype, device=device)  # pooled one-hot values: the weights themselves
        return model.attention(query[None], keys, offsets=offsets, values=one_hot)[0].cpu()
    finally:
        model.train(was_training)


def explain_user(model: DIN, data: Interactions, user: Any, candidate: Any = None) -> Dict[str, Any]:
    """The attention weights of ``user``'s behaviours (the history of the user's latest impression in ``data``)
    for ``candidate`` (raw id of the first item field; default: that impression's candidate), top first.

    Returns {"user", "candidate": field -> raw id, "rows": [{"rank", "position" (0 = oldest), "ids": field -> raw
    id, "weight"}...], "history_length"}. Raises ValueError naming what is not found.
    """
    schema = model.schema
    row = _user_row(data, user)
    start, end = int(data.hist_offsets[row]), int(data.hist_offsets[row + 1])
    history = {f: data.hist[f][start:end] for f in schema.history_fields}
    if candidate is None:
        rows = {f: int(data.item[f][row]) for f in schema.item_fields}
    else:
        rows = _candidate_fields(model, data, _row_of(schema, next(iter(schema.item_fields)), candidate))
    weights = behaviour_weights(model, {f: torch.tensor([r]) for f, r in rows.items()}, history)[0]
    order = torch.argsort(weights, descending=True, stable=True).tolist()
    ranked: List[Dict[str, Any]] = [
        {"rank": rank + 1, "position": p, "ids": {f: _raw(schema, f, int(history[f][p])) for f in history},
         "weight": float(weights[p])} for rank, p in enumerate(order)]
    return {"user": user, "candidate": {f: _raw(schema, f, r) for f, r in rows.items()}, "rows": ranked,
            "history_length": end - start, "normalization": model.attention.normalization}


def format_explanation(result: Dict[str, Any], top: Optional[int] = None) -> str:
    """The table of ``explain_user``'s result: rank, position, the behaviour's ids, weight (``top`` rows)."""
    candidate = ", ".join(f"{f} {v}" for f, v in result["candidate"].items())
    kind = "softmax" if result["normalization"] == "softmax" else "unnormalized, as in the paper"
    title = (f"user {result['user']}, candidate {candidate}: {result['history_length']} behaviours by attention "
             f"weight ({kind}), top first")
    rows = result["rows"][:top]
    if not rows:
        return title + "\n(the user has no behaviours: the interest vector is zero)"
    fields = list(rows[0]["ids"])
    table = [["rank", "position", *fields, "weight"]] + [
        [str(r["rank"]), str(r["position"]), *(str(r["ids"][f]) for f in fields), f"{r['weight']:+.4f}"]
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join([title] + ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table])


def plot_explanation(result: Dict[str, Any], path: str, top: int = 20) -> str:
    """Bars of the ``top`` heaviest behaviours; behaviours that share the candidate's second item field (e.g. its
    category) are highlighted. Needs matplotlib (din_ext[plots]). Returns ``path``."""
    from din_ext import plots

    rows = result["rows"][:top]
    fields = list(result["candidate"])
    labels = [" / ".join(f"{f} {r['ids'][f]}" for f in r["ids"]) + f"  (#{r['position']})" for r in rows]
    same = fields[1] if len(fields) > 1 and all(fields[1] in r["ids"] for r in rows) else None
    highlight = [r["ids"][same] == result["candidate"][same] for r in rows] if same else None
    candidate = ", ".join(f"{f} {v}" for f, v in result["candidate"].items())
    return plots.attention_bars(labels, [r["weight"] for r in rows], path, highlight=highlight,
                                highlight_label=f"same {same} as the candidate" if same else "",
                                ylabel="behaviour (#position in the history, 0 = oldest)",
                                title=f"user {result['user']}: top {len(rows)} of {result['history_length']} "
                                      f"behaviours\nfor candidate {candidate}")
