"""X-PEFT's mixed-profile bottleneck adapter: every batch row through its own profile's adapter.

Read top to bottom:
  1. reference: each row alone with its profile (the test oracle and the fallback) and the
     closed-form backward;
  2. the op record ``XPEFT_ADAPTER`` (``library.Op``): registered ops ``torch.ops.fpet.xpeft_adapter``
     (CPU kernel in ``csrc/cpu/xpeft.cpp``, no CUDA C++ kernel) and ``xpeft_adapter_triton``
     (``xpeft_triton.py``), fake kernel, autograd (one PyTorch backward);
  3. the public API ``xpeft_adapter``: checks, ``library.dispatch`` (the backend chosen as for every
     op, ``ops/_backend.py``).

For row ``b`` of ``x`` [B, N, d] with profile ``p = profile[b]`` (``down`` [P, d, r], ``up``
[P, r, d], biases [P, r] and [P, d], the combined adapters of P profiles)::

    out[b] = residual[b] + scale * (relu(x[b] @ down[p] + down_bias[p]) @ up[p] + up_bias[p])

``residual=None`` means ``residual = x`` (a sequential adapter). Computed in float32 (float64 for
float64 x, reference only), stored in ``x.dtype``. Each output row depends only on its own row and profile: a batch of mixed profiles
gives the rows that each row alone gives. Gradients flow to x, residual and the four weight
tensors (the caller's combination of the bank, ``down[p] = sum_i w_i A_i``, carries them on to
the mask logits: ``dL/dw_i = <dL/d down[p], A_i>``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from . import _backend, library


# ----------------------------------------------------------------------------- 1. reference
def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def xpeft_adapter_reference(x: Tensor, profile: Tensor, down: Tensor, down_bias: Tensor, up: Tensor,
                            up_bias: Tensor, scale: float = 1.0, residual: Optional[Tensor] = None) -> Tensor:
    """Each row alone with its profile's adapter, in float32 (differentiable)."""
    res = x if residual is None else residual
    f = _compute_dtype(x)
    rows = []
    for b, p in enumerate(profile.tolist()):
        h = torch.relu(x[b].to(f) @ down[p].to(f) + down_bias[p].to(f))
        rows.append((res[b].to(f) + scale * (h @ up[p].to(f) + up_bias[p].to(f))).to(x.dtype))
    return torch.stack(rows) if rows else x.new_empty(x.shape)


def xpeft_adapter_backward_reference(grad_out: Tensor, x: Tensor, profile: Tensor, down: Tensor, down_bias: Tensor,
                                     up: Tensor, up_bias: Tensor, scale: float):
    """(grad_x through the adapter branch only, grad_down, grad_down_bias, grad_up, grad_up_bias):
    batched over rows with each row's weights gathered, summed per profile with ``index_add``."""
    f = _compute_dtype(x)
    g, xf = grad_out.to(f), x.to(f)
    dw, uw = down.to(f)[profile], up.to(f)[profile]  # [B, d, r], [B, r, d]
    hp = torch.baddbmm(down_bias.to(f)[profile].unsqueeze(1), xf, dw)  # [B, N, r]
    h = torch.relu(hp)
    g_up = scale * torch.bmm(h.transpose(1, 2), g)
    g_ub = scale * g.sum(1)
    g_hp = (scale * torch.bmm(g, uw.transpose(1, 2))) * (hp > 0)
    g_down = torch.bmm(xf.transpose(1, 2), g_hp)
    g_db = g_hp.sum(1)
    g_x = torch.bmm(g_hp, dw.transpose(1, 2))

    def per_profile(rows: Tensor, like: Tensor) -> Tensor:
        return torch.zeros(like.shape, dtype=f, device=like.device).index_add_(0, profile, rows).to(like.dtype)

    return (g_x.to(x.dtype), per_profile(g_down, down), per_profile(g_db, down_bias), per_profile(g_up, up),
            per_profile(g_ub, up_bias))


# ----------------------------------------------------------------------------- 2. registered ops
# ``torch.ops.fpet.xpeft_adapter``: the C++ kernel (csrc/cpu/xpeft.cpp, CPU; no CUDA C++ kernel);
# ``xpeft_adapter_triton``: xpeft_triton.py. See ops/library.py.
def _fake(x, residual, profile, down, down_bias, up, up_bias, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, residual, profile, down, down_bias, up, up_bias, scale = inputs
    ctx.scale = scale
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, profile, down, down_bias, up, up_bias)


def _backward(ctx, grad_out):
    x, profile, down, down_bias, up, up_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    # One formula for every kernel family: five batched matrix products, device-agnostic.
    gx, gd, gdb, gu, gub = xpeft_adapter_backward_reference(grad_out, x, profile, down, down_bias, up, up_bias,
                                                            ctx.scale)
    if not ctx.has_residual:  # residual = x: the identity path adds grad_out
        gx = gx + grad_out.to(gx.dtype)
    g_res = grad_out.to(x.dtype) if ctx.has_residual and need[1] else None
    return (gx.to(x.dtype) if need[0] else None, g_res, None, gd.to(down.dtype) if need[3] else None,
            gdb.to(down_bias.dtype) if need[4] else None, gu.to(up.dtype) if need[5] else None,
            gub.to(up_bias.dtype) if need[6] else None, None)


def _op_reference(x, residual, profile, down, down_bias, up, up_bias, scale):
    """The reference with the schema's arguments."""
    return xpeft_adapter_reference(x, profile, down, down_bias, up, up_bias, scale, residual)


def _xpeft_triton():
    """``xpeft_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import xpeft_triton
    return xpeft_triton


XPEFT_ADAPTER = library.register(library.Op(
    "xpeft_adapter", "(Tensor x, Tensor? residual, Tensor profile, Tensor down, Tensor down_bias, Tensor up, "
                     "Tensor up_bias, float scale) -> Tensor",
    _fake, reference=_op_reference, setup_context=_setup, backward=_backward, triton=_xpeft_triton, cuda=False))


def cpu_kernel_live() -> bool:
    """Whether the C++ CPU kernel of ``fpet::xpeft_adapter`` is live in this install."""
    return _backend.op_live(XPEFT_ADAPTER.name, "cpu")


# ----------------------------------------------------------------------------- 3. public API
def _check(x, profile, down, down_bias, up, up_bias, residual) -> None:
    _checks.tokens("x", x)
    b, _, d = x.shape
    if residual is not None:
        _checks.tokens("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    if not isinstance(profile, Tensor) or profile.dtype != torch.int64 or profile.dim() != 1 or profile.shape[0] != b:
        got = f"{profile.dtype} {tuple(profile.shape)}" if isinstance(profile, Tensor) else type(profile).__name__
        raise ValueError(f"profile must be an int64 tensor [B] = [{b}] of profile ids, got {got}")
    if profile.device != x.device:
        raise ValueError(f"profile is on {profile.device} but x is on {x.device}")
    if not isinstance(down, Tensor) or down.dim() != 3:
        raise ValueError(f"down must be a tensor [P, d, r], got {getattr(down, 'shape', type(down).__name__)}")
    p, _, r = down.shape
    _checks.param("down", down, (p, d, r), x)
    _checks.param("down_bias", down_bias, (p, r), x)
    _checks.param("up", up, (p, r, d), x)
    _checks.param("up_bias", up_bias, (p, d), x)
    if b and not torch.compiler.is_compiling():
        lo, hi = int(profile.min()), int(profile.max())
        if lo < 0 or hi >= p:
            raise IndexError(f"profile ids must be in [0, P) = [0, {p}), got values in [{lo}, {hi}]")


def xpeft_adapter(x: Tensor, profile: Tensor, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor,
                  scale: float = 1.0, residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``residual + scale * (relu(x @ down[p] + down_bias[p]) @ up[p] + up_bias[p])`` per row ``b``,
    ``p = profile[b]`` (module docstring). ``x`` [B, N, d]; ``profile`` int64 [B] in [0, P);
    ``down`` [P, d, r]; ``down_bias`` [P, r]; ``up`` [P, r, d]; ``up_bias`` [P, d]; ``residual``
    like x or None (= x). ``backend``: None (C++ on CPU when built, Triton on CUDA, else the
    reference), "cpu", "triton", "reference". Differentiable in x, residual and the weights."""
    _check(x, profile, down, down_bias, up, up_bias, residual)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    try:
        finite = math.isfinite(scale)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return library.dispatch(XPEFT_ADAPTER, backend, x.device,
                            _checks.dtypes(x=x, residual=residual, down=down, down_bias=down_bias, up=up,
                                           up_bias=up_bias),
                            x, residual, profile, down, down_bias, up, up_bias, float(scale))
