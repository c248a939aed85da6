"""Static resource report of every din_ext GPU kernel for sm_90 (H100/H200), made without a GPU.

    python bench/static_report.py --out bench/results/gpu_static.md
    python bench/static_report.py --only "D=128 H=80x40 dice, layer-1" --out /tmp/some.md   # a few Triton cases

- CUDA: each csrc/cuda/*.cu is compiled once by nvcc for sm_90 with `-Xptxas -v` (the build's flags: -O3
  -lineinfo --expt-relaxed-constexpr) against torch 2.14.1's CUDA 13.0 headers, the ones .ci/compile_cuda.sh unpacks
  (run that once first if they are missing). ptxas's log gives every template instantiation's registers, stack frame,
  spills and static shared memory; the block size comes from the kernel's __launch_bounds__ (else its launch site);
  the attention kernels' dynamic shared memory is the launch plan's (torch.ops.din_ext._attention_launch_plan, the
  same code as the kernels' launcher, with the 227 KB per-block limit of sm_90) for D = 32, 64, 128 and H = 80x40.
  The logs are cached in build/static_report/ by source hash: a second run compiles nothing that did not change.
- Triton: every top-level kernel of din_ext.kernels is compiled by Triton's own compiler with an explicit target
  (GPUTarget("cuda", 90, 32)) for the benchmark's workload (bf16, D = 32, 64, 128, H = 80x40, Dice), every autotuning
  config; the registers, spills and stack come from the log of the ptxas run inside triton.compile, the shared
  memory from the compiled kernel's metadata. A kernel with no case below is listed as not covered.

Occupancy is computed as CUDA's occupancy calculator does (cuda_occupancy.h) from the sm_90 limits: 65536 registers
per SM in 4 sub-partitions, allocated per warp in units of 256; 228 KB shared memory per SM, at most 227 KB per block,
1 KB reserved per block, allocated in units of 128 bytes; 2048 threads (64 warps) and 32 blocks per SM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# sm_90 limits (CUDA occupancy calculator, compute capability 9.0).
REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_UNIT = 256  # registers, allocated per warp
MAX_REGS_PER_THREAD = 255
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED = 1024  # per block, by the driver
SMEM_UNIT = 128
THREADS_PER_SM = 2048
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32

NOTES_MARKER = "<!-- findings: written by hand; bench/static_report.py keeps everything below this line -->"
DIMS = (32, 64, 128)  # the benchmark's key widths
HIDDEN = (80, 40)  # the benchmark's MLP


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass
class Occupancy:
    blocks: int  # resident blocks per SM
    limiter: str  # what limits them: regs, smem, threads, blocks
    warps: int

    @property
    def fraction(self) -> float:
        return self.warps / WARPS_PER_SM


def occupancy(threads: int, regs: int, smem: int) -> Occupancy:
    """Blocks per SM of a kernel with `threads` per block, `regs` per thread and `smem` bytes of shared memory per
    block (static + dynamic), as cudaOccupancyMaxActiveBlocksPerMultiprocessor computes them for sm_90."""
    warps = -(-threads // 32)
    limits = {"threads": min(THREADS_PER_SM // threads, WARPS_PER_SM // warps), "blocks": BLOCKS_PER_SM}
    per_warp = round_up(max(regs, 1) * 32, REG_UNIT)
    if regs > MAX_REGS_PER_THREAD or per_warp * round_up(warps, SUB_PARTITIONS) > REGS_PER_SM:
        limits["regs"] = 0
    else:
        limits["regs"] = (REGS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // warps
    allocated = round_up(smem + SMEM_RESERVED, SMEM_UNIT)
    limits["smem"] = 0 if smem > SMEM_PER_BLOCK else SMEM_PER_SM // allocated
    limiter = min(limits, key=lambda k: (limits[k], ["regs", "smem", "threads", "blocks"].index(k)))
    blocks = limits[limiter]
    return Occupancy(blocks, limiter, blocks * warps)


def occupancy_cell(threads: int, regs: int, smem: int) -> str:
    occ = occupancy(threads, regs, smem)
    return f"{occ.blocks} ({occ.limiter}), {occ.fraction:.0%}"


# ---------------------------------------------------------------------------------------------------------------
# ptxas logs

@dataclass
class PtxasEntry:
    name: str  # mangled
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory, bytes
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(log: str) -> List[PtxasEntry]:
    """The entries of a `ptxas -v` log, in order (one per compiled entry function)."""
    entries: Dict[str, PtxasEntry] = {}
    current: Optional[PtxasEntry] = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = entries.setdefault(m.group(1), PtxasEntry(m.group(1)))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.regs = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            current.barriers = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return list(entries.values())


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels

CUDA_FLAGS = ["-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas", "-v",
              "--generate-code", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1",
              "-DDIN_EXT_WITH_CUDA=1"]
# The attention kernels launched with the plan's dynamic shared memory: forward or backward layout.
DYNAMIC_SMEM = {("attention.cu", "stats_kernel"): False, ("attention.cu", "pool_kernel"): False,
                ("attention.cu", "scores_kernel"): False, ("attention.cu", "backward_kernel"): True}
SHORT_TYPES = {"c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32", "double": "fp64"}


def torch_headers() -> str:
    cache = os.environ.get("DIN_EXT_CI_CACHE", os.path.expanduser("~/.cache/din_ext_ci"))
    inc = os.path.join(cache, "torch-2.14.1")
    if not os.path.isfile(os.path.join(inc, "torch", "include", "torch", "library.h")):
        sys.exit(f"torch 2.14.1's headers are not in {inc}: run `bash .ci/compile_cuda.sh` once (it unpacks them)")
    return inc


def nvcc_command(src: str, obj: str) -> List[str]:
    nvcc = os.environ.get("NVCC") or "nvcc"
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0")
    inc = torch_headers()
    return [nvcc, *CUDA_FLAGS, "-c", src, "-o", obj, "-I", "csrc", "-I", f"{inc}/torch/include",
            "-I", f"{inc}/torch/include/torch/csrc/api/include", "-I", f"{inc}/nvidia/cu13/include",
            "-I", f"{cuda_home}/include"]


def source_hash(src: str) -> str:
    h = hashlib.sha256(" ".join(CUDA_FLAGS).encode())
    for path in [src] + sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    return h.hexdigest()[:16]


def compile_cuda(src: str, cache: str) -> str:
    """ptxas's log of one .cu (compiled once per source hash)."""
    os.makedirs(cache, exist_ok=True)
    log_path = os.path.join(cache, f"{os.path.basename(src)}.{source_hash(src)}.ptxas.log")
    if os.path.exists(log_path):
        print(f"cuda: {src}: cached {log_path}", flush=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = nvcc_command(src, os.path.join(tmp, "out.o"))
            print(f"cuda: {' '.join(cmd)}", flush=True)
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"nvcc failed on {src}:\n{result.stderr[-4000:]}")
        with open(log_path, "w") as f:
            f.write(result.stdout + result.stderr)
    with open(log_path) as f:
        return f.read()


def demangle(names: List[str]) -> List[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def short_name(demangled: str) -> Tuple[str, str]:
    """(base name, 'base<args>') of a demangled kernel, without namespaces, parameters or 'void'."""
    text = demangled.replace("(anonymous namespace)::", "")
    text = text[5:] if text.startswith("void ") else text
    depth, cut, first_angle = 0, len(text), None
    for i, ch in enumerate(text):  # the parameter list starts at the first '(' outside template arguments
        if ch == "<":
            first_angle = i if depth == 0 and first_angle is None else first_angle
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    text = text[:cut]
    head, args = (text, "") if first_angle is None or first_angle > cut else (text[:first_angle], text[first_angle:])
    base = head.split("::")[-1]
    for long, short in SHORT_TYPES.items():
        args = args.replace(long, short)
    args = re.sub(r"\(bool\)1|\btrue\b", "T", re.sub(r"\(bool\)0|\bfalse\b", "F", args))
    return base, base + args.replace(", ", ",")


def block_sizes(src: str) -> Dict[str, int]:
    """Threads per block of each kernel of a .cu: its __launch_bounds__, else its launch site (constexpr ints
    substituted)."""
    # The .cu and the headers of csrc/cuda/ it includes (device.cuh's kernels, attention_plan.h's constants).
    text = open(os.path.join(ROOT, src)).read()
    for header in re.findall(r'#include "cuda/([\w.]+)"', text):
        text = open(os.path.join(ROOT, "csrc", "cuda", header)).read() + "\n" + text
    consts = {}
    for name, value in re.findall(r"constexpr int(?:64_t)? (\w+) = (\d+);", text):
        consts[name] = int(value)

    def value(expr: str) -> Optional[int]:
        expr = expr.strip()
        for name, v in consts.items():
            expr = re.sub(rf"\b{name}\b", str(v), expr)
        return int(eval(expr, {"__builtins__": {}})) if re.fullmatch(r"[\d\s*+]+", expr) else None

    sizes = {}
    for bound, name in re.findall(r"__launch_bounds__\((\w+)(?:,\s*\w+)?\)\s+(\w+)\s*\(", text):
        sizes[name] = value(bound)
    for name, threads in re.findall(r"(\w+)(?:<[^<>]*>)?<<<[^,]+,\s*([^,]+),", text):
        sizes.setdefault(name, value(threads))
    return sizes


def attention_smem(backward: bool, elem_bytes: int) -> Dict[int, Tuple[int, int]]:
    """(dynamic shared memory in bytes, row tile) of the attention kernels per D, for H = HIDDEN and a compute type
    of elem_bytes (4: bf16/fp16/fp32 inputs, 8: fp64), from the launch plan the kernels' launcher runs."""
    import torch

    import din_ext  # noqa: F401  (loads din_ext._C and its ops)

    out = {}
    for dim in DIMS:
        plan = torch.ops.din_ext._attention_launch_plan(list(HIDDEN) + [1], dim, dim, elem_bytes, SMEM_PER_BLOCK,
                                                        torch.tensor([1], dtype=torch.long), 1000)
        summary, smem_f, smem_b = plan[0], plan[1], plan[2]
        tile = summary[1] if backward else summary[0]
        out[dim] = (smem_b if backward else smem_f)[-1] * elem_bytes, tile
    return out


def cuda_report(cache: str) -> Tuple[List[str], List[dict]]:
    lines, rows = [], []
    try:
        smem = {(b, e): attention_smem(b, e) for b in (False, True) for e in (4, 8)}
    except Exception as e:  # noqa: BLE001  (no built din_ext._C: dynamic shared memory unknown)
        print(f"cuda: no launch plan ({e}); dynamic shared memory left out", flush=True)
        smem = None
    for src in sorted(glob.glob("csrc/cuda/*.cu")):
        entries = parse_ptxas(compile_cuda(src, cache))
        sizes = block_sizes(src)
        fname = os.path.basename(src)
        for entry, full in zip(entries, demangle([e.name for e in entries])):
            base, name = short_name(full)
            threads = sizes.get(base)
            row = dict(file=fname, kernel=name, threads=threads, regs=entry.regs, stack=entry.stack,
                       spill_stores=entry.spill_stores, spill_loads=entry.spill_loads, smem=entry.smem, dyn={})
            dyn = DYNAMIC_SMEM.get((fname, base))
            if dyn is not None and smem is not None:
                elem_bytes = 8 if name.startswith(base + "<fp64") else 4
                row["dyn"] = {d: smem[dyn, elem_bytes][d] for d in DIMS}
            rows.append(row)
    rows.sort(key=lambda r: (r["file"], r["kernel"]))
    header = ("| file | kernel | threads | regs | stack B | spill st/ld B | static smem B | "
              + " | ".join(f"dyn smem (tile), D={d}" for d in DIMS) + " | "
              + " | ".join(f"blocks/SM (limit), occupancy, D={d}" for d in DIMS) + " |")
    lines += [header, "|" + " --- |" * (7 + 2 * len(DIMS))]
    for r in rows:
        threads = r["threads"] or 0
        if r["dyn"]:
            dyn_cells = [f"{r['dyn'][d][0]} ({r['dyn'][d][1]})" for d in DIMS]
            occ_cells = [occupancy_cell(threads, r["regs"], r["smem"] + r["dyn"][d][0]) if threads else "?"
                         for d in DIMS]
        else:
            dyn_cells = ["0"] * len(DIMS)
            occ_cells = [occupancy_cell(threads, r["regs"], r["smem"]) if threads else "?"] * len(DIMS)
        spill = f"{r['spill_stores']}/{r['spill_loads']}" + (" **SPILLS**" if r["spill_stores"] or r["spill_loads"]
                                                              else "")
        lines.append(f"| {r['file']} | `{r['kernel']}` | {threads or '?'} | {r['regs']} | {r['stack']} | {spill} | "
                     f"{r['smem']} | " + " | ".join(dyn_cells) + " | " + " | ".join(occ_cells) + " |")
    return lines, rows


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels

@dataclass
class Case:
    """One compilation of a Triton kernel: its input dtype, constexprs and pointer dtypes that differ from it."""
    kernel: str  # module.name
    label: str
    dtype: str
    constexprs: dict
    pointers: Dict[str, str] = field(default_factory=dict)
    scalars: Dict[str, str] = field(default_factory=dict)
    all_configs: bool = True  # compile every autotuning config (else the first, DIN_EXT_TRITON_AUTOTUNE=0's)
    warps: int = 4  # num_warps of a kernel that is not autotuned (its launcher's)


ATTENTION_SCALARS = {"D", "DV", "N0", "N1", "N2", "N3", "NS", "NC", "N", "H"}  # upper-case names that are not pointers
# pointers in the accumulation dtype
ATTENTION_ACC = {"CONSTS", "CB", "KPT", "LSE", "PART", "GQ", "DC", "COUNT", "MEAN", "M2", "C", "SUMS"}
INDEX = {"STARTS": "*i64", "LENGTHS": "*i64", "MASK": "*i1"}


def signature(fn, case: Case, constexprs: dict) -> dict:
    acc = "fp64" if case.dtype == "fp64" else "fp32"
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in case.pointers:
            sig[name] = case.pointers[name]
        elif name in case.scalars:
            sig[name] = case.scalars[name]
        elif name in INDEX:
            sig[name] = INDEX[name]
        elif name in ATTENTION_ACC:
            sig[name] = "*" + acc
        elif name in ATTENTION_SCALARS or not (name.isupper() or name.endswith("_ptr")):
            sig[name] = "i32"
        else:
            sig[name] = "*" + case.dtype
    return sig


def triton_cases() -> List[Case]:
    from din_ext.kernels import attention as A, dice as Dk

    def mlp(dim, stop=-1, hidden=HIDDEN, softmax=False, block_c=0):
        """block_c = 0: a [B, D] query; else a multi-candidate one, block_c candidates per tile (the launcher's
        choice for C >= A.MAX_BLOCK_C is A.MAX_BLOCK_C)."""
        p = [A._pad(h) for h in hidden] + [16] * (A.MAX_HIDDEN - len(hidden))
        return dict(NUM_HIDDEN=len(hidden), ACT=A.DICE, SOFTMAX=softmax, STOP=stop, DP=A._pad(dim), DVP=A._pad(dim),
                    P0=p[0], P1=p[1], P2=p[2], P3=p[3], PS=p[max(stop, 0)] if stop >= 0 else 16, HMAXP=max(p),
                    TF32=False, HAS_V=False, MULTI=block_c > 0, BLOCK_C=max(block_c, 1), DB=A._pad(dim),
                    WEFF_SCRATCH=False)

    def scratch(extra, dim, multi=False):
        """WEFF_SCRATCH as the launcher sets it for a gradient pass (extra: its GRADS)."""
        return dict(WEFF_SCRATCH=A.weff_scratch(dim, multi, -1, extra["GRADS"])) if "GRADS" in extra else {}

    h = "x".join(map(str, HIDDEN))
    cases = []
    # The backward's gradient pass runs as three kernels by default (A.SPLIT_PASSES): input gradients, layer 1's
    # parameter gradients, the other parameter gradients; the fused one (DIN_EXT_TRITON_SPLIT_BACKWARD=0) is listed
    # at its default config.
    backward_passes = (("input-gradient pass", dict(GRADS=A.GRADS_INPUTS), True),
                       ("layer-1 parameter-gradient pass", dict(GRADS=A.GRADS_LAYER1), True),
                       ("hidden parameter-gradient pass", dict(GRADS=A.GRADS_HIDDEN), True),
                       ("fused gradient pass", dict(GRADS=A.GRADS_ALL), False))
    for kernel, passes in (("attention._forward_kernel", (("pooling pass", {}, True),)),
                           ("attention._backward_kernel", backward_passes)):
        for what, extra, every in passes:
            for dim in DIMS:  # (the layer-1 pass with the launcher's column blocks of dKc, dPc)
                columns = dict(DB=A.layer1_columns(dim, False)) if extra.get("GRADS") == A.GRADS_LAYER1 else {}
                cases.append(Case(kernel, f"bf16 D={dim} H={h} dice, {what}", "bf16",
                                  dict(mlp(dim), **extra, **columns, **scratch(extra, dim)), all_configs=every))
            if not every:
                continue
            fp32_kernel = kernel
            if "GRADS" in extra:  # the launcher's choice for float32 without TF32
                fp32_kernel = "attention." + A.backward_kernel_name(True, -1, extra["GRADS"])
            cases.append(Case(fp32_kernel, f"fp32 D=64 H={h} dice, {what}", "fp32",
                              dict(mlp(64), **extra, **scratch(extra, 64)), all_configs=False))
            # torch.backends.cuda.matmul.allow_tf32 = True: the products on tf32 tensor cores
            cases.append(Case(kernel, f"fp32 TF32 D=64 H={h} dice, {what}", "fp32",
                              dict(mlp(64), **extra, **scratch(extra, 64), TF32=True), all_configs=False))
            cases.append(Case(kernel, f"bf16 D=64 H={h} dice softmax, {what}", "bf16",
                              dict(mlp(64, softmax=True), **extra, **scratch(extra, 64)), all_configs=False))
            cases.append(Case(kernel, f"bf16 D=48 H={h} dice, C>={A.MAX_BLOCK_C} candidates, {what}", "bf16",
                              dict(mlp(48, block_c=A.MAX_BLOCK_C), **extra)))
        what = "statistics pass" if kernel.endswith("_forward_kernel") else "sums pass"
        cases.append(Case(kernel, f"bf16 D=64 H={h} dice training, layer-0 {what}", "bf16",
                          dict(mlp(64, stop=0), GRADS=A.GRADS_ALL), all_configs=False))
    dice = dict(HAS_MASK=True, BLOCK_N=Dk.BLOCK_N, SUB_N=Dk.SUB_N, BLOCK_H=Dk._block_h(200))
    cases += [Case("dice._dice_moments_kernel", "bf16 H=200, masked", "bf16", dice, warps=Dk.MOMENTS_WARPS),
              Case("dice._dice_forward_kernel", "bf16 H=200, masked", "bf16", dice),
              Case("dice._dice_backward_kernel", "bf16 H=200, masked, training", "bf16",
                   dict(dice, WRITE_SUMS=True, WRITE_DX=True, CORRECT=True))]
    import triton.language as tl
    mba_ptrs = {"freq_ptr": "*fp32", "unique_ptr": "*i64", "offsets_ptr": "*i64", "order_ptr": "*i64",
                "terms_ptr": "*fp32"}
    cases += [Case("mba.mba_reg_terms_kernel", "bf16 D=64", "bf16", dict(ACC=tl.float32, BLOCK_U=32, BLOCK_D=64),
                   pointers=mba_ptrs),
              Case("mba.mba_backward_kernel", "bf16 D=64", "bf16", dict(ACC=tl.float32, BLOCK_D=64),
                   pointers=mba_ptrs, scalars={"reg_lambda": "fp32"})]
    return cases


def top_level_kernels() -> List[str]:
    """module.name of every kernel defined at the top level of din_ext.kernels' modules (named *_kernel)."""
    import importlib

    import triton

    names = []
    for module in ("attention", "dice", "mba"):
        mod = importlib.import_module(f"din_ext.kernels.{module}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                names.append(f"{module}.{name}")
    return sorted(names)


def compile_triton(fn, case: Case, constexprs: dict, warps: int, stages: int, maxnreg: Optional[int] = None) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        compiled = triton.compile(ASTSource(fn, signature(fn, case, constexprs), constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg})
    entries = parse_ptxas(captured.getvalue())
    if not entries:  # no log (an older Triton, or a cached kernel): ptxas -v on the kernel's own PTX
        from triton.backends.nvidia.compiler import get_ptxas
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            open(ptx, "w").write(compiled.asm["ptx"])
            log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90", ptx, "-o", ptx + ".o"],
                                 capture_output=True, text=True).stderr
        entries = parse_ptxas(log)
    (e,) = entries
    return dict(regs=e.regs, stack=e.stack, spill_stores=e.spill_stores, spill_loads=e.spill_loads,
                smem=int(compiled.metadata.shared), threads=32 * warps)


def triton_report(only: Optional[str] = None) -> Tuple[List[str], List[dict], List[str]]:
    """The Triton table; ``only``: compile just the cases whose "kernel label" contains it (case-insensitive)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("DIN_EXT_TRITON_AUTOTUNE", None)  # every config of the autotuned kernels
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="din_ext_static_")  # ptxas runs, and logs, every time
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the Triton versions before 3.10
    import importlib

    import triton

    rows = []
    cases = triton_cases()
    for case in cases:
        if only and only.lower() not in f"{case.kernel} {case.label}".lower():
            continue
        module, name = case.kernel.split(".")
        obj = getattr(importlib.import_module(f"din_ext.kernels.{module}"), name, None)
        if obj is None:
            rows.append(dict(kernel=name, label=case.label, config="-", error="no such kernel"))
            continue
        if isinstance(obj, triton.runtime.Autotuner):
            fn, configs = obj.fn, obj.configs if case.all_configs else obj.configs[:1]
        else:
            fn, configs = obj, [None]
        for i, cfg in enumerate(configs):
            constexprs = dict(case.constexprs)
            warps, stages, maxnreg = case.warps, 2, None
            if cfg is not None:
                constexprs.update(cfg.kwargs)
                warps, stages, maxnreg = cfg.num_warps, cfg.num_stages, cfg.maxnreg
            constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
            config = ", ".join([f"{k}={v}" for k, v in (cfg.kwargs.items() if cfg else [])] + [f"warps={warps}"]
                               + ([f"maxnreg={maxnreg}"] if maxnreg else [])
                               + ([f"stages={stages}"] if stages != 2 else []))
            if cfg is not None and i == 0:
                config += " (default)"
            row = dict(kernel=name, label=case.label, config=config)
            try:
                row.update(compile_triton(fn, case, constexprs, warps, stages, maxnreg))
            except Exception as e:  # noqa: BLE001  (a kernel whose arguments changed: reported, not fatal)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"triton: {name} {case.label} [{config}]: "
                  + (row["error"] if "error" in row else f"{row['regs']} regs, {row['spill_stores']} B spilled"),
                  flush=True)
            rows.append(row)
    covered = {c.kernel for c in cases}
    uncovered = [k for k in top_level_kernels() if k not in covered]
    lines = ["| kernel | case | config | threads | regs | stack B | spill st/ld B | smem B | blocks/SM (limit), "
             "occupancy |", "|" + " --- |" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['kernel']}` | {r['label']} | {r['config']} | | | | compile failed: {r['error']} | | |")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}" + (" **SPILLS**" if r["spill_stores"] or r["spill_loads"]
                                                              else "")
        lines.append(f"| `{r['kernel']}` | {r['label']} | {r['config']} | {r['threads']} | {r['regs']} | "
                     f"{r['stack']} | {spill} | {r['smem']} | {occupancy_cell(r['threads'], r['regs'], r['smem'])} |")
    return lines, rows, uncovered


# ---------------------------------------------------------------------------------------------------------------

def versions() -> str:
    import torch
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    try:
        nvcc = subprocess.run([os.environ.get("NVCC") or "nvcc", "--version"], capture_output=True, text=True)
        parts.append("nvcc " + re.search(r"release ([\d.]+)", nvcc.stdout).group(1))
    except (OSError, AttributeError):
        pass
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results", "gpu_static.md"))
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--only", help="Triton cases whose 'module.kernel label' contains this (case-insensitive); "
                        "for iterating on a few kernels (implies --skip-cuda; --out gets only those rows)")
    parser.add_argument("--cache", default=os.path.join("build", "static_report"), help="ptxas logs of the .cu files")
    args = parser.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from common import git_commit

    command = "python bench/static_report.py " + " ".join(sys.argv[1:])
    if os.environ.get("PYTHONPATH"):  # e.g. the device image's Triton, installed with pip --target
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    out = ["# Static resource report for sm_90 (no GPU)", "",
           f"- command: `{command.strip()}`",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; commit {git_commit()}; "
           f"{versions()}",
           "- occupancy: resident blocks per SM (the limiting resource: regs, smem, threads or blocks) and active "
           "warps out of 64, by CUDA's occupancy calculator for sm_90 (65536 regs/SM in 4 sub-partitions, allocated "
           "per warp in units of 256; 228 KB smem/SM, 227 KB per block + 1 KB reserved, units of 128 B; 2048 "
           "threads and 32 blocks/SM). It is an upper bound: the L1/shared carveout the driver picks can be smaller.",
           ""]
    data = {}
    if not args.skip_cuda and not args.only:
        lines, data["cuda"] = cuda_report(args.cache)
        out += ["## CUDA kernels (`nvcc -Xptxas -v`, sm_90)", "",
                f"nvcc flags: `{' '.join(CUDA_FLAGS)}` against torch 2.14.1's headers (those of .ci/compile_cuda.sh). "
                f"Dynamic shared memory: the launch plan for H={'x'.join(map(str, HIDDEN))} (fp32 compute for "
                "bf16, fp16 and fp32 inputs, fp64 for fp64), the largest row tile that fits 227 KB (the tile in "
                "parentheses). Block sizes: the kernels' __launch_bounds__ (else their launch site); `?`: neither "
                "names a constant.", ""] + lines + [""]
    if not args.skip_triton:
        lines, data["triton"], uncovered = triton_report(args.only)
        out += ["## Triton kernels (`triton.compile(..., target=GPUTarget('cuda', 90, 32))`)", "",
                "Every autotuning config of the benchmark's workload; `(default)` is the one a run with "
                "DIN_EXT_TRITON_AUTOTUNE=0 uses (the GPU suite's). Registers, stack and spills: the log of the ptxas "
                "run inside triton.compile; shared memory: the compiled kernel's metadata.", ""] + lines + [""]
        if uncovered:
            out += ["Not covered (no case in bench/static_report.py's triton_cases): "
                    + ", ".join(f"`{k}`" for k in uncovered), ""]
    spilling = [f"`{r['kernel']}` ({r.get('label', r.get('file'))}"
                + (f", {r['config']}" if "config" in r else "") + ")"
                for part in data.values() for r in part if r.get("spill_stores") or r.get("spill_loads")]
    out += ["## Kernels that spill", "", ("- " + "\n- ".join(spilling)) if spilling else "none", ""]
    # The findings written by hand below NOTES_MARKER in the previous report are kept.
    if os.path.exists(args.out):
        previous = open(args.out).read()
        if NOTES_MARKER in previous:
            out += [NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1].rstrip(), ""]
    text = "\n".join(out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
