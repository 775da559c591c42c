"""Build fpet_kernels and its optional C++/CUDA extension ``fpet_kernels._C``.

Environment switches:
  FPET_NO_EXTENSION=1   pure-Python install (the package falls back to the reference ops)
  FORCE_CUDA=1          compile csrc/cuda/*.cu even if no CUDA toolkit is detected
  FPET_NO_CUDA=1        never compile CUDA sources
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default DEFAULT_ARCHS when no GPU is visible: A100, A10/RTX 30xx,
                        L4/RTX 40xx, H100/H200, plus PTX for newer GPUs)
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja build)
  FPET_DEBUG=1          -O0 -g build
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"

# torch finds the CUDA toolkit from CUDA_HOME, else from `which nvcc`; where nvcc is a wrapper
# script outside the toolkit (/usr/local/bin/nvcc -> /usr/local/cuda) that guess has no headers.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    for _cand in [os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/nonexistent"))),
                  "/usr/local/cuda"]:
        if os.path.exists(os.path.join(_cand, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = _cand
            break


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FPET_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    debug = _flag("FPET_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-std=c++20", "-fopenmp"]
    # csrc/emu (the CUDA kernels compiled for the host) is test-only: tests/simt_ext.py builds it.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc")]

    # CUDA is built when the toolkit and a CUDA build of torch are both present (or FORCE_CUDA=1);
    # never gated on torch.cuda.is_available(): a GPU-less machine must still produce CUDA kernels.
    use_cuda = (
        not _flag("FPET_NO_CUDA")
        and bool(cuda_sources)
        and (_flag("FORCE_CUDA") or (ce.CUDA_HOME is not None and torch.version.cuda is not None))
    )
    define_macros = []
    extra = {"cxx": cxx_flags}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        # torch's CUDA wheels ship the CUDA headers (cusparse.h, ...) under nvidia/cu*/include.
        # A toolkit with its own headers (CUDA_HOME/include) needs none of them: the import may fail.
        try:
            import nvidia  # noqa: F401  (namespace package installed with pip's CUDA builds of torch)
        except ImportError:
            nvidia = None
        for base in list(getattr(nvidia, "__path__", [])):
            include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            include_dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
        extra["nvcc"] = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("FPET_WITH_CUDA", None))
        ext = ce.CUDAExtension(
            "fpet_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = ce.CppExtension(
            "fpet_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fpet_kernels",
    version="0.1.0",
    description="Fused token-merging kernels (ToMe, FPET, PYRA) for parameter-efficient ViT tuning",
    packages=find_packages(include=["fpet_kernels", "fpet_kernels.*"]),
    package_data={"fpet_kernels": ["tuning/*.json", "tuning/README.md"]},  # recorded results: _backend.py
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # timm: the model layer (fpet_kernels.patch) and the whole-model benchmark (bench/bench_model.py).
    # Install torch and torchvision first, pinned: timm needs torchvision, and an unpinned one pulls another torch.
    extras_require={
        "timm": ["timm>=1.0", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "numpy", "timm>=1.0", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
