"""Proportional attention (spec section 4) at SDPA speed: the inputs of a merging block's attention.

Read top to bottom:
  1. reference: qkv split, the merge metric (keys averaged over heads) and the exact fold of
     ``log(size)`` into one extra key channel (head dim padded to a multiple of 8), so that
     ``SDPA(q', k', v', scale) = softmax(q k^T * scale + log(size)^T) v`` runs without a mask;
  2. the op record ``ATTENTION_INPUTS`` (``library.Op``): the registered op
     ``torch.ops.fpet.attention_inputs_triton`` (inference: no autograd; the training path stays in
     differentiable PyTorch) and its fake kernel; the Triton kernel (one launch) is in
     ``attention_triton.py``;
  3. the public API: ``attention_inputs`` (checks, ``library.dispatch``) and ``proportional_sdpa``.

There is no C++ kernel (``cpp=False``): the PyTorch formulation is this op's CPU implementation (a
permute and a copy) and its training path. Where a call asks for a kernel this op does not have
(``backend="cpu"`` or ``"cuda"``, or ``"triton"`` with a gradient needed), it runs PyTorch and says
so once, as the automatic choice's other fallbacks do: the one backend rule (``ops/_backend.py``,
``library.run``) reads this from the record.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from . import library

PAD = 8  # the padded head dim is a multiple of 8 (what SDPA's fused kernels want)


# ----------------------------------------------------------------------------- 1. reference
def padded_dim(hd: int) -> int:
    return hd + PAD - hd % PAD


def fold_size(q: Tensor, k: Tensor, size: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``q' = [q, 1, 0..]``, ``k' = [k, log(size)/scale, 0..]``: ``q' k'^T * scale = q k^T * scale + log(size)^T``."""
    bsz, heads, n, hd = q.shape
    pad = padded_dim(hd) - hd
    bias = (size.to(torch.float32).log() / scale).to(q.dtype)
    one = q.new_ones(1, 1, 1, 1).expand(bsz, heads, n, 1)
    zeros = q.new_zeros(1, 1, 1, 1).expand(bsz, heads, n, pad - 1)
    return (torch.cat([q, one, zeros], dim=-1),
            torch.cat([k, bias.unsqueeze(1).expand(bsz, heads, n, 1), zeros], dim=-1))


def pad_value(v: Tensor) -> Tensor:
    bsz, heads, n, hd = v.shape
    return torch.cat([v, v.new_zeros(1, 1, 1, 1).expand(bsz, heads, n, padded_dim(hd) - hd)], dim=-1)


def attention_inputs_reference(qkv: Tensor, size: Optional[Tensor], num_heads: int, scale: float,
                               pad_v: bool):
    bsz, n, three_c = qkv.shape
    hd = three_c // (3 * num_heads)
    q, k, v = qkv.reshape(bsz, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    metric = k.float().mean(1).to(k.dtype)
    if size is not None:
        q, k = fold_size(q, k, size, scale)
        if pad_v:
            v = pad_value(v)
    return q, k, v, metric


# ----------------------------------------------------------------------------- 2. registered op
def _fake_attention_inputs(qkv, size, num_heads, scale, pad_v):
    bsz, n, three_c = qkv.shape
    hd = three_c // (3 * num_heads)
    e = hd if size is None else padded_dim(hd)
    ev = e if (pad_v and size is not None) else hd
    return (qkv.new_empty(bsz, num_heads, n, e), qkv.new_empty(bsz, num_heads, n, e),
            qkv.new_empty(bsz, num_heads, n, ev), qkv.new_empty(bsz, n, hd))


def _attention_inputs_op_reference(qkv, size, num_heads, scale, pad_v):
    """The reference with the schema's arguments and the op's return (a tuple)."""
    return tuple(attention_inputs_reference(qkv, size, num_heads, scale, pad_v))


# Triton only (no C++ kernel: on CPU this is a permute and a copy), inference only (no autograd); the
# reference is also the export formulation (standard aten ops, functional).
def _attention_triton():
    """``attention_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import attention_triton
    return attention_triton


ATTENTION_INPUTS = library.register(library.Op(
    "attention_inputs", "(Tensor qkv, Tensor? size, int num_heads, float scale, bool pad_v) "
                        "-> (Tensor, Tensor, Tensor, Tensor)",
    _fake_attention_inputs, reference=_attention_inputs_op_reference, triton=_attention_triton, cpp=False,
    cuda=False, inference_only=True, fallback="the PyTorch formulation (permute, mean, concatenations)"))


# ----------------------------------------------------------------------------- 3. public API
def attention_inputs(qkv: Tensor, size: Optional[Tensor], num_heads: int, scale: float, pad_v: bool = False,
                     backend: Optional[str] = None):
    """From timm's fused qkv projection ``[B, N, 3 * H * hd]``: ``(q, k, v, metric)`` for SDPA, with
    ``log(size)`` folded into an extra key channel when ``size`` is given (``pad_v``: ``v`` padded
    to the same head dim, so SDPA's flash kernels run; drop the output's extra channels), and
    ``metric`` = keys averaged over heads.

    Differentiable (PyTorch ops) when gradients are needed; otherwise one Triton launch on GPU. A
    backend this op has no kernel for (``"cpu"``, ``"cuda"``; ``"triton"`` when a gradient is needed)
    runs the PyTorch formulation, with a warning the first time."""
    check_inputs("attention_inputs", qkv, size, num_heads, scale, pad_v)
    _checks.backend_name(backend)
    return library.dispatch(ATTENTION_INPUTS, backend, qkv.device, {"qkv": qkv.dtype}, qkv, size, num_heads,
                            float(scale), bool(pad_v and size is not None))


def check_inputs(op: str, qkv, size, num_heads, scale, pad_v) -> None:
    """The arguments of ``attention_inputs`` (the public function and the Triton kernel's entry alike)."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"{op}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    heads = _checks.kernel_int(op, "num_heads", num_heads, 1)
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads) or qkv.shape[-1] == 0:
        raise ValueError(f"{op}: qkv must be [B, N, 3 * num_heads * head_dim] with head_dim >= 1, got "
                         f"{tuple(qkv.shape)} with num_heads={heads}")
    if not qkv.is_floating_point():
        raise TypeError(f"{op}: qkv must be a floating tensor, got {qkv.dtype}")
    if size is not None:
        if not isinstance(size, Tensor):
            raise TypeError(f"{op}: size must be a torch.Tensor or None, got {type(size).__name__}")
        if size.dim() != 3 or size.shape[:2] != qkv.shape[:2] or size.shape[-1] != 1:
            raise ValueError(f"{op}: size must be [B, N, 1] for qkv {tuple(qkv.shape)}, got {tuple(size.shape)}")
        if not size.is_floating_point():
            raise TypeError(f"{op}: size must be a floating tensor, got {size.dtype}")
        if size.device != qkv.device:
            raise ValueError(f"{op}: size is on {size.device} but qkv is on {qkv.device}")
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or scale == 0):
        raise ValueError(f"{op}: scale must be a finite nonzero number, got {scale!r}")
    _checks.flag(f"{op}: pad_v", pad_v)


def proportional_sdpa(q: Tensor, k: Tensor, v: Tensor, size: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T * scale + log(size)^T) v`` exactly, through SDPA without a mask."""
    qe, ke = fold_size(q, k, size, scale)
    # SDPA's fused (flash) kernels, on GPU and CPU, want equal head dims: v is padded too and the
    # padded output channels dropped (unequal dims would fall back to the materialising math path)
    return F.scaled_dot_product_attention(qe, ke, pad_value(v), dropout_p=dropout_p, scale=scale)[..., :v.shape[-1]]
