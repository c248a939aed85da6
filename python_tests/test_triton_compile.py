"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels as Python and accepts code the compiler rejects (non-constexpr
globals, dtype mismatches in tl.dot, loop-carried type changes), so CI also compiles them, through Triton's own
toolchain, for a representative set of constexpr combinations: every layer path of the MLP, every dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from din_ext.kernels import attention as A, dice as Dk

    SCALARS = {"D", "DV", "N0", "N1", "N2", "N3", "NS", "batch", "users_per_program", "part_size", "b_bucket",
               "l_bucket", "N", "H", "NC"}

    def compile_kernel(kernel, dtype, constexprs, warps=4):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # DB is the backward's only
        acc = "fp64" if dtype == "fp64" else "fp32"
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in SCALARS:
                signature[name] = "i32"
            else:
                signature[name] = "*" + dtype
        accumulators = {"CONSTS", "CB", "KPT", "LSE", "PART", "COUNT", "MEAN", "M2", "C", "SUMS"}
        if fn.__name__ == "_dice_backward_kernel":
            accumulators.add("K")  # the statistics coefficients there (the keys elsewhere)
        for name in accumulators & set(signature):
            signature[name] = "*" + acc
        signature.update({k: v for k, v in {"STARTS": "*i64", "LENGTHS": "*i64", "MASK": "*i1"}.items()
                          if k in signature})
        triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": 2})
        print("compiled", fn.__name__, dtype, flush=True)

    def mlp(hidden, act, softmax, stop, block, dim=32, block_c=1, **extra):
        p = [A._pad(h) for h in hidden] + [16] * (A.MAX_HIDDEN - len(hidden))
        return dict(NUM_HIDDEN=len(hidden), ACT=act, SOFTMAX=softmax, STOP=stop, DP=A._pad(dim), DVP=A._pad(dim),
                    P0=p[0], P1=p[1], P2=p[2], P3=p[3], PS=p[max(stop, 0)], HMAXP=max(p), TF32=False,
                    BLOCK_L=block, MULTI=block_c > 1, BLOCK_C=block_c, DB=A._pad(dim),
                    WEFF_SCRATCH=A.weff_scratch(dim, block_c > 1, stop, extra.get("GRADS", A.GRADS_ALL)), **extra)

    compile_kernel(A._forward_kernel, "bf16", mlp((80, 40), A.DICE, True, -1, 32))
    compile_kernel(A._forward_kernel, "fp64", mlp((80, 40), A.DICE, False, 1, 16))
    compile_kernel(A._forward_kernel, "fp32", mlp((), A.SIGMOID, False, -1, 16))
    # the gradient pass as three kernels (the default: input gradients, layer 1's parameter gradients, the others)
    # and fused
    compile_kernel(A._backward_kernel, "fp32", mlp((33, 9, 5, 7), A.PRELU, True, -1, 16, HAS_V=True,
                                                   GRADS=A.GRADS_INPUTS))
    compile_kernel(A._backward_kernel, "bf16", mlp((80, 40), A.DICE, False, -1, 16, HAS_V=False,
                                                   GRADS=A.GRADS_HIDDEN))
    # layer 1's in column blocks (D = 128: two of 64)
    compile_kernel(A._backward_kernel, "bf16", dict(mlp((80, 40), A.DICE, False, -1, 16, dim=128, HAS_V=False,
                                                        GRADS=A.GRADS_LAYER1), DB=A.layer1_columns(128, False)))
    # multi-candidate queries [B, C, D]: pair tiles of BLOCK_C candidates x BLOCK_L // BLOCK_C behaviours
    compile_kernel(A._forward_kernel, "bf16", mlp((80, 40), A.DICE, True, -1, 32, block_c=4))
    compile_kernel(A._forward_kernel, "fp64", mlp((80, 40), A.DICE, False, 0, 16, block_c=2))
    compile_kernel(A._backward_kernel, "bf16", mlp((80, 40), A.DICE, True, -1, 16, block_c=4, HAS_V=False,
                                                   GRADS=A.GRADS_INPUTS))
    compile_kernel(A._backward_kernel, "fp32", mlp((33, 9, 5, 7), A.PRELU, False, -1, 16, block_c=4, HAS_V=True,
                                                   GRADS=A.GRADS_ALL))
    compile_kernel(A._backward_kernel, "bf16", mlp((80, 40), A.DICE, True, 0, 16, block_c=4, HAS_V=False,
                                                   GRADS=A.GRADS_ALL))  # a Dice sums pass
    dice = dict(HAS_MASK=True, BLOCK_N=Dk.BLOCK_N, SUB_N=Dk.SUB_N, BLOCK_H=64)
    compile_kernel(Dk._dice_moments_kernel, "bf16", dice)
    compile_kernel(Dk._dice_forward_kernel, "bf16", dice)
    compile_kernel(Dk._dice_backward_kernel, "fp64", dict(dice, WRITE_SUMS=True, WRITE_DX=True, CORRECT=True))
""")


def _nvidia_backend_present() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton with its NVIDIA backend is not installed")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("compiled") == 14, result.stdout
