"""The triton MBA embedding beyond the shared conformance tests (test_mba.py): opcheck of its op, and the backend
choice that sends a call to its kernels. CI: TRITON_INTERPRET=1 pytest python_tests -k triton."""

from __future__ import annotations

import os

import pytest
import torch

import din_ext
from din_ext import _backend
from test_mba import make_table, op_args


def test_opcheck_triton():
    if os.environ.get("TRITON_INTERPRET") != "1" or not _backend.has_triton("mba_embedding"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (CI: TRITON_INTERPRET=1 pytest python_tests -k triton)")
    op = torch.ops.din_ext.triton_mba_embedding.default
    args = op_args()
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backend_selection_triton(monkeypatch):
    """backend="triton" on CPU tensors needs TRITON_INTERPRET=1; with it, the op runs the triton kernels."""
    weight, frequencies = make_table(8, 2)
    ids = torch.tensor([1, 1, 5])
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            din_ext.ops.mba_embedding(weight, ids, frequencies, 0.1, backend="triton")
        return
    if not _backend.has_triton("mba_embedding"):
        pytest.skip("triton is not installed")
    from din_ext.kernels import mba as kernels

    calls = []
    for fn in ("reg_terms", "backward_rows"):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    with din_ext.use_backend("triton"):
        assert _backend.resolve("auto", torch.device("cpu"), "mba_embedding") == "triton"
        w = weight.clone().requires_grad_()
        out, _ = din_ext.ops.mba_embedding(w, ids, frequencies, 0.1)
        out.sum().backward()
    assert calls == ["reg_terms", "backward_rows"]
