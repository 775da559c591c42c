"""How an op family defines its registered ops (one schema, two kernel families):

  ``torch.ops.fpet.<name>``         the C++ kernels, registered by the extension ``fpet_kernels._C`` as
                                    this op's CPU (csrc/cpu/) and CUDA (csrc/cuda/) implementations:
                                    the dispatcher picks one from the tensors' device;
  ``torch.ops.fpet.<name>_triton``  the Triton kernel (``fpet_kernels/ops/<module>.py``, imported at
                                    its first call, launched under the inputs' CUDA device).

Both share one fake kernel and one autograd formula, whose backward calls the ops of its own
family (``ctx.kernels.<op>``) and trusts the index tensors its forward produced or checked
(``_checks.trusted_maps``: no host sync for a data check in a backward). The pure-PyTorch reference of each op needs neither: it is plain
differentiable PyTorch that the public functions call directly.

The schemas are defined here, in Python, so that the ops exist (with the Triton kernels, fake
kernels and autograd) whether or not the C++ extension is installed; ``load_extension`` loads it
after every family has defined its schemas (``fpet_kernels/_backend.py``).
"""
from __future__ import annotations

import contextlib
import importlib

import torch
from torch import Tensor

from .. import _backend, _checks

NAMESPACE = "fpet"
FAMILIES = {"": "C++ (CPU, CUDA)", "_triton": "Triton"}


class Kernels:
    """The registered ops of one kernel family: ``Kernels("_triton").merge_sum`` is
    ``torch.ops.fpet.merge_sum_triton``."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def __getattr__(self, name: str):
        # the op's one overload, looked up once (kept on the instance: later lookups skip this method)
        op = getattr(getattr(torch.ops, NAMESPACE), name + self.suffix).default
        setattr(self, name, op)
        return op


CPP = Kernels("")
TRITON = Kernels("_triton")


def family(backend: str) -> Kernels:
    """The kernel family a (resolved, non-reference) backend runs: ``cpu``/``cuda`` -> C++, ``triton``."""
    return TRITON if backend == "triton" else CPP


def _device_of(args):
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


def _triton_impl(module: str, name: str):
    def impl(*args):
        kernel = getattr(importlib.import_module(f"fpet_kernels.ops.{module}"), name)
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        dev = _device_of(args)
        guard = torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext()
        with guard:  # Triton launches on the current device: make it the inputs' device
            out = kernel(*args)
        return out
    impl.__name__ = f"{name}_triton"
    return impl


def define(name: str, schema: str, fake, triton_module: str | None, cpp: bool = True) -> None:
    """Define ``fpet::<name>`` (C++ kernels; ``cpp=False``: none) and, with ``triton_module``,
    ``fpet::<name>_triton``, both with ``schema`` and the fake kernel ``fake``."""
    if cpp:
        torch.library.define(f"{NAMESPACE}::{name}", schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake)
    if triton_module is not None:
        torch.library.custom_op(f"{NAMESPACE}::{name}_triton", _triton_impl(triton_module, name), mutates_args=(),
                                schema=schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}_triton", fake)


def trusted_maps():
    """The context of a backward: index tensors (token maps, PYRA's matching) are not checked again,
    in Python and in the extension's CUDA launchers (``csrc/trusted_maps.h``)."""
    return _checks.trusted_maps(getattr(_backend._EXT, "_trust_maps", None))


def _trusting(backward):
    """``backward`` run inside :func:`trusted_maps`: the maps it passes on are its forward's (produced by
    the forward's kernel, or given by the user and range-checked in the forward)."""
    def run(ctx, *grads):
        with trusted_maps():
            return backward(ctx, *grads)
    run.__name__ = getattr(backward, "__name__", "backward")
    return run


def register_autograd(name: str, backward, setup_context) -> None:
    """One autograd formula for both families of ``name``; ``ctx.kernels`` is the family's :class:`Kernels`.
    The backward runs inside :func:`trusted_maps`."""
    backward = _trusting(backward)
    for suffix in FAMILIES:
        qualname = f"{NAMESPACE}::{name}{suffix}"
        if not _has_schema(qualname):  # an op without a Triton kernel
            continue

        def setup(ctx, inputs, output, _kernels=Kernels(suffix)):
            ctx.kernels = _kernels
            setup_context(ctx, inputs, output)

        torch.library.register_autograd(qualname, backward, setup_context=setup)


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def call(op, *args):
    """Call a registered op. When no input needs a gradient the call enters the dispatcher below the
    autograd key, where the Python autograd formula would only have passed it through: an eager
    no-grad call costs the C++ dispatch alone. Under torch.compile, the plain call."""
    if (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)) or (
            torch.compiler.is_compiling()):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
