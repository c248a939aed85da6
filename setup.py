"""Build din_ext: the Python package, the Triton kernels (as din_ext.kernels) and the C++/CUDA extension din_ext._C.

Environment:
  DIN_EXT_SKIP_CPP=1      Python-only install (reference and Triton backends only).
  FORCE_CUDA=1            build the CUDA sources even if torch's CUDA build or nvcc is not detected.
  DIN_EXT_SKIP_CUDA=1     never build the CUDA sources.
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension / ninja).
  DIN_EXT_DEBUG=1         -O0 -g build.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("DIN_EXT_SKIP_CPP"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DIN_EXT_DEBUG")
    # The CPU sources are always built; the CUDA ones only when torch is a CUDA build and nvcc exists, or when
    # forced. A visible GPU is never required: wheels are built on machines without one.
    with_cuda = not _flag("DIN_EXT_SKIP_CUDA") and (
        _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17, or C++20 from torch 2.14).
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: floating-point selects (clamps, ReLU) may be if-converted, so the activation loops
    # vectorize; it changes no result, only the assumption that FP exceptions trap (they never do in torch).
    # -fopenmp: at::parallel_for is inline code that parallelizes with OpenMP only when the caller is compiled with it.
    cxx += ["-fvisibility=hidden", "-fno-trapping-math", "-fopenmp"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["--expt-relaxed-constexpr"]
        define_macros.append(("DIN_EXT_WITH_CUDA", "1"))
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    ext = ext_cls(
        name="din_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="din_ext",
    version="0.1.0",
    description="Fast, exact Deep Interest Network (DIN) attention, Dice and MBA regularization for PyTorch",
    packages=find_packages(include=["din_ext", "din_ext.*"]) + ["din_ext.kernels"],
    package_dir={"din_ext.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "numpy"], "triton": ["triton"], "data": ["polars>=2.1"],
                    "onnx": ["onnx", "onnxscript", "onnxruntime"],  # din-ext export --format onnx, serving .onnx
                    "bench": ["pytest-benchmark", "deepctr-torch"], "lightning": ["lightning>=2.0"],
                    # din_ext.compat: deepctr-torch 0.3.0 imports requests without requiring it; recbole 1.2.1's
                    # ray needs numpy < 2 and pkg_resources, its data code pandas < 3
                    "deepctr": ["deepctr-torch", "requests"],
                    "recbole": ["recbole>=1.2,<1.3", "numpy<2", "pandas<3", "setuptools<81"],
                    # din-ext train --config FILE.yaml (.json needs nothing), din-ext tune, the pictures
                    "config": ["pyyaml>=5.1"], "tune": ["optuna>=3.0"], "plots": ["matplotlib>=3.5"],
                    # din_ext.sharding: torchrec 1.9.2 loads with torch 2.14 only; it requires fbgemm-gpu (CUDA),
                    # which a CPU-only machine replaces with fbgemm-gpu-cpu==1.9.0 (README, TorchRec section)
                    "torchrec": ["torch>=2.14,<2.15", "torchrec==1.9.2"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    entry_points={"console_scripts": ["din-ext=din_ext.__main__:main"]},
    zip_safe=False,
)
