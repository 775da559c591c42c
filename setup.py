"""Build fpet_kernels and its optional C++/CUDA extension ``fpet_kernels._C``.

What is compiled, by default:
  - the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp), always (a few minutes on 2 cores);
  - the CUDA kernels (csrc/cuda/*.cu) too when a GPU is visible, the CUDA toolkit (nvcc) is found and
    torch is a CUDA build: for the visible GPUs' architectures. A machine without a GPU builds the CPU
    kernels only unless asked with FORCE_CUDA=1 (then for DEFAULT_ARCHS: 20 minutes and more on 2 cores).

Environment switches:
  FPET_NO_EXTENSION=1   pure-Python install (the package falls back to the reference ops)
  FORCE_CUDA=1          compile csrc/cuda/*.cu even without a GPU or a detected toolkit (CI, container
                        images, wheels for other machines)
  FPET_NO_CUDA=1        never compile CUDA sources
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default: the visible GPUs'; with FORCE_CUDA=1 and no GPU,
                        DEFAULT_ARCHS: A100, A10/RTX 30xx, L4/RTX 40xx, H100/H200, plus PTX for newer GPUs)
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja build)
  FPET_DEBUG=1          -O0 -g build
  FPET_REQUIRE_EXTENSION=1  a failed extension build is an error (CI); otherwise the install
                        finishes as pure Python and says so

pip hides a build's output unless it runs with -v; the few lines that matter (what is built and about
how long it takes, how long it took, a build that fell back to pure Python and why) are also written
to the terminal (/dev/tty) where there is one, so that a plain ``pip install`` shows them.

The compiled objects are kept in build/ext-<python>-torch<version>/ (ninja), also for editable
installs, whose own build folder is temporary: a second ``pip install -e .`` (another extra, say)
recompiles only the sources that changed.

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
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# Rough compile cost on one core, in minutes, for the estimate the build prints: all CPU sources; all CUDA
# sources for one architecture (a 2-core AMD EPYC, g++ 12 / nvcc 13, torch 2.14, other jobs running:
# about 4 minutes for the CPU kernels, 24 for CPU + CUDA for DEFAULT_ARCHS).
CPU_CORE_MINUTES = 7.0
CUDA_CORE_MINUTES_PER_ARCH = 10.0

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


def _say(*lines: str) -> None:
    """Lines the person running the install sees: on stderr (pip shows it with -v, and on failure) and
    on the terminal, where there is one (pip hides a build's output otherwise)."""
    text = "\n".join(lines)
    print(text, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write("\n" + text + "\n")
    except OSError:  # no terminal (CI, a pipe, a container without a tty)
        pass


def _cuda_choice(torch, ce, cuda_sources) -> tuple:
    """(compile the CUDA sources?, why): see the module docstring."""
    if _flag("FPET_NO_CUDA"):
        return False, "FPET_NO_CUDA=1"
    if not cuda_sources:
        return False, "no CUDA sources"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if ce.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    if not torch.cuda.is_available():
        return False, "no GPU visible (FORCE_CUDA=1 compiles the CUDA kernels anyway)"
    return True, f"GPU visible ({torch.cuda.get_device_name(0)})"


def _missing_compiler() -> str | None:
    """Why no C++ compiler can run (None when one is on PATH): said before a build that would fail."""
    cxx = (os.environ.get("CXX") or "c++").split()[0]
    if shutil.which(cxx):
        return None
    return (f"no C++ compiler: {cxx!r} is not on PATH. Install one (Debian/Ubuntu: apt-get install g++; "
            "Fedora: dnf install gcc-c++; macOS: xcode-select --install) or set CXX")


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

    # CUDA is built when asked (FORCE_CUDA=1), or when a GPU, the toolkit and a CUDA build of torch
    # are all present; a GPU is not needed to compile, but without one nobody asked for a 20-minute build.
    use_cuda, cuda_why = _cuda_choice(torch, ce, cuda_sources)
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
    ext.fpet_cuda_why = cuda_why
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


WARNING_BAR = "=" * 78


def _warn_pure_python(why: str) -> None:
    _say("", WARNING_BAR, "WARNING: fpet_kernels is installed WITHOUT its C++ extension (fpet_kernels._C):",
         f"  {why}",
         "The package works as pure Python (the reference ops: correct, slower). To build the kernels,",
         "install a C++ compiler (and ninja) and reinstall with: pip install --no-build-isolation -e .",
         "(FPET_REQUIRE_EXTENSION=1 turns this warning into an error; FPET_NO_EXTENSION=1 installs pure",
         "Python on purpose, and silences the warning the package gives at import.)", WARNING_BAR, "")


def _archs(with_cuda: bool) -> list:
    if not with_cuda:
        return []
    archs = (os.environ.get("TORCH_CUDA_ARCH_LIST") or "").replace(",", ";").replace(" ", ";")
    return [a for a in archs.split(";") if a]


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _tolerant(build_ext_cls):
    """``build_ext`` that says what it builds and how long that takes, keeps its objects in a persistent
    folder (build/ext-...) so that a rebuild recompiles only what changed, records the torch it builds
    against in fpet_kernels/_build_info.py, and turns a failed build into a warning and a pure-Python
    install (unless FPET_REQUIRE_EXTENSION=1)."""

    class BuildExt(build_ext_cls):
        def finalize_options(self):
            super().finalize_options()
            # An editable install (pip install -e) builds in a temporary folder that is deleted
            # afterwards: every reinstall would recompile everything. Keep the objects in the clone.
            build_temp = os.path.abspath(self.build_temp)
            if os.path.commonpath([build_temp, ROOT]) != ROOT:
                import torch

                tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}"
                self.build_temp = os.path.join(ROOT, "build", f"ext-{re.sub(r'[^A-Za-z0-9.+-]', '_', tag)}")

        def run(self):
            t0 = time.perf_counter()
            no_cxx = _missing_compiler()
            if no_cxx and self.extensions:
                if _flag("FPET_REQUIRE_EXTENSION"):
                    raise RuntimeError(f"fpet_kernels: {no_cxx} (FPET_REQUIRE_EXTENSION=1)")
                self.extensions = []
                self.distribution.ext_modules = []
                _warn_pure_python(no_cxx)
                return
            self._announce()
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
                    what = "CPU + CUDA kernels" if self._with_cuda(ext) else "CPU kernels"
                    _say(f"fpet_kernels: built fpet_kernels._C ({what}) in {_minutes(time.perf_counter() - t0)}.")

        @staticmethod
        def _with_cuda(ext) -> bool:
            return any(s.endswith(".cu") for s in ext.sources)

        def _announce(self):
            for ext in self.extensions:
                if ext.name != "fpet_kernels._C":
                    continue
                cuda = self._with_cuda(ext)
                archs = _archs(cuda)
                jobs = max(1, min(int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1), os.cpu_count() or 1))
                n_archs = (len(archs) or 1) if cuda else 0  # no list: the visible GPUs' (usually one)
                minutes = (CPU_CORE_MINUTES + CUDA_CORE_MINUTES_PER_ARCH * n_archs) / jobs
                n_cpp = sum(not s.endswith(".cu") for s in ext.sources)
                what = f"the CPU kernels ({n_cpp} C++ files)"
                if cuda:
                    what += (f" and the CUDA kernels ({len(ext.sources) - n_cpp} .cu files for "
                             f"{', '.join(archs) or 'the visible GPUs'}; {ext.fpet_cuda_why})")
                else:
                    what += f"; no CUDA kernels: {getattr(ext, 'fpet_cuda_why', 'not asked for')}"
                reuse = os.path.exists(os.path.join(self.build_temp, ".ninja_log"))
                lines = [f"fpet_kernels: compiling its C++ extension: {what}.",
                         (f"  Objects of an earlier build in {os.path.relpath(self.build_temp, ROOT)} are reused: "
                          "only sources that changed (or were not compiled there) compile." if reuse else
                          f"  About {max(1, round(minutes))} min with {jobs} parallel job(s) (MAX_JOBS), "
                          "more on a busy machine; pip install -v shows the compiler's progress.")]
                if not _ninja_available():
                    lines.append("  ninja is not installed: the build runs one file at a time and is not reused "
                                 "(pip install ninja).")
                _say(*lines)

        def _write_build_info(self, ext):
            import torch

            info = {"fpet_kernels": VERSION, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "with_cuda": self._with_cuda(ext), "cuda_why": getattr(ext, "fpet_cuda_why", None),
                    "cuda_archs": (os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs'")
                    if self._with_cuda(ext) else None}
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write('"""Written by setup.py when it built fpet_kernels._C (not tracked): the torch it was built '
                        'against."""\n')
                f.write(f"BUILD_INFO = {info!r}\n")

    return BuildExt


def _ninja_available() -> bool:
    from torch.utils import cpp_extension as ce

    return ce.is_ninja_available()


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
