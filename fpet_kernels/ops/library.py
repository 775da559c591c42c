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
after every family has defined its schemas (``ops/_backend.py``).

**One record per op.** Each family module declares its ops as :class:`Op` records and passes each to
:func:`register`; :data:`OPS` is the one list of ops, from which registration, the backend tables,
the ONNX decompositions, the benchmarks' op list and the emulator's schemas derive. **One
dispatcher.** :func:`dispatch` decides, once per public call, between the export formulation, the
reference, the C++ kernels and the Triton kernel. The per-row formulation (padded batches, threshold
merging) is ops of its own (``tome_match_rows``, ``pyra_merge_rows``, ``fpet_merge_rows``), dispatched
the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _checks
from . import _backend, _export

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


def _triton_impl(load, name: str):
    def impl(*args):
        kernel = getattr(load(), name)
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        dev = _device_of(args)
        guard = torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext()
        with guard:  # Triton launches on the current device: make it the inputs' device
            out = kernel(*args)
        return out
    impl.__name__ = f"{name}_triton"
    return impl


def define(name: str, schema: str, fake, triton: Callable | None, cpp: bool = True) -> None:
    """Define ``fpet::<name>`` (C++ kernels; ``cpp=False``: none) and, with ``triton`` (a function
    returning the module whose function ``<name>`` is the Triton kernel), ``fpet::<name>_triton``, both
    with ``schema`` and the fake kernel ``fake``."""
    if cpp:
        torch.library.define(f"{NAMESPACE}::{name}", schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake)
    if triton is not None:
        torch.library.custom_op(f"{NAMESPACE}::{name}_triton", _triton_impl(triton, name), mutates_args=(),
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


# ----------------------------------------------------------------------------- one record per op
@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """Everything about one registered op ``torch.ops.fpet.<name>``, declared once in its family module.

    ``schema``      the op's schema (without the name), shared by both kernel families;
    ``fake``        its fake (meta) kernel, for torch.compile / export;
    ``reference``   plain differentiable PyTorch taking the schema's arguments and returning what the
                    op returns (the fallback backend and the test oracle);
    ``export``      the export-friendly formulation (standard aten ops, functional) that
                    ``torch.onnx.export`` traces in place of the op; None: ``reference`` serves;
    ``setup_context``, ``backward``  its autograd formula (both families; ``ctx.kernels`` is the family);
    ``calls``       the registered ops its backward calls, of its own family;
    ``triton``      a function of no argument returning the module (``ops/<...>_triton*.py``) whose
                    function ``<name>`` is the Triton kernel, imported at the first call (None: no
                    Triton kernel);
    ``cpp``         the C++ extension registers CPU kernels for it (csrc/cpu/);
    ``cuda``        and CUDA kernels (csrc/cuda/);
    ``public``      a public function dispatches it (a backward-only op is not public);
    ``inference_only``  a differentiable op whose kernels have no backward: where a gradient is needed
                    the reference runs (:func:`run`; an op without gradients, such as a matching, is not);
    ``fallback``    what runs in place of a kernel the op lacks, in words (the warnings say it);

    The backend rule reads the record (``ops/_backend.py``): without C++ kernels (``cpp=False``) the
    reference is the op's CPU implementation; ``inference_only``: a kernel runs only where no gradient
    is needed.
    """
    name: str
    schema: str
    fake: Callable
    reference: Optional[Callable] = None
    export: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    backward: Optional[Callable] = None
    calls: tuple = ()
    triton: Optional[Callable] = None
    cpp: bool = True
    cuda: bool = True
    public: bool = True
    inference_only: bool = False
    fallback: str = "the pure-PyTorch reference"

    @property
    def kernels(self) -> tuple:
        """The registered ops a call of this op needs with one kernel family: itself, then its backward's."""
        return (self.name,) + tuple(self.calls)

    def formulation(self) -> Callable:
        """What ``torch.onnx.export`` traces in place of the op."""
        return self.export if self.export is not None else self.reference


OPS = _backend.OPS  # name -> Op, in registration order: the one list of ops (the backend rule reads it)


def register(op: Op) -> Op:
    """Define ``op`` (schemas, fake kernels, autograd) and add it to :data:`OPS`."""
    if op.name in OPS:
        raise RuntimeError(f"fpet::{op.name} is registered twice")
    define(op.name, op.schema, op.fake, op.triton, cpp=op.cpp)
    if op.backward is not None:
        register_autograd(op.name, op.backward, op.setup_context)
    OPS[op.name] = op
    return op


# ----------------------------------------------------------------------------- one dispatcher
def dispatch(op: Op, backend, device, dtypes, *args):
    """Run one public call of ``op`` on ``args`` (the schema's arguments): while ``torch.onnx.export``
    traces, the export formulation; else the backend resolved once from ``backend``, ``$FPET_BACKEND``
    and the automatic choice (``ops/_backend.resolve``; ``dtypes`` as it takes them), run by :func:`run`."""
    be = _backend.resolve(backend, device, dtypes, op.name)  # first: a bad backend raises under export too
    if _export.exporting():
        return op.formulation()(*args)
    # :func:`run`, inlined: this runs on every public op call
    if be == "reference":
        return op.reference(*args)
    if op.inference_only:
        return run(op, be, *args)
    kernel = getattr(TRITON if be == "triton" else CPP, op.name)
    # :func:`call`, inlined
    if (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)) or (
            torch.compiler.is_compiling()):
        return kernel(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return kernel(*args)


def run(op: Op, backend: str, *args):
    """Run a resolved ``backend`` of ``op`` on checked arguments: the reference, or the op of the
    backend's kernel family (:func:`call`). An ``inference_only`` op runs the reference where a gradient
    is needed, saying so once."""
    if backend == "reference":
        return op.reference(*args)
    if op.inference_only and torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args):
        _backend.warn_once(f"{op.name}-{backend}-grad",
                           f"fpet_kernels: the {_backend.FAMILY_NAMES[backend]} kernel of {op.name} has no backward; "
                           f"where a gradient is needed (training) {op.name} runs {op.fallback}")
        return op.reference(*args)
    return call(getattr(family(backend), op.name), *args)
