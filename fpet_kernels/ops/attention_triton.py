"""Triton kernel of ``attention_inputs`` (``ops/attention.py``): one launch turns the fused qkv
projection ``[B, N, 3 * H * hd]`` into SDPA's inputs with the proportional-attention channel
folded in, and the merge metric (keys averaged over heads):

    q' = [q, 1, 0...],  k' = [k, log(size) / scale, 0...],  v' = [v, 0...]   [B, H, N, E], E = hd + pad
    metric = mean_h k                                                          [B, N, hd]

Replaces the permute copies, ``k.mean(1)``, the log and the three concatenations of the PyTorch
path (several launches per block) by one pass over qkv.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .triton_common import HAS_TRITON, cdiv, pow2, tl, triton

if HAS_TRITON:
    from .triton_common import store_rounded

    @triton.jit
    def _attention_inputs_kernel(qkv_ptr, size_ptr, q_ptr, k_ptr, v_ptr, metric_ptr, N, H, HD, E, EV, inv_scale,
                                 HAS_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        vn = nn < N
        e = tl.arange(0, E_PAD)
        in_hd = vn[:, None] & (e < HD)[None, :]
        if HAS_SIZE:
            bias = tl.log(tl.load(size_ptr + b * N + nn, mask=vn, other=1.0).to(tl.float32)) * inv_scale
        else:
            bias = tl.zeros([BLOCK_N], tl.float32)
        row = qkv_ptr + (b * N + nn)[:, None] * (3 * H * HD) + e[None, :]
        ksum = tl.zeros([BLOCK_N, E_PAD], tl.float32)
        for h in range(0, H):
            q = tl.load(row + h * HD, mask=in_hd, other=0.0).to(tl.float32)
            k = tl.load(row + (H + h) * HD, mask=in_hd, other=0.0).to(tl.float32)
            v = tl.load(row + (2 * H + h) * HD, mask=in_hd, other=0.0).to(tl.float32)
            ksum += k
            extra = (e == HD)[None, :] & (E > HD)
            out = ((b * H + h) * N + nn)[:, None]
            store_rounded(q_ptr + out * E + e[None, :], tl.where(extra, 1.0, q), vn[:, None] & (e < E)[None, :])
            store_rounded(k_ptr + out * E + e[None, :], tl.where(extra, bias[:, None], k),
                          vn[:, None] & (e < E)[None, :])
            store_rounded(v_ptr + out * EV + e[None, :], v, vn[:, None] & (e < EV)[None, :])
        store_rounded(metric_ptr + (b * N + nn)[:, None] * HD + e[None, :], ksum / H, in_hd)


def _check_args(qkv, size, num_heads, scale, pad_value) -> None:
    """Every argument, before anything is allocated or launched: the kernel indexes qkv, size and the
    outputs with them (``_checks``' kernel entry rules; messages name the argument)."""
    op = "attention_inputs_triton"
    _checks.kernel_tokens(op, "qkv", qkv)
    heads = _checks.kernel_int(op, "num_heads", num_heads, 1)
    if qkv.shape[2] == 0 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"{op}: qkv must have shape [B, N, 3 * num_heads * head_dim] with head_dim >= 1, got "
                         f"{tuple(qkv.shape)} for num_heads = {heads}")
    if size is not None:
        _checks.kernel_tensor(op, "size", size, qkv.device, shape=(qkv.shape[0], qkv.shape[1], 1))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"{op}: scale must be a finite nonzero number, got {scale!r}")
    _checks.flag(f"{op}: pad_v", pad_value)
    # the grid is (B, ceil(N / 16)); per-row offsets 3 * H * hd are 32-bit
    _checks.kernel_int(op, "N (qkv.shape[1])", qkv.shape[1], 0, 65535 * 16)
    _checks.kernel_int(op, "3 * num_heads * head_dim (qkv.shape[2])", qkv.shape[2], 1, 2 ** 31 - 1)


def attention_inputs(qkv, size, num_heads: int, scale: float, pad_value: bool):
    """One launch; see the module docstring. ``size`` None: no extra channel (E = hd)."""
    _check_args(qkv, size, num_heads, scale, pad_value)
    qkv = qkv.contiguous()
    bsz, n, three_c = qkv.shape
    hd = three_c // (3 * num_heads)
    e = hd if size is None else hd + 8 - hd % 8
    ev = e if pad_value else hd
    dev, dt = qkv.device, qkv.dtype
    q = torch.empty(bsz, num_heads, n, e, device=dev, dtype=dt)
    k = torch.empty(bsz, num_heads, n, e, device=dev, dtype=dt)
    v = torch.empty(bsz, num_heads, n, ev, device=dev, dtype=dt)
    metric = torch.empty(bsz, n, hd, device=dev, dtype=dt)
    if bsz == 0 or n == 0:
        return q, k, v, metric
    block_n = 16  # 16 tokens x E_PAD channels, 8 warps: no register spills for sm_90 (bench/aot_check.py)
    _attention_inputs_kernel[(bsz, cdiv(n, block_n))](
        qkv, qkv if size is None else size.contiguous(), q, k, v, metric, n, num_heads, hd, e, ev, 1.0 / scale,
        HAS_SIZE=size is not None, BLOCK_N=block_n, E_PAD=pow2(e, 16), num_warps=8)
    return q, k, v, metric
