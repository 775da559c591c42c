"""Triton forward of ``fpet_merge`` (``ops/fpet.py``); the backward is in ``fpet_triton_backward.py``.

ONE launch, grid (B, channel splits). Each program: checkerboard similarity tiles (chunked over the
metric dim D, ``triton_common.unit_scores``: any D runs) with a running
top-2 per A row (NaN scores skipped), the hard match (top1 column iff ``top1 > top2``, none on a
tie), the token map, the A rows grouped by their destination, and the size-weighted gather
of every B row (its matched A rows in ascending order). The forward matching is one-hot, so the
merge is a gather: no dense ``M^T x`` product.
"""
from __future__ import annotations

import torch

from .shapes import grid_sizes
from .triton_common import HAS_TRITON, channel_split, check_grid, check_merge_inputs, tl, triton

if HAS_TRITON:
    from .triton_common import (checkerboard_a, checkerboard_b, group_by_destination, merge_destinations, row_norms,
                                unit_scores)

    @triton.jit
    def _fpet_merge_kernel(x_ptr, m_ptr, s_ptr, out_ptr, osize_ptr, map_ptr, ws_ptr,
                           N, C, D, P, H, W, NA, NB, c_per,
                           HAS_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1)
        first = pc == 0
        c_lo = pc * c_per
        c_hi = tl.minimum(c_lo + c_per, C)
        g = b * tl.num_programs(1) + pc
        x_b = x_ptr + b * N * C
        m_b = m_ptr + b * N * D
        s_b = s_ptr + b * N
        o_b = out_ptr + b * NB * C
        os_b = osize_ptr + b * NB
        match_ws = ws_ptr + g * 2 * NA   # [Na] B index each A row merges into, -1: none
        sorted_ws = match_ws + NA        # [Na] A indices grouped by destination

        # 1. match: running top-2 over the B tiles (NaN scores skipped); hard match iff top1 > top2
        for i0 in range(0, NA, BLOCK):
            ii = i0 + tl.arange(0, BLOCK)
            vi = ii < NA
            pos_a = checkerboard_a(ii, P, H, W)
            den_a = row_norms(m_b, pos_a, vi, D, BLOCK_D)
            t1 = tl.full([BLOCK], float("-inf"), tl.float32)
            t2 = tl.full([BLOCK], float("-inf"), tl.float32)
            arg = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, NB, BLOCK):
                jj = j0 + tl.arange(0, BLOCK)
                vj = jj < NB
                pos_b = checkerboard_b(jj, P, H, W)
                s = unit_scores(m_b, pos_a, vi, den_a, pos_b, vj, row_norms(m_b, pos_b, vj, D, BLOCK_D), D, BLOCK_D,
                                PREC)
                s = tl.where(((jj < P) | (jj >= NB))[None, :] | (ii < 0)[:, None] | (s != s), float("-inf"), s)
                bmax = tl.max(s, 1)
                barg = tl.min(tl.where(s == bmax[:, None], jj[None, :], 2147483647), 1)
                bsec = tl.max(tl.where(jj[None, :] == barg[:, None], float("-inf"), s), 1)
                upd = bmax > t1
                t2 = tl.where(upd, tl.maximum(t1, bsec), tl.maximum(t2, bmax))
                arg = tl.where(upd, barg, arg)
                t1 = tl.where(upd, bmax, t1)
            match = tl.where(t1 > t2, arg, -1)
            tl.store(match_ws + ii, match, mask=vi)
            tl.store(map_ptr + b * N + pos_a, match.to(tl.int64), mask=vi & first)
        for j0 in range(0, NB, BLOCK):
            jj = j0 + tl.arange(0, BLOCK)
            tl.store(map_ptr + b * N + checkerboard_b(jj, P, H, W), jj.to(tl.int64), mask=(jj < NB) & first)
        tl.debug_barrier()

        # 2. group the A rows by destination (ascending A index within a destination)
        group_by_destination(match_ws, NA, sorted_ws, BLOCK)
        tl.debug_barrier()

        # 3. merge: every B row gathers its matched A rows, size-weighted; output in B order
        for j0 in range(0, NB, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            merge_destinations(x_b, s_b, o_b, os_b, jj, jj < NB, checkerboard_b(jj, P, H, W), jj,
                               sorted_ws, match_ws, NA, match_ws, ws_ptr, ws_ptr, P, H, W, C, c_lo, c_hi, first,
                               HAS_SIZE, True, False, BLOCK, BLOCK_C)


def fpet_merge(x, metric, size, num_prefix, H, W, split=None):
    """One launch: FPET matching and merge. Returns (out [B, Nb, C], out_size [B, Nb, 1] f32, token_map [B, N])."""
    from . import tome_triton as cfg  # tile shapes shared with the ToMe kernel
    op = "fpet_merge (triton)"
    check_merge_inputs(op, x, metric, size)
    check_grid(op, x.shape[1], num_prefix, H, W)
    x, metric = x.contiguous(), metric.contiguous()
    size = None if size is None else size.contiguous()
    bsz, n, c = x.shape
    d = metric.shape[-1]
    na, nb = grid_sizes(num_prefix, H, W)
    dev = x.device
    out = torch.empty(bsz, nb, c, dtype=x.dtype, device=dev)
    out_size = torch.empty(bsz, nb, 1, dtype=torch.float32, device=dev)
    tmap = torch.empty(bsz, n, dtype=torch.int64, device=dev)
    if bsz == 0:
        return out, out_size, tmap
    splits, c_per = channel_split(bsz, c, cfg.BLOCK_C, dev, cfg.SPLIT if split is None else split)
    ws = torch.empty(bsz * splits, 2 * na, dtype=torch.int32, device=dev)
    s, has_size = (size, True) if size is not None else (x, False)
    _fpet_merge_kernel[(bsz, splits)](
        x, metric, s, out, out_size, tmap, ws, n, c, d, num_prefix, H, W, na, nb, c_per,
        HAS_SIZE=has_size, BLOCK_D=cfg.block_d(d), BLOCK=cfg.BLOCK, BLOCK_J=cfg.BLOCK_J, BLOCK_C=cfg.BLOCK_C,
        PREC=cfg._prec(), num_warps=cfg.NUM_WARPS)
    return out, out_size, tmap
