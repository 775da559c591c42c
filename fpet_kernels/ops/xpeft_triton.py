"""Triton kernel of ``xpeft_adapter`` (``ops/xpeft.py``): one program per (batch row, 32-token
tile) reads its row's profile id and applies that profile's combined adapter, down-projection,
ReLU, up-projection and residual add, in two phases separated by ``tl.debug_barrier()``:

    1. for each BLOCK_R columns of the rank r:  h = relu(x_tile @ down[p] + down_bias[p])
       (a loop over d in BLOCK_D blocks), written to the workspace rows of this tile;
    2. for each BLOCK_D columns of d:  out = residual + scale * (h @ up[p] + up_bias[p])
       (a loop over the rank in BLOCK_R blocks, h read back from the workspace).

Tiled over the rank as over d: no register tile grows with r (any r runs; no spills at r = 64,
see the tile sizes below). Half inputs (x, down and up of one half dtype) go to the tensor cores as
they are, ``tl.dot`` accumulating in float32, and h is stored in that half dtype for the second
product (the rounding a PyTorch half adapter does); float32 inputs use 3xTF32 dots (float32
accuracy). The interpreter computes every dot in float32 IEEE (its bf16 dot is wrong). ReLU keeps
NaN (``relu(nan) = nan``, as the reference and the C++ kernel). Rows of different profiles run
side by side in the same launch; a profile's weights are read by all of its programs from L2.
The result is stored in x's dtype.

Every argument is checked first (``_check_args``), with errors naming the argument: nothing a
caller passes makes the kernel read out of bounds.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .triton_common import HAS_TRITON, cdiv, check_index_range, interpreting, pow2, tl, triton

# Tiles, sm_90 with a launch's specialisation (Triton 3.8, r = 64): half inputs 32 x 64 x 64 at 4 warps,
# 213 registers, no spills; float32 (3xTF32 splits every operand in three) 32 x 32 x 32 at 8 warps,
# 189 registers, no spills (32 x 64 x 64 spilled 0.8-1 KB there). The interpreter runs the half tiles.
BLOCK_M = 32         # tokens per program
BLOCK_D = 64         # columns of d per step
BLOCK_R = 64         # columns of the rank per step (fewer when r is small)
NUM_WARPS = 4
BLOCK_D_F32, BLOCK_R_F32, NUM_WARPS_F32 = 32, 32, 8   # float32 operands on the GPU
_HALF = (torch.float16, torch.bfloat16)

if HAS_TRITON:
    from .triton_common import store_rounded

    @triton.jit
    def _dot(a, b, NATIVE: tl.constexpr, PREC: tl.constexpr):
        """``a @ b`` accumulated in float32: half operands as they are (NATIVE), else float32 operands."""
        if NATIVE:
            return tl.dot(a, b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)

    @triton.jit
    def _xpeft_adapter_kernel(x_ptr, res_ptr, prof_ptr, down_ptr, db_ptr, up_ptr, ub_ptr, out_ptr, h_ptr,
                              N, D, R, scale,
                              HAS_RES: tl.constexpr, NATIVE: tl.constexpr, PREC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        nn = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        vn = nn < N
        p = tl.load(prof_ptr + b).to(tl.int64)
        dd = tl.arange(0, BLOCK_D)
        rr = tl.arange(0, BLOCK_R)
        rows = (b * N + nn.to(tl.int64))[:, None]
        x_rows = x_ptr + rows * D
        h_rows = h_ptr + rows * R
        down_p = down_ptr + p * D * R
        up_p = up_ptr + p * R * D

        # 1. h = relu(x @ down[p] + down_bias[p]), BLOCK_R columns at a time
        for r0 in range(0, R, BLOCK_R):
            vr = (r0 + rr) < R
            h = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                vd = (d0 + dd) < D
                xt = tl.load(x_rows + (d0 + dd)[None, :], mask=vn[:, None] & vd[None, :], other=0.0)
                w = tl.load(down_p + (d0 + dd)[:, None] * R + (r0 + rr)[None, :], mask=vd[:, None] & vr[None, :],
                            other=0.0)
                h += _dot(xt, w, NATIVE, PREC)
            h += tl.load(db_ptr + p * R + r0 + rr, mask=vr, other=0.0).to(tl.float32)[None, :]
            h = tl.where(h < 0.0, 0.0, h)  # ReLU that keeps NaN (tl.maximum would return 0)
            tl.store(h_rows + (r0 + rr)[None, :], h.to(h_ptr.dtype.element_ty), mask=vn[:, None] & vr[None, :])
        tl.debug_barrier()  # phase 2 reads h written by other threads of this program

        # 2. out = residual + scale * (h @ up[p] + up_bias[p]), BLOCK_D columns at a time
        for d0 in range(0, D, BLOCK_D):
            vd = (d0 + dd) < D
            m2 = vn[:, None] & vd[None, :]
            y = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for r0 in range(0, R, BLOCK_R):
                vr = (r0 + rr) < R
                h = tl.load(h_rows + (r0 + rr)[None, :], mask=vn[:, None] & vr[None, :], other=0.0)
                u = tl.load(up_p + (r0 + rr)[:, None] * D + (d0 + dd)[None, :], mask=vr[:, None] & vd[None, :],
                            other=0.0)
                y += _dot(h, u, NATIVE, PREC)
            ub = tl.load(ub_ptr + p * D + d0 + dd, mask=vd, other=0.0).to(tl.float32)
            if HAS_RES:
                res = tl.load(res_ptr + rows * D + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32)
            else:
                res = tl.load(x_rows + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32)
            store_rounded(out_ptr + rows * D + (d0 + dd)[None, :], res + scale * (y + ub[None, :]), m2)


def _check_args(op, x, residual, profile, down, down_bias, up, up_bias, scale) -> float:
    """x [B, N, d] (residual like x or None), profile int64 [B] in [0, P), down [P, d, r], down_bias
    [P, r], up [P, r, d], up_bias [P, d] on x's device in kernel dtypes, a finite scale."""
    _checks.kernel_tokens(op, "x", x)
    bsz, _, d = x.shape
    dev = x.device
    if residual is not None:
        _checks.kernel_tensor(op, "residual", residual, dev, shape=tuple(x.shape), dtypes=(x.dtype,))
    _checks.kernel_tensor(op, "profile", profile, dev, shape=(bsz,), dtypes=(torch.int64,))
    _checks.kernel_tensor(op, "down", down, dev, shape=(None, d, None))
    p, _, r = down.shape
    _checks.kernel_tensor(op, "down_bias", down_bias, dev, shape=(p, r))
    _checks.kernel_tensor(op, "up", up, dev, shape=(p, r, d))
    _checks.kernel_tensor(op, "up_bias", up_bias, dev, shape=(p, d))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    check_index_range(op, "profile", profile, p)
    return float(scale)


def xpeft_adapter(x, residual, profile, down, down_bias, up, up_bias, scale: float):
    """One launch (see ``ops/xpeft.py`` for the contract); every argument checked first."""
    scale = _check_args("xpeft_adapter (triton)", x, residual, profile, down, down_bias, up, up_bias, scale)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    profile, down, down_bias, up, up_bias = (t.contiguous() for t in (profile, down, down_bias, up, up_bias))
    bsz, n, d = x.shape
    r = down.shape[2]
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    interp = interpreting()
    native = not interp and x.dtype in _HALF and down.dtype == x.dtype and up.dtype == x.dtype
    h = torch.empty(bsz, n, max(r, 1), dtype=x.dtype if native else torch.float32, device=x.device)
    block_d, block_r, warps = (BLOCK_D, BLOCK_R, NUM_WARPS) if native or interp else (BLOCK_D_F32, BLOCK_R_F32,
                                                                                        NUM_WARPS_F32)
    grid = (bsz, cdiv(n, BLOCK_M))
    _xpeft_adapter_kernel[grid](x, x if residual is None else residual, profile, down, down_bias, up, up_bias, out,
                                h, n, d, r, scale, HAS_RES=residual is not None, NATIVE=native,
                                PREC="ieee" if interp else "tf32x3", BLOCK_M=BLOCK_M, BLOCK_D=block_d,
                                BLOCK_R=min(block_r, pow2(r, 16)), num_warps=warps)
    return out
