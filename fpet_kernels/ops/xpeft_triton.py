"""Triton kernel of ``xpeft_adapter`` (``ops/xpeft.py``): one program per (batch row, tile of
tokens) reads its row's profile id and applies that profile's combined adapter, down-projection,
ReLU, up-projection and residual add, with the hidden activations [tile, r] kept in registers:

    h = relu(x_tile @ down[p] + down_bias[p])            (loop over d in blocks)
    out_tile = residual_tile + scale * (h @ up[p] + up_bias[p])

Rows of different profiles run side by side in the same launch (the grid covers every row);
the weights of a profile are read by all of its programs from L2. float32 arithmetic
(``tl.dot`` in IEEE precision), stored in x's dtype.
"""
from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, cdiv, pow2, tl, triton

BLOCK_M = 32
BLOCK_D = 64

if HAS_TRITON:
    from .triton_common import store_rounded

    @triton.jit
    def _xpeft_adapter_kernel(x_ptr, res_ptr, prof_ptr, down_ptr, db_ptr, up_ptr, ub_ptr, out_ptr, N, D, R, scale,
                              HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                              R_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        nn = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        vn = nn < N
        p = tl.load(prof_ptr + b).to(tl.int64)
        rr = tl.arange(0, R_PAD)
        vr = rr < R
        dd = tl.arange(0, BLOCK_D)
        rows = (b * N + nn)[:, None] * D
        h = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            vd = (d0 + dd) < D
            xt = tl.load(x_ptr + rows + (d0 + dd)[None, :], mask=vn[:, None] & vd[None, :], other=0.0)
            w = tl.load(down_ptr + p * D * R + (d0 + dd)[:, None] * R + rr[None, :], mask=vd[:, None] & vr[None, :],
                        other=0.0)
            h += tl.dot(xt.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        a = tl.load(db_ptr + p * R + rr, mask=vr, other=0.0).to(tl.float32)
        h = tl.maximum(h + a[None, :], 0.0)
        for d0 in range(0, D, BLOCK_D):
            vd = (d0 + dd) < D
            m2 = vn[:, None] & vd[None, :]
            u = tl.load(up_ptr + p * R * D + rr[:, None] * D + (d0 + dd)[None, :], mask=vr[:, None] & vd[None, :],
                        other=0.0)
            y = tl.dot(h, u.to(tl.float32), input_precision="ieee")
            ub = tl.load(ub_ptr + p * D + d0 + dd, mask=vd, other=0.0).to(tl.float32)
            if HAS_RES:
                res = tl.load(res_ptr + rows + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32)
            else:
                res = tl.load(x_ptr + rows + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32)
            store_rounded(out_ptr + rows + (d0 + dd)[None, :], res + scale * (y + ub[None, :]), m2)


def xpeft_adapter(x, residual, profile, down, down_bias, up, up_bias, scale: float):
    """One launch; contiguous inputs (see ``ops/xpeft.py`` for the contract)."""
    bsz, n, d = x.shape
    r = down.shape[2]
    out = torch.empty_like(x)
    if bsz == 0 or n == 0 or d == 0:
        return out
    grid = (bsz, cdiv(n, BLOCK_M))
    _xpeft_adapter_kernel[grid](x, x if residual is None else residual, profile, down, down_bias, up, up_bias, out,
                                n, d, r, float(scale), HAS_RES=residual is not None, BLOCK_M=BLOCK_M,
                                BLOCK_D=BLOCK_D, R_PAD=pow2(r, 16))
    return out
