"""Build fpet_kernels and its optional C++/CUDA extension ``fpet_kernels._C``.

Environment switches:
  FPET_NO_EXTENSION=1   pure-Python install (the package falls back to the reference ops)
  FORCE_CUDA=1          compile csrc/cuda/*.cu even if no CUDA toolkit is detected
  FPET_NO_CUDA=1        never compile CUDA sources
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default DEFAULT_ARCHS when no GPU is visible: A100, A10/RTX 30xx,
                        L4/RTX 40xx, H100/H200, plus PTX for newer GPUs)
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja build)
  FPET_DEBUG=1          -O0 -g build
  FPET_REQUIRE_EXTENSION=1  a failed extension build is an error (CI); otherwise the install
                        finishes as pure Python and says so

The metadata (name, version, dependencies, extras) is in pyproject.toml; the version string is in
fpet_kernels/_version.py. Build without build isolation, so that the extension is compiled against
the torch that is installed: ``pip install --no-build-isolation -e .``. A build of the extension
records that torch in fpet_kernels/_build_info.py (``fpet_kernels._version.check_extension_torch``).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

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


WARNING_BAR = "=" * 78


def _warn_pure_python(why: str) -> None:
    print(f"\n{WARNING_BAR}\nWARNING: fpet_kernels is installed WITHOUT its C++ extension (fpet_kernels._C):\n"
          f"  {why}\n"
          "The package works as pure Python (the reference ops: correct, slower). To build the kernels,\n"
          "install a C++ compiler (and ninja) and reinstall with: pip install --no-build-isolation -e .\n"
          f"(FPET_REQUIRE_EXTENSION=1 turns this warning into an error.)\n{WARNING_BAR}\n", file=sys.stderr)


def _tolerant(build_ext_cls):
    """``build_ext`` that records the torch it builds against in fpet_kernels/_build_info.py, and that
    turns a failed build into a warning and a pure-Python install (unless FPET_REQUIRE_EXTENSION=1)."""

    class BuildExt(build_ext_cls):
        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # compiler missing, compile error, ninja failure
                if _flag("FPET_REQUIRE_EXTENSION"):
                    raise
                self.extensions = []
                self.distribution.ext_modules = []
                _warn_pure_python(f"building the extension failed: {type(exc).__name__}: {exc}")
                return
            for ext in self.extensions:
                if ext.name == "fpet_kernels._C":
                    self._write_build_info(ext)

        def _write_build_info(self, ext):
            import torch

            info = {"fpet_kernels": VERSION, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "with_cuda": any(s.endswith(".cu") for s in ext.sources)}
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write('"""Written by setup.py when it built fpet_kernels._C (not tracked): the torch it was built '
                        'against."""\n')
                f.write(f"BUILD_INFO = {info!r}\n")

    return BuildExt


def _read_version() -> str:
    """fpet_kernels/_version.py's ``__version__`` (read as text: the package is not imported here)."""
    with open(os.path.join(ROOT, "fpet_kernels", "_version.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if m is None:
        raise RuntimeError("fpet_kernels/_version.py has no __version__ line")
    return m.group(1)


VERSION = _read_version()

try:
    ext_modules, cmdclass = _extensions()
except ImportError as exc:  # torch is not importable where the build runs (an isolated build without it)
    if _flag("FPET_REQUIRE_EXTENSION"):
        raise
    _warn_pure_python(f"torch cannot be imported by the build ({exc}); build with --no-build-isolation")
    ext_modules, cmdclass = [], {}
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = _tolerant(cmdclass["build_ext"])

# Metadata, dependencies and extras: pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
