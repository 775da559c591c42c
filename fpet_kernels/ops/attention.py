"""Proportional attention (spec section 4) at SDPA speed: the inputs of a merging block's attention.

Read top to bottom:
  1. reference: qkv split, the merge metric (keys averaged over heads) and the exact fold of
     ``log(size)`` into one extra key channel (head dim padded to a multiple of 8), so that
     ``SDPA(q', k', v', scale) = softmax(q k^T * scale + log(size)^T) v`` runs without a mask;
  2. the registered op ``torch.ops.fpet.attention_inputs_triton`` (inference: no autograd; the training
     path stays in differentiable PyTorch) and its fake kernel; the Triton kernel (one launch) is
     in ``attention_triton.py``;
  3. the public API: ``attention_inputs`` and ``proportional_sdpa``.

There is no C++ kernel: the PyTorch formulation is this op's CPU implementation (a permute and a
copy) and its training path. Where a call asks for a kernel this op does not have (``backend="cpu"``
or ``"cuda"``, or ``"triton"`` with a gradient needed), it runs PyTorch and says so once, as the
automatic choice's other fallbacks do (``_backend``).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from . import _backend
from . import _export, library

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


# Triton only (no C++ kernel: on CPU this is a permute and a copy), inference only (no autograd).
library.define("attention_inputs", "(Tensor qkv, Tensor? size, int num_heads, float scale, bool pad_v) "
               "-> (Tensor, Tensor, Tensor, Tensor)", _fake_attention_inputs, "attention_triton", cpp=False)


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
    needs_grad = torch.is_grad_enabled() and (qkv.requires_grad or (size is not None and size.requires_grad))
    be = _attention_backend(backend, qkv, needs_grad)
    if be == "reference" or _export.exporting():  # ONNX export: the PyTorch formulation
        return attention_inputs_reference(qkv, size, num_heads, scale, pad_v and size is not None)
    return library.call(library.TRITON.attention_inputs, qkv, size, num_heads, float(scale),
                        bool(pad_v and size is not None))


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


def _attention_backend(backend: Optional[str], qkv: Tensor, needs_grad: bool) -> str:
    """"triton" or "reference" (PyTorch). The Triton kernel when asked for (checked as for any op) or,
    automatically (``backend`` None or "auto", ``FPET_BACKEND`` likewise), on CUDA tensors where it is
    live and no gradient is needed; PyTorch otherwise. There is no C++ kernel: on CPU tensors PyTorch is
    the implementation (a permute and a copy); an explicit "cpu" / "cuda", or "triton" with a gradient
    needed, runs PyTorch and says so once."""
    name = backend if backend is not None else _backend.env_backend()
    name = "auto" if name is None else name.lower()
    if name == "reference":
        return "reference"
    if name == "triton":
        _backend.resolve("triton", qkv.device, {"qkv": qkv.dtype}, op=None)
        return _triton_unless_grad(needs_grad)
    if name in ("cpu", "cuda"):
        _backend._warn_once(f"attention_inputs-{name}",
                            f"fpet_kernels: attention_inputs has no {name} kernel (backend={name!r}): it runs the "
                            "PyTorch formulation (permute, mean, concatenations); the merge ops still run "
                            f"{name}. On GPU, backend='triton' or None runs its Triton kernel where no gradient "
                            "is needed.")
        return "reference"
    if not qkv.is_cuda or qkv.dtype not in _backend.KERNEL_DTYPES:
        return "reference"  # the implementation on CPU; other dtypes: only PyTorch computes them
    if not _backend.live()["triton"]:
        _backend._warn_once("attention_inputs-no-triton",
                            "fpet_kernels: the Triton kernel of attention_inputs is not live (Triton is not "
                            "installed); it runs the PyTorch formulation (permute, mean, concatenations)")
        return "reference"
    return _triton_unless_grad(needs_grad)


def _triton_unless_grad(needs_grad: bool) -> str:
    if not needs_grad:
        return "triton"
    _backend._warn_once("attention_inputs-triton-grad",
                        "fpet_kernels: the Triton kernel of attention_inputs has no backward; where a gradient is "
                        "needed (training) attention_inputs runs the PyTorch formulation (permute, mean, "
                        "concatenations)")
    return "reference"


def proportional_sdpa(q: Tensor, k: Tensor, v: Tensor, size: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T * scale + log(size)^T) v`` exactly, through SDPA without a mask."""
    qe, ke = fold_size(q, k, size, scale)
    # SDPA's fused (flash) kernels, on GPU and CPU, want equal head dims: v is padded too and the
    # padded output channels dropped (unequal dims would fall back to the materialising math path)
    return F.scaled_dot_product_attention(qe, ke, pad_value(v), dropout_p=dropout_p, scale=scale)[..., :v.shape[-1]]
