"""Glue shared by the ops' Triton registrations; imported only once the triton backend is used (it imports triton)."""

from __future__ import annotations

import torch
from torch.library import triton_op

from din_ext.kernels.common import interpreting


def define_op(name: str, fake, data_dependent: bool = False):
    """Decorator: ``fn`` as the torch.library op ``name`` over Triton launchers.

    torch.library.triton_op (Inductor and export see the kernels), or under TRITON_INTERPRET=1 an opaque custom op
    with the fake kernel ``fake``: torch cannot trace interpreted kernels, so compile/export/opcheck then treat the op
    as a black box (the GPU run covers tracing through the kernels). data_dependent: the output sizes depend on the
    values, which FakeTensor cannot run ``fn`` for, so the triton_op gets ``fake`` as well.
    """
    def decorate(fn):
        if interpreting():
            op = torch.library.custom_op(name, mutates_args=())(fn)
        else:
            op = triton_op(name, mutates_args=())(fn)
            if not data_dependent:
                return op
        op.register_fake(fake)
        return op
    return decorate
