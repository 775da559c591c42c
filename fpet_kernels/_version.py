"""The package version (the one place it is written) and the torch the extension was built against.

``__version__`` is read by the package (``fpet_kernels.__version__``) and by the build
(``pyproject.toml``: ``[tool.setuptools.dynamic] version``, parsed without importing anything).

A build of the C++ extension writes ``fpet_kernels/_build_info.py`` next to ``_C`` (never tracked:
it describes one build) with the torch version, the CUDA version of that torch and whether CUDA
sources were compiled. A C++ extension only loads into the torch it was compiled against;
``check_extension_torch()`` says in words when the torch loaded now is another one, and
``missing_extension_message()`` what the package says at import when the extension is not there.

A leaf module: it imports nothing from the package, and torch only inside the functions.
"""
from __future__ import annotations

__version__ = "0.1.0"

REBUILD_HINT = "rebuild it against this torch: pip install --no-build-isolation --no-deps --force-reinstall ."
# Set at run time (or at install, where setup.py then builds no extension): pure Python on purpose,
# so the import says nothing about a missing extension.
NO_EXTENSION_ENV = "FPET_NO_EXTENSION"


def build_info() -> dict | None:
    """What the build of ``fpet_kernels._C`` recorded (``torch``, ``torch_cuda``, ``with_cuda``,
    ``fpet_kernels``), or None when no build recorded anything (a pure-Python install, or an
    extension built before the build recorded it)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    info = getattr(_build_info, "BUILD_INFO", None)
    return dict(info) if isinstance(info, dict) else None


def _release(version: str) -> str:
    """"2.14.1+cu130" -> "2.14.1" (the release a C++ extension's ABI is tied to)."""
    return str(version).split("+", 1)[0]


def check_extension_torch(loaded: str | None = None, loaded_cuda: str | None = "auto") -> str | None:
    """None when the extension was built against the torch that is loaded (or nothing was recorded);
    else one message saying which torch the extension was built against, which one is loaded, and
    how to rebuild.

    ``loaded`` / ``loaded_cuda`` default to ``torch.__version__`` / ``torch.version.cuda`` (given
    explicitly by tests). The release (``2.14.1``) and the CUDA version of torch must match: a CUDA
    build of the extension links against libtorch_cuda, a CPU one does not; local tags other than
    the CUDA version (``+cpu``, ``+cu130``) are not compared beyond that.
    """
    info = build_info()
    if info is None or not info.get("torch"):
        return None
    if loaded is None or loaded_cuda == "auto":
        import torch

        loaded = torch.__version__ if loaded is None else loaded
        loaded_cuda = torch.version.cuda if loaded_cuda == "auto" else loaded_cuda
    built, built_cuda = str(info["torch"]), info.get("torch_cuda")
    problems = []
    if _release(built) != _release(loaded):
        problems.append(f"built against torch {built}, but torch {loaded} is loaded")
    if info.get("with_cuda") and (built_cuda or None) != (loaded_cuda or None):
        problems.append(f"its CUDA kernels were built with torch's CUDA {built_cuda}, "
                        f"but the loaded torch has CUDA {loaded_cuda or 'none (a CPU build)'}")
    if not problems:
        return None
    return "fpet_kernels._C was " + "; ".join(problems) + f": the C++ kernels cannot be used; {REBUILD_HINT}"


def missing_extension_message(loaded: bool, error: str | None) -> str | None:
    """The one warning ``import fpet_kernels`` gives when the C++ extension did not load: why, what runs
    instead, and how to fix it. None when the extension loaded, when ``FPET_NO_EXTENSION=1`` chose pure
    Python, or when the cause (an extension built for another torch) was already said while loading it.

    ``loaded`` / ``error``: whether ``fpet_kernels._C`` loaded, and the reason it did not."""
    import os

    if loaded or os.environ.get(NO_EXTENSION_ENV, "0").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if check_extension_torch() is not None:
        return None
    why = error or "fpet_kernels._C did not load"
    if why.startswith("fpet_kernels._C is not built"):
        why = "fpet_kernels._C is not built (no C++ compiler at install, a failed build, or a pure-Python install)"
    return (f"fpet_kernels: the C++ kernels are not available: {why}. Every op runs the pure-PyTorch "
            "reference (correct, slower). To build them: install a C++ compiler (Debian/Ubuntu: apt-get install "
            "g++) and ninja, then reinstall from the clone with 'pip install --no-build-isolation -e .' (the "
            f"install says why a build fails). {NO_EXTENSION_ENV}=1 runs pure Python without this warning.")
