"""Masked (sampled dense-dense) weight gradient: the backward kernel of PaFi's sparse fine-tuning.

For a linear layer ``y = x W^T`` with ``x`` [M, in] and ``grad_out = dL/dy`` [M, out], the weight
gradient at the K masked positions ``(rows[k], cols[k])`` is

    grad[k] = sum_m grad_out[m, rows[k]] * x[m, cols[k]]

computed without the dense ``[out, in]`` gradient (K * M multiply-adds instead of out * in * M).

Read top to bottom:
  1. reference: plain PyTorch (fallback and oracle);
  2. the op record ``MASKED_WEIGHT_GRAD`` (``library.Op``): the registered op
     ``torch.ops.fpet.masked_weight_grad`` (schema here, CPU kernel in csrc/cpu/sparse.cpp, no CUDA
     C++ kernel) and ``masked_weight_grad_triton`` (Triton kernel in ``sparse_triton.py``), its fake
     kernel and autograd;
  3. the public function ``masked_weight_grad`` (checks, ``library.dispatch``), and
     ``resolve_backend`` / ``call`` for PaFi's backward, which resolves once per forward and runs
     the resolved backend in its backward.

Sums run in float32 (float64 for float64 inputs); the result has ``grad_out``'s dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES
from . import _backend, library

OP = "fpet::masked_weight_grad"
BACKENDS = _backend.BACKENDS


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- 1. reference
def masked_weight_grad_reference(grad_out: Tensor, input: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(grad_out[:, rows] * input[:, cols]).sum(0)`` in float32 (float64), returned in grad_out's dtype."""
    acc = _acc_dtype(grad_out.dtype)
    return (grad_out[:, rows].to(acc) * input[:, cols].to(acc)).sum(0).to(grad_out.dtype)


# ----------------------------------------------------------------------------- 2. registered ops
# ``torch.ops.fpet.masked_weight_grad``: the C++ kernel (csrc/cpu/sparse.cpp, CPU; no CUDA C++ kernel);
# ``masked_weight_grad_triton``: sparse_triton.py. See ops/library.py.
def _fake(grad_out, input, rows, cols):
    torch._check(grad_out.dim() == 2 and input.dim() == 2, lambda: "grad_out and input must be 2-D")
    torch._check(rows.dim() == 1 and rows.shape == cols.shape, lambda: "rows and cols must be 1-D of one length")
    return grad_out.new_empty(rows.shape[0])


def _setup(ctx, inputs, output):
    grad_out, input, rows, cols = inputs
    ctx.save_for_backward(grad_out, input, rows, cols)


def _backward(ctx, g):
    """d grad[k] / d grad_out[m, rows[k]] = input[m, cols[k]] (and symmetrically): index_add of [M, K]
    columns, never a dense [out, in] matrix."""
    grad_out, input, rows, cols = ctx.saved_tensors
    need = ctx.needs_input_grad
    g_dy = g_x = None
    if need[0]:
        g_dy = torch.zeros_like(grad_out).index_add_(1, rows, (input[:, cols] * g.to(input.dtype)).to(grad_out.dtype))
    if need[1]:
        g_x = torch.zeros_like(input).index_add_(1, cols, (grad_out[:, rows] * g.to(grad_out.dtype)).to(input.dtype))
    return g_dy, g_x, None, None


def _sparse_triton():
    """``sparse_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import sparse_triton
    return sparse_triton


MASKED_WEIGHT_GRAD = library.register(library.Op(
    "masked_weight_grad", "(Tensor grad_out, Tensor input, Tensor rows, Tensor cols) -> Tensor", _fake,
    reference=masked_weight_grad_reference, setup_context=_setup, backward=_backward, triton=_sparse_triton,
    cuda=False))


# ----------------------------------------------------------------------------- 3. public API
def cpu_kernel_live() -> bool:
    """True when the extension registered the C++ kernel of ``fpet::masked_weight_grad`` for CPU."""
    return _backend.op_live(MASKED_WEIGHT_GRAD.name, "cpu")


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend of one call, chosen as for every op (``fpet_kernels/_backend.py``): None = the C++
    kernel on CPU tensors, Triton on CUDA tensors, else the reference. There is no CUDA C++ kernel:
    an explicit ``backend="cuda"`` raises, as does any backend that cannot run the call."""
    return _backend.resolve(backend, device, {"grad_out": dtype}, op=MASKED_WEIGHT_GRAD.name)


def check_indices(rows: Tensor, cols: Tensor, n_out: int, n_in: int, device: torch.device) -> None:
    """``rows``/``cols``: int64 1-D of one length on ``device``, in [0, n_out) / [0, n_in)."""
    for name, t, n in (("rows", rows, n_out), ("cols", cols, n_in)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {t.dim()}-D {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but grad_out is on {device}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{name} must hold indices in [0, {n}), got values in [{int(t.min())}, {int(t.max())}]")
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have the same length, got {rows.numel()} and {cols.numel()}")


def masked_weight_grad(grad_out: Tensor, input: Tensor, rows: Tensor, cols: Tensor,
                       backend: Optional[str] = None) -> Tensor:
    """The weight gradient of ``y = input @ W.T`` at positions ``(rows[k], cols[k])`` only: ``[K]``.

    ``grad_out`` [..., out] and ``input`` [..., in] (same leading shape, same floating dtype, same
    device); ``rows``/``cols`` int64 [K]. ``backend``: None (automatic), "cpu", "triton", "reference"
    (see :func:`resolve_backend`). Differentiable in ``grad_out`` and ``input``."""
    for name, t in (("grad_out", grad_out), ("input", input)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension")
    if grad_out.dtype != input.dtype:
        raise TypeError(f"grad_out ({grad_out.dtype}) and input ({input.dtype}) must have the same dtype")
    if grad_out.shape[:-1] != input.shape[:-1]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and input {tuple(input.shape)} must have the same "
                         "leading dimensions")
    if input.device != grad_out.device:
        raise ValueError(f"input is on {input.device} but grad_out is on {grad_out.device}")
    check_indices(rows, cols, grad_out.shape[-1], input.shape[-1], grad_out.device)
    return library.dispatch(MASKED_WEIGHT_GRAD, backend, grad_out.device, {"grad_out": grad_out.dtype},
                            grad_out.reshape(-1, grad_out.shape[-1]), input.reshape(-1, input.shape[-1]), rows, cols)


def call(backend: str, grad_out: Tensor, input: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Run a resolved backend (:func:`resolve_backend`) on checked 2-D inputs (no argument checks: see
    :func:`masked_weight_grad`)."""
    return library.run(MASKED_WEIGHT_GRAD, backend, grad_out, input, rows, cols)
