"""Triton forward of ``fpet_merge`` (``ops/fpet.py``); the backward is in ``fpet_triton_backward.py``.

ONE launch, grid (B, channel splits). Each program: checkerboard similarity tiles (chunked over the
metric dim D, ``triton_common.unit_scores``: any D runs) with a running
top-2 per A row (NaN scores skipped), the hard match (top1 column iff ``top1 > top2``, none on a
tie), the token map, the A rows grouped by their destination, and the size-weighted gather
of every B row (its matched A rows in ascending order). The forward matching is one-hot, so the
merge is a gather: no dense ``M^T x`` product.

``fpet_merge_rows`` (padded batches, issue 21; docs/semantics.md "Padded batches and threshold
merging") is the same kernel with ``PADDED``: a score with a size-0 token on either side is -inf,
padding maps to -1 and is never read (its B slot gathers only what maps to it), and a valid A token
of a row without a valid destination cell (grid B token) keeps output row ``P``.
"""
from __future__ import annotations

import torch

from .shapes import grid_sizes
from .triton_common import HAS_TRITON, channel_split, check_grid, check_merge_inputs, tl, triton

if HAS_TRITON:
    from .triton_common import (_source, checkerboard_a, checkerboard_b, destination_ranges, group_by_destination,
                                load_sizes, merge_destinations, row_norms, store_rounded, unit_scores)

    @triton.jit
    def _merge_rows_destinations(x_b, s_b, o_b, os_b, jj, vj, pos_j, sorted_ws, key_ws, n_keys, p, H, W, C, c_lo,
                                 c_hi, write_size, HAS_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
        """``merge_destinations`` (FPET) of a padded batch: a B row takes part in its own slot only where
        it is valid (size != 0); a padding B row is never read, so its slot holds exactly what maps to it."""
        start, cnt = destination_ranges(key_ws, n_keys, jj, BLOCK_K)
        cnt = tl.where(vj, cnt, 0)
        maxc = tl.max(cnt, 0)
        s_j = load_sizes(s_b, pos_j, vj, HAS_SIZE)
        own = vj & (s_j != 0)
        den = s_j
        for t in range(0, maxc):
            vt = t < cnt
            k, pos_s = _source(sorted_ws + start + t, vt, sorted_ws, p, H, W, True)
            den += load_sizes(s_b, pos_s, vt, HAS_SIZE)
        tl.store(os_b + jj, den, mask=vj & write_size)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < c_hi
            acc = tl.load(x_b + pos_j[:, None] * C + cc[None, :], mask=own[:, None] & vc[None, :],
                          other=0.0).to(tl.float32) * s_j[:, None]
            for t in range(0, maxc):
                vt = t < cnt
                k, pos_s = _source(sorted_ws + start + t, vt, sorted_ws, p, H, W, True)
                acc += tl.load(x_b + pos_s[:, None] * C + cc[None, :], mask=vt[:, None] & vc[None, :],
                               other=0.0).to(tl.float32) * load_sizes(s_b, pos_s, vt, HAS_SIZE)[:, None]
            ok = vj & (den != 0)  # a merged row whose sizes sum to 0 is 0 (docs/semantics.md)
            store_rounded(o_b + jj[:, None] * C + cc[None, :],
                          tl.where(ok[:, None], acc / tl.where(ok, den, 1.0)[:, None], 0.0),
                          vj[:, None] & vc[None, :])

    @triton.jit
    def _fpet_merge_kernel(x_ptr, m_ptr, s_ptr, out_ptr, osize_ptr, map_ptr, ws_ptr,
                           N, C, D, P, H, W, NA, NB, c_per,
                           HAS_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                           PADDED: tl.constexpr = False):
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
        if PADDED:  # whether the image has a valid destination cell (a grid B token of size != 0)
            n_dst = 0
            for j0 in range(0, NB, BLOCK):
                jj = j0 + tl.arange(0, BLOCK)
                vj = (jj < NB) & (jj >= P)
                n_dst += tl.sum((load_sizes(s_b, checkerboard_b(jj, P, H, W), vj, HAS_SIZE) != 0).to(tl.int32), 0)
            has_dst = n_dst > 0

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
                if PADDED:  # a score with a padding token on either side: -inf
                    va = load_sizes(s_b, pos_a, vi, HAS_SIZE) != 0
                    vb = load_sizes(s_b, pos_b, vj, HAS_SIZE) != 0
                    s = tl.where(va[:, None] & vb[None, :], s, float("-inf"))
                bmax = tl.max(s, 1)
                barg = tl.min(tl.where(s == bmax[:, None], jj[None, :], 2147483647), 1)
                bsec = tl.max(tl.where(jj[None, :] == barg[:, None], float("-inf"), s), 1)
                upd = bmax > t1
                t2 = tl.where(upd, tl.maximum(t1, bsec), tl.maximum(t2, bmax))
                arg = tl.where(upd, barg, arg)
                t1 = tl.where(upd, bmax, t1)
            match = tl.where(t1 > t2, arg, -1)
            if PADDED:  # padding maps to -1; a row without a valid destination cell keeps row P
                match = tl.where(load_sizes(s_b, pos_a, vi, HAS_SIZE) != 0, tl.where(has_dst, match, P), -1)
            tl.store(match_ws + ii, match, mask=vi)
            tl.store(map_ptr + b * N + pos_a, match.to(tl.int64), mask=vi & first)
        for j0 in range(0, NB, BLOCK):
            jj = j0 + tl.arange(0, BLOCK)
            row = jj
            if PADDED:
                row = tl.where(load_sizes(s_b, checkerboard_b(jj, P, H, W), jj < NB, HAS_SIZE) != 0, jj, -1)
            tl.store(map_ptr + b * N + checkerboard_b(jj, P, H, W), row.to(tl.int64), mask=(jj < NB) & first)
        tl.debug_barrier()

        # 2. group the A rows by destination (ascending A index within a destination)
        group_by_destination(match_ws, NA, sorted_ws, BLOCK)
        tl.debug_barrier()

        # 3. merge: every B row gathers its matched A rows, size-weighted; output in B order
        for j0 in range(0, NB, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            if PADDED:
                _merge_rows_destinations(x_b, s_b, o_b, os_b, jj, jj < NB, checkerboard_b(jj, P, H, W), sorted_ws,
                                         match_ws, NA, P, H, W, C, c_lo, c_hi, first, HAS_SIZE, BLOCK, BLOCK_C)
            else:
                merge_destinations(x_b, s_b, o_b, os_b, jj, jj < NB, checkerboard_b(jj, P, H, W), jj,
                                   sorted_ws, match_ws, NA, match_ws, ws_ptr, ws_ptr, P, H, W, C, c_lo, c_hi, first,
                                   HAS_SIZE, True, False, BLOCK, BLOCK_C)


def fpet_merge(x, metric, size, num_prefix, H, W, split=None, padded=False):
    """One launch: FPET matching and merge. Returns (out [B, Nb, C], out_size [B, Nb, 1] f32, token_map [B, N]).
    ``padded`` (``fpet_merge_rows``): tokens of size 0 are padding."""
    from . import tome_triton as cfg  # tile shapes shared with the ToMe kernel
    op = "fpet_merge_rows (triton)" if padded else "fpet_merge (triton)"
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
        PREC=cfg._prec(), PADDED=padded, num_warps=cfg.NUM_WARPS)
    return out, out_size, tmap


def fpet_merge_rows(x, metric, size, num_prefix, H, W, split=None):
    """``fpet_merge_rows``: :func:`fpet_merge` of a padded batch (tokens of size 0 are padding)."""
    return fpet_merge(x, metric, size, num_prefix, H, W, split, padded=True)
