"""Which kernels are live, and which one an op call uses.

Backends:
  "reference"  the pure-PyTorch implementation of the spec (any device, any float dtype);
  "cpu"        the C++ kernels of the extension ``fpet_kernels._C`` on CPU tensors (OpenMP);
  "cuda"       the CUDA C++ kernels of the extension on CUDA tensors;
  "triton"     the Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

The choice per call: the op's ``backend=`` argument, else the environment variable
``FPET_BACKEND``, else "auto". An explicitly requested backend that cannot run the call raises;
the automatic choice takes the fastest live backend for the tensors' device and falls back to
the reference (saying so once) when no kernel is live.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "FPET_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_EXT_ERROR: str | None = None
try:  # the extension is optional: the package always imports
    importlib.import_module("fpet_kernels._C")
    _EXT_LOADED = True
except ImportError as exc:  # pragma: no cover - depends on the install
    _EXT_LOADED = False
    _EXT_ERROR = ("fpet_kernels._C is not built (pip install --no-build-isolation -e .)"
                  if isinstance(exc, ModuleNotFoundError) else f"{type(exc).__name__}: {exc}")


def _has_kernel(op: str, key: str) -> bool:
    if not _EXT_LOADED:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet_C::{op}", key))
    except RuntimeError:
        return False


def _probe() -> dict[str, bool]:
    from .ops import triton_common
    return {
        "reference": True,
        "cpu": _has_kernel("tome_merge", "CPU"),
        "cuda": _has_kernel("tome_merge", "CUDA") and torch.cuda.is_available(),
        "triton": triton_common.live(),
    }


# Fixed for the process, probed once at import: resolve() runs inside torch.compile traces, where
# a call into torch._C would break the graph.
_LIVE = _probe()


def live() -> dict[str, bool]:
    """Which backends can run here (the device being present for GPU backends)."""
    return _LIVE


def backends() -> dict:
    """What is live in this install and what the automatic choice picks per device.

    >>> import fpet_kernels as fk; fk.backends()["live"]["reference"]
    True
    """
    lv = dict(live())
    chosen = {"cpu": "cpu" if lv["cpu"] else "reference"}
    if torch.cuda.is_available():
        chosen["cuda"] = "cuda" if lv["cuda"] else ("triton" if lv["triton"] else "reference")
    info = {
        "live": lv,
        "auto": chosen,
        "extension": _EXT_LOADED,
        "extension_cuda": _has_kernel("tome_merge", "CUDA"),
        "env": os.environ.get(ENV_VAR),
    }
    if _EXT_ERROR:
        info["extension_error"] = _EXT_ERROR
    return info


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve(backend: str | None, device: torch.device, dtypes=()) -> str:
    """Pick the backend for one call on tensors of ``device`` and ``dtypes``."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    name = name.lower()
    if name not in BACKENDS + ("auto",):
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}={name!r} is not one of {BACKENDS + ('auto',)}")
    kernel_ok = all(d in KERNEL_DTYPES for d in dtypes)
    lv = live()
    if name == "auto":
        if not kernel_ok:  # float64 and friends: only the reference computes them
            return "reference"
        if device.type == "cpu" and lv["cpu"]:
            return "cpu"
        if device.type == "cuda":
            for cand in ("cuda", "triton"):
                if lv[cand]:
                    return cand
        why = f" ({_EXT_ERROR})" if _EXT_ERROR else ""
        _warn_once(
            f"fallback-{device.type}",
            f"fpet_kernels: no compiled kernel is live for {device.type} tensors{why}; "
            "using the pure-PyTorch reference (fpet_kernels.backends() tells what is live).",
        )
        return "reference"
    if name == "reference":
        return name
    if not lv[name]:
        why = f": the extension failed to load ({_EXT_ERROR})" if (_EXT_ERROR and name in ("cpu", "cuda")) else ""
        raise RuntimeError(f"backend={name!r} was requested but is not live in this install{why}; "
                           f"live backends: {[k for k, v in lv.items() if v]}")
    want = "cpu" if name == "cpu" else "cuda"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        want = "cpu"
    if device.type != want:
        raise ValueError(f"backend={name!r} runs on {want} tensors, but the inputs are on {device}")
    if not kernel_ok:
        bad = [str(d) for d in dtypes if d not in KERNEL_DTYPES]
        raise ValueError(f"backend={name!r} supports float32, float16 and bfloat16; got {bad} "
                         "(use backend='reference' for other dtypes)")
    return name


def kernels(backend: str):
    """The kernel table of a compiled backend: ``torch.ops.fpet_C`` (C++/CUDA) or the Triton module
    with the same names and signatures (``fpet_kernels/ops/triton_ops.py``)."""
    if backend == "triton":
        return importlib.import_module("fpet_kernels.ops.triton_ops")
    return torch.ops.fpet_C


def direct_call(backend: str, *tensors) -> bool:
    """Eager calls that need no gradient skip the Python custom-op wrapper (about 40 us a call) and
    go straight to the backend's kernel: same kernel, same results, less host time at B=1."""
    if backend == "reference" or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
