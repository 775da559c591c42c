"""The package version (the one place it is written) and the torch the extension was built against.

``__version__`` is read by the package (``fpet_kernels.__version__``) and by the build
(``pyproject.toml``: ``[tool.setuptools.dynamic] version``, parsed without importing anything).

A build of the C++ extension writes ``fpet_kernels/_build_info.py`` next to ``_C`` (never tracked:
it describes one build) with the torch version, the CUDA version of that torch and whether CUDA
sources were compiled. A C++ extension only loads into the torch it was compiled against;
``check_extension_torch()`` says in words when the torch loaded now is another one.

A leaf module: it imports nothing from the package, and torch only inside the functions.
"""
from __future__ import annotations

__version__ = "0.1.0"

REBUILD_HINT = "rebuild it against this torch: pip install --no-build-isolation --no-deps --force-reinstall ."


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
