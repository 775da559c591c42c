"""Triton FPET straight-through backward (``fpet_merge_backward``, spec section 2; csrc/README.md).

Same values as ``fpet.fpet_merge_backward_reference``; all arithmetic float32. With ``S`` the
cosine scores of the A and B rows, ``P = G soft (1 - soft)`` (``G = z_A g_num^T + s_A g_den^T``,
``soft = sigmoid(S - t)``, ``t`` the mean of each row's top-2) and the top-2 correction folded in,
``Q = P - rowsum(P) / 2 * onehot(top1 + top2)``, the metric gradient is ``dA_n = Q B_n``,
``dB_n = Q^T A_n`` through the normalisation (``(dn - n <n, dn>) / ||m||``, where
``<n_i, dn_i> = sum_j Q_ij S_ij``: computed with the scores, so the gradient rows are written
chunk by chunk). Four launches, every one over (image, block) grids:

1. ``_fpet_bwd_prep_kernel``, grid (B, N / BT): the L2 norm of every metric row (summed over D in
   BD chunks) and ``g_den[j] = -<grad_out[j], out[j]> / out_size[j] (+ grad_size[j])``.
2. ``_fpet_bwd_scores_kernel``, grid (B, Na / BI): per block of A rows, pass 1 over the B tiles:
   score tiles ``(m_A m_B^T) / (||m_A|| ||m_B||)`` (chunked over D; prefix columns -inf), running
   top-2 (lowest index first on ties); pass 2: ``G`` (a C-chunked ``tl.dot``), ``P`` written to a
   float32 ``[Na, Nb]`` workspace per image, the row sums, ``<n_i, dn_i>``, and this block's
   partial column sums of ``Q * S`` (for the B rows' ``<n_j, dn_j>``).
3. ``_fpet_bwd_metric_kernel``, grid (B, Na / BI + Nb / BJ): a block of A rows (``Q B_n``) or of
   B rows (``Q^T A_n``, and the column sums of step 2 added in block order), BD metric columns at a
   time, and the normalisation backward -> grad_metric.
4. ``_fpet_bwd_x_kernel``, grid (B, N / BT): with ``dest = token_map`` (the merged row of every
   token, -1 for an unmatched A token), ``g_z = grad_out[dest] / out_size[dest]``,
   ``grad_x = g_z * s``, ``grad_size = <g_z, x> + g_den[dest]``.

``fpet_merge_rows_backward`` (padded batches, issue 21): the same launches with ``PADDED``: a score
with a size-0 token on either side takes no part (-inf in pass 1, 0 in ``P``), and padding tokens
get zero ``grad_x`` / ``grad_size`` (their metric gradient is 0: their rows and columns of ``Q`` are).

No float atomics: every reduction runs in a fixed order (across blocks: partial results in a
workspace, summed in block order), so results are bit-reproducible. No register tile grows with D
or C: any metric dimension runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .shapes import grid_sizes
from .triton_common import HAS_TRITON, cdiv, check_grid, check_merge_inputs, interpreting, pow2, tl, triton

if HAS_TRITON:
    from .triton_common import checkerboard_a, checkerboard_b, load_sizes, store_rounded, unit_chunk

    @triton.jit
    def _raw_chunk(m_ptr, pos, valid, d0, D, BD: tl.constexpr):
        """Columns ``d0 .. d0 + BD`` of the metric rows at ``pos`` in their own dtype (0 outside)."""
        d = d0 + tl.arange(0, BD)
        return tl.load(m_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None] & (d < D)[None, :], other=0.0)

    @triton.jit
    def _cosine(m_ptr, pa, va, den_a, pb, vb, den_b, D, BD: tl.constexpr, NATIVE: tl.constexpr,
                PREC: tl.constexpr):
        """Score tile ``A_n B_n^T`` from raw rows: ``(m_A m_B^T) / (max(||m_A||, eps) max(||m_B||, eps))``,
        the dot accumulated over D in BD chunks. ``NATIVE`` (half metric on a GPU): the half products
        are exact, accumulated in float32 on tensor cores."""
        dot = tl.zeros([pa.shape[0], pb.shape[0]], tl.float32)
        for d0 in range(0, D, BD):
            ra = _raw_chunk(m_ptr, pa, va, d0, D, BD)
            rb = _raw_chunk(m_ptr, pb, vb, d0, D, BD)
            if NATIVE:
                dot += tl.dot(ra, tl.trans(rb))
            else:
                dot += tl.dot(ra.to(tl.float32), tl.trans(rb.to(tl.float32)), input_precision=PREC)
        return dot / den_a[:, None] / den_b[None, :]

    @triton.jit
    def _no_nan(v):
        """Rows of a NaN metric enter the gradient products as 0 (their dS entries are 0)."""
        return tl.where(v == v, v, 0.0)

    @triton.jit
    def _big(nrm):
        """Rows whose normalisation has a gradient: ``eps < ||m|| < inf`` (else 0, docs/semantics.md)."""
        return (nrm > 1e-12) & (nrm < float("inf"))

    @triton.jit
    def _fpet_bwd_prep_kernel(go_ptr, gsz_in_ptr, out_ptr, osz_ptr, m_ptr, gden_ptr, nrm_ptr, N, C, D, Nb,
                              HAS_GSIZE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
        img = tl.program_id(0).to(tl.int64)
        tt = tl.program_id(1) * BT + tl.arange(0, BT)
        vt = tt < N
        m_b = m_ptr + img * N * D
        ss = tl.zeros([BT], tl.float32)
        for d0 in range(0, D, BD):
            v = _raw_chunk(m_b, tt, vt, d0, D, BD).to(tl.float32)
            ss += tl.sum(v * v, 1)
        tl.store(nrm_ptr + img * N + tt, tl.sqrt(ss), mask=vt)
        vj = tt < Nb  # the B rows among these: g_den
        cc = tl.arange(0, BC)
        acc = tl.zeros([BT], tl.float32)
        for c0 in range(0, C, BC):
            c = c0 + cc
            msk = vj[:, None] & (c < C)[None, :]
            g = tl.load(go_ptr + img * Nb * C + tt[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
            o = tl.load(out_ptr + img * Nb * C + tt[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
            acc += tl.sum(g * o, 1)
        den = tl.load(osz_ptr + img * Nb + tt, mask=vj, other=1.0).to(tl.float32)
        gd = tl.where(den != 0, -acc / tl.where(den != 0, den, 1.0), 0.0)  # constant-0 rows: no gradient
        if HAS_GSIZE:
            gd += tl.load(gsz_in_ptr + img * Nb + tt, mask=vj, other=0.0).to(tl.float32)
        tl.store(gden_ptr + img * Nb + tt, gd, mask=vj)

    @triton.jit
    def _fpet_bwd_scores_kernel(
        go_ptr, osz_ptr, x_ptr, m_ptr, s_ptr, gden_ptr, nrm_ptr,  # inputs (gden, nrm: launch 1)
        p_ptr, rs_ptr, top_ptr, topv_ptr, proj_ptr, colp_ptr,  # workspace out
        N, C, D, Na, Nb, p, H, W,
        HAS_SIZE: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
        SCORE_PREC: tl.constexpr, GRAD_PREC: tl.constexpr, NATIVE_M: tl.constexpr, NATIVE_X: tl.constexpr,
        PADDED: tl.constexpr = False,
    ):
        img = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        go_ptr += img * Nb * C
        osz_ptr += img * Nb
        x_ptr += img * N * C
        m_ptr += img * N * D
        s_ptr += img * N
        gden_ptr += img * Nb
        nrm_ptr += img * N
        p_ptr += img * Na * Nb
        rs_ptr += img * Na
        top_ptr += img * 2 * Na
        topv_ptr += img * 2 * Na
        proj_ptr += img * Na
        colp_ptr += (img * tl.cdiv(Na, BI) + blk) * Nb

        cc = tl.arange(0, BC)
        ii = blk * BI + tl.arange(0, BI)
        vi = ii < Na
        pa = checkerboard_a(ii, p, H, W)
        den_a = tl.maximum(tl.load(nrm_ptr + pa, mask=vi, other=0.0), 1e-12)
        sa = load_sizes(s_ptr, pa, vi, HAS_SIZE)

        # pass 1: running top-2 of the score rows (tiles come in increasing j: ties keep the earlier)
        r1 = tl.full([BI], float("-inf"), tl.float32)
        r2 = tl.full([BI], float("-inf"), tl.float32)
        i1 = tl.zeros([BI], dtype=tl.int32)
        i2 = tl.zeros([BI], dtype=tl.int32)
        for j0 in range(0, Nb, BJ):
            jj = j0 + tl.arange(0, BJ)
            vj = jj < Nb
            pb = checkerboard_b(jj, p, H, W)
            den_b = tl.maximum(tl.load(nrm_ptr + pb, mask=vj, other=0.0), 1e-12)
            sc = _cosine(m_ptr, pa, vi, den_a, pb, vj, den_b, D, BD, NATIVE_M, SCORE_PREC)
            sc = tl.where((vj & (jj >= p))[None, :] & (sc == sc), sc, float("-inf"))  # NaN: skipped
            if PADDED:  # a score with a padding token on either side: -inf
                sc = tl.where((sa != 0)[:, None] & (load_sizes(s_ptr, pb, vj, HAS_SIZE) != 0)[None, :], sc,
                              float("-inf"))
            m1 = tl.max(sc, 1)
            j1 = tl.min(tl.where(sc == m1[:, None], jj[None, :], 2147483647), 1)
            not1 = jj[None, :] != j1[:, None]
            sc2 = tl.where(not1, sc, float("-inf"))
            m2 = tl.max(sc2, 1)
            j2 = tl.min(tl.where((sc2 == m2[:, None]) & not1, jj[None, :], 2147483647), 1)
            take = m1 > r1
            second_v = tl.where(take, tl.where(m2 > r1, m2, r1), tl.where(m1 > r2, m1, r2))
            second_i = tl.where(take, tl.where(m2 > r1, j2, i1), tl.where(m1 > r2, j1, i2))
            r1 = tl.where(take, m1, r1)
            i1 = tl.where(take, j1, i1)
            r2 = second_v
            i2 = second_i
        t = (r1 + r2) * 0.5
        i1 = tl.where(r1 > float("-inf"), i1, -1)  # a top entry exists only as a valid score
        i2 = tl.where(r2 > float("-inf"), i2, -1)

        # pass 2: P = G * soft * (1 - soft), tile by tile, to the workspace
        rowsum = tl.zeros([BI], dtype=tl.float32)
        ps = tl.zeros([BI], dtype=tl.float32)
        for j0 in range(0, Nb, BJ):
            jj = j0 + tl.arange(0, BJ)
            vj = jj < Nb
            g = tl.zeros([BI, BJ], dtype=tl.float32)
            for c0 in range(0, C, BC):
                c = c0 + cc
                c_ok = c < C
                xa = tl.load(x_ptr + pa[:, None] * C + c[None, :], mask=vi[:, None] & c_ok[None, :], other=0.0)
                gn = tl.load(go_ptr + jj[:, None] * C + c[None, :], mask=vj[:, None] & c_ok[None, :], other=0.0)
                if NATIVE_X:  # half x and grad_out: exact products, float32 accumulation
                    g += tl.dot(xa, tl.trans(gn))
                else:
                    g += tl.dot(xa.to(tl.float32), tl.trans(gn.to(tl.float32)), input_precision=GRAD_PREC)
            den = tl.load(osz_ptr + jj, mask=vj, other=1.0).to(tl.float32)
            gd = tl.load(gden_ptr + jj, mask=vj, other=0.0)
            # G = <x_A s_A, grad_out / out_size> + s_A g_den
            g = sa[:, None] * (tl.where((den != 0)[None, :], g / tl.where(den != 0, den, 1.0)[None, :], 0.0)
                               + gd[None, :])
            pb = checkerboard_b(jj, p, H, W)
            den_b = tl.maximum(tl.load(nrm_ptr + pb, mask=vj, other=0.0), 1e-12)
            sc = _cosine(m_ptr, pa, vi, den_a, pb, vj, den_b, D, BD, NATIVE_M, SCORE_PREC)
            live = vi[:, None] & (vj & (jj >= p))[None, :] & (sc == sc)
            if PADDED:
                live = live & (sa != 0)[:, None] & (load_sizes(s_ptr, pb, vj, HAS_SIZE) != 0)[None, :]
            soft = 1.0 / (1.0 + tl.exp(t[:, None] - tl.where(live, sc, 0.0)))
            pm = tl.where(live, g * soft * (1.0 - soft), 0.0)
            rowsum += tl.sum(pm, 1)
            qs = tl.where(live, pm * sc, 0.0)
            ps += tl.sum(qs, 1)
            tl.store(colp_ptr + jj, tl.sum(qs, 0), mask=vj)
            tl.store(p_ptr + ii[:, None] * Nb + jj[None, :], pm, mask=vi[:, None] & vj[None, :])
        # the top-2 correction: <n_i, dn_i> = sum_j P_ij S_ij - rowsum_i / 2 (S_i,top1 + S_i,top2)
        topsum = tl.where(i1 >= 0, r1, 0.0) + tl.where(i2 >= 0, r2, 0.0)
        tl.store(proj_ptr + ii, ps - 0.5 * rowsum * topsum, mask=vi)
        tl.store(rs_ptr + ii, rowsum, mask=vi)
        tl.store(top_ptr + ii, i1, mask=vi)
        tl.store(top_ptr + Na + ii, i2, mask=vi)
        tl.store(topv_ptr + ii, tl.where(i1 >= 0, r1, 0.0), mask=vi)
        tl.store(topv_ptr + Na + ii, tl.where(i2 >= 0, r2, 0.0), mask=vi)

    @triton.jit
    def _q_tile(p_ptr, rs_ptr, top_ptr, ii, vi, jj, vj, Na, Nb):
        """Tile of ``Q = P - rowsum / 2 * onehot(top1 + top2)`` (rows ii, columns jj), 0 outside."""
        q = tl.load(p_ptr + ii[:, None] * Nb + jj[None, :], mask=vi[:, None] & vj[None, :], other=0.0)
        rs = tl.load(rs_ptr + ii, mask=vi, other=0.0)
        k1 = tl.load(top_ptr + ii, mask=vi, other=-1)
        k2 = tl.load(top_ptr + Na + ii, mask=vi, other=-1)
        hit = (k1[:, None] == jj[None, :]).to(tl.float32) + (k2[:, None] == jj[None, :]).to(tl.float32)
        return q - 0.5 * rs[:, None] * hit

    @triton.jit
    def _fpet_bwd_metric_kernel(
        m_ptr, nrm_ptr, p_ptr, rs_ptr, top_ptr, topv_ptr, proj_ptr, colp_ptr,  # inputs (workspace of 1, 2)
        gm_ptr,  # output: grad_metric [B, N, D]
        N, D, Na, Nb, p, H, W,
        BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, GRAD_PREC: tl.constexpr,
    ):
        img = tl.program_id(0).to(tl.int64)
        pid = tl.program_id(1)
        nib = tl.cdiv(Na, BI)
        m_ptr += img * N * D
        gm_ptr += img * N * D
        nrm_ptr += img * N
        p_ptr += img * Na * Nb
        rs_ptr += img * Na
        top_ptr += img * 2 * Na
        topv_ptr += img * 2 * Na
        proj_ptr += img * Na
        colp_ptr += img * nib * Nb
        dd = tl.arange(0, BD)
        if pid < nib:
            # a block of A rows: dA_n = Q B_n
            ii = pid * BI + tl.arange(0, BI)
            vi = ii < Na
            pa = checkerboard_a(ii, p, H, W)
            nrm_a = tl.load(nrm_ptr + pa, mask=vi, other=0.0)
            big = _big(nrm_a)
            proj = tl.load(proj_ptr + ii, mask=vi, other=0.0)
            for d0 in range(0, D, BD):
                acc = tl.zeros([BI, BD], tl.float32)
                for j0 in range(0, Nb, BJ):
                    jj = j0 + tl.arange(0, BJ)
                    vj = jj < Nb
                    pb = checkerboard_b(jj, p, H, W)
                    den_b = tl.maximum(tl.load(nrm_ptr + pb, mask=vj, other=0.0), 1e-12)
                    bn = _no_nan(unit_chunk(m_ptr, pb, vj, den_b, d0, D, BD))
                    acc += tl.dot(_q_tile(p_ptr, rs_ptr, top_ptr, ii, vi, jj, vj, Na, Nb), bn,
                                  input_precision=GRAD_PREC)
                an = _no_nan(unit_chunk(m_ptr, pa, vi, tl.maximum(nrm_a, 1e-12), d0, D, BD))
                gm = tl.where(big[:, None], (acc - an * proj[:, None]) / tl.where(big, nrm_a, 1.0)[:, None], 0.0)
                store_rounded(gm_ptr + pa[:, None] * D + (d0 + dd)[None, :], gm, vi[:, None] & (d0 + dd < D)[None, :])
        else:
            # a block of B rows: dB_n = Q^T A_n
            jj = (pid - nib) * BJ + tl.arange(0, BJ)
            vj = jj < Nb
            pb = checkerboard_b(jj, p, H, W)
            nrm_b = tl.load(nrm_ptr + pb, mask=vj, other=0.0)
            big = _big(nrm_b)
            # <n_j, dn_j> = sum_i Q_ij S_ij: the blocks' column sums of P S (block order), less the correction
            proj = tl.zeros([BJ], tl.float32)
            corr = tl.zeros([BJ], tl.float32)
            for blk in range(0, nib):
                proj += tl.load(colp_ptr + blk * Nb + jj, mask=vj, other=0.0)
                ii = blk * BI + tl.arange(0, BI)
                vi = ii < Na
                rs = tl.load(rs_ptr + ii, mask=vi, other=0.0)
                k1 = tl.load(top_ptr + ii, mask=vi, other=-1)
                k2 = tl.load(top_ptr + Na + ii, mask=vi, other=-1)
                v1 = tl.load(topv_ptr + ii, mask=vi, other=0.0)
                v2 = tl.load(topv_ptr + Na + ii, mask=vi, other=0.0)
                hs = (tl.where(k1[None, :] == jj[:, None], v1[None, :], 0.0)
                      + tl.where(k2[None, :] == jj[:, None], v2[None, :], 0.0))
                corr += tl.sum(hs * rs[None, :], 1)
            proj = proj - 0.5 * corr
            for d0 in range(0, D, BD):
                acc = tl.zeros([BJ, BD], tl.float32)
                for i0 in range(0, Na, BI):
                    ii = i0 + tl.arange(0, BI)
                    vi = ii < Na
                    pa = checkerboard_a(ii, p, H, W)
                    den_a = tl.maximum(tl.load(nrm_ptr + pa, mask=vi, other=0.0), 1e-12)
                    an = _no_nan(unit_chunk(m_ptr, pa, vi, den_a, d0, D, BD))
                    acc += tl.dot(tl.trans(_q_tile(p_ptr, rs_ptr, top_ptr, ii, vi, jj, vj, Na, Nb)), an,
                                  input_precision=GRAD_PREC)
                bn = _no_nan(unit_chunk(m_ptr, pb, vj, tl.maximum(nrm_b, 1e-12), d0, D, BD))
                gm = tl.where(big[:, None], (acc - bn * proj[:, None]) / tl.where(big, nrm_b, 1.0)[:, None], 0.0)
                store_rounded(gm_ptr + pb[:, None] * D + (d0 + dd)[None, :], gm, vj[:, None] & (d0 + dd < D)[None, :])

    @triton.jit
    def _fpet_bwd_x_kernel(
        go_ptr, osz_ptr, gden_ptr, x_ptr, s_ptr, tmap_ptr,  # inputs (gden: launch 1's workspace)
        gx_ptr, gsz_ptr,  # outputs: grad_x [B, N, C], grad_size [B, N, 1] float32
        N, C, Nb,
        HAS_SIZE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PADDED: tl.constexpr = False,
    ):
        img = tl.program_id(0).to(tl.int64)
        go_ptr += img * Nb * C
        osz_ptr += img * Nb
        gden_ptr += img * Nb
        x_ptr += img * N * C
        gx_ptr += img * N * C
        s_ptr += img * N
        gsz_ptr += img * N
        tmap_ptr += img * N

        tt = tl.program_id(1) * BT + tl.arange(0, BT)
        vt = tt < N
        dest = tl.load(tmap_ptr + tt, mask=vt, other=-1).to(tl.int32)
        s = load_sizes(s_ptr, tt, vt, HAS_SIZE)
        hit = vt & (dest >= 0)
        if PADDED:  # a padding token gets no gradient, whatever the map says
            hit = hit & (s != 0)
        dest = tl.where(hit, dest, 0)
        den = tl.load(osz_ptr + dest, mask=hit, other=0.0).to(tl.float32)
        gd = tl.load(gden_ptr + dest, mask=hit, other=0.0)
        ok = den != 0  # an output row of merged size 0 is the constant 0: no gradient
        den = tl.where(ok, den, 1.0)
        cc = tl.arange(0, BC)
        acc = tl.zeros([BT], dtype=tl.float32)
        for c0 in range(0, C, BC):
            c = c0 + cc
            c_ok = c < C
            gz = tl.load(go_ptr + dest[:, None] * C + c[None, :], mask=hit[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32) / den[:, None]
            gz = tl.where(ok[:, None], gz, 0.0)
            msk = vt[:, None] & c_ok[None, :]
            xv = tl.load(x_ptr + tt[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(hit[:, None], gz * xv, 0.0), 1)  # a dropped token: exactly 0
            store_rounded(gx_ptr + tt[:, None] * C + c[None, :], tl.where(hit[:, None], gz * s[:, None], 0.0), msk)
        tl.store(gsz_ptr + tt, acc + gd, mask=vt)


# ----------------------------------------------------------------------------- launch configuration
_HALF = (torch.float16, torch.bfloat16)
BLOCK_D = 64  # metric columns per step (any D runs, in chunks)


def _config(na: int, nb: int, c: int, d: int, interp: bool, x_dtype, go_dtype, m_dtype,
            block_i=None, block_j=None, block_c=None, block_d=None) -> dict:
    """Tile sizes, warps and dot precisions of the launches (interpreter: 64-wide tiles, fewer steps).

    Dots whose operands are half inputs (x . grad_out, metric . metric) run natively on GPU tensor
    cores (products exact, float32 accumulation); float32 operands use ``tf32x3`` there (~float32
    accuracy). The interpreter computes every dot in float32 "ieee" (its bf16 dot is wrong)."""
    tile = 64 if interp else 32  # GPU: 32 x 32 score tiles (registers and spills per launch: bench/aot_check.py)
    cfg = dict(
        BI=block_i or min(tile, pow2(na)), BJ=block_j or min(tile, pow2(nb)),
        BC=block_c or min(tile, pow2(c)),
        # 3xTF32 score chunks of a float32 metric: 32 columns (64 spill 40 bytes at 8 warps on sm_90)
        BD=block_d or min(BLOCK_D if interp or m_dtype in _HALF else 32, pow2(d, 16)),
        BT=32, BC_X=min(64 if not interp else 256, pow2(c)),
        # sm_90 (bench/aot_check.py): 3xTF32 tiles (float32 operands) spill at 4 warps, half ones do not
        warps_scores=4 if x_dtype in _HALF and m_dtype in _HALF and go_dtype == x_dtype else 8,
        warps_metric=8, warps_x=4,
        SCORE_PREC="ieee" if interp else "tf32x3",
        GRAD_PREC="ieee" if interp else "tf32x3",
        NATIVE_M=not interp and m_dtype in _HALF,
        NATIVE_X=not interp and x_dtype in _HALF and go_dtype == x_dtype,
    )
    return cfg


def fpet_merge_backward(grad_out: Tensor, grad_size: Optional[Tensor], x: Tensor, metric: Tensor,
                        size: Optional[Tensor], out: Tensor, out_size: Tensor, token_map: Tensor,
                        num_prefix: int, H: int, W: int, *, block_i: Optional[int] = None,
                        block_j: Optional[int] = None, block_c: Optional[int] = None,
                        block_d: Optional[int] = None, padded: bool = False):
    """Straight-through FPET backward; returns ``(grad_x [B,N,C] x.dtype, grad_metric [B,N,D]
    metric.dtype, grad_size [B,N,1] float32)``, the values of ``fpet_merge_backward_reference``.
    ``block_*`` override the tile sizes (powers of two, >= 32 for i / j / c, >= 16 for d; tests use
    them to span several tiles). ``padded`` (``fpet_merge_rows_backward``): tokens of size 0 are padding."""
    name = "fpet_merge_rows_backward" if padded else "fpet_merge_backward"
    if not HAS_TRITON:
        raise RuntimeError(f"{name} (triton): triton is not installed")
    op = f"{name} (triton)"
    bsz, n, c, d = check_merge_inputs(op, x, metric, size)
    check_grid(op, n, num_prefix, H, W)
    na, nb = grid_sizes(num_prefix, H, W)
    dev = x.device
    for name, t, shape in (("grad_out", grad_out, (bsz, nb, c)), ("out", out, (bsz, nb, c)),
                           ("out_size", out_size, (bsz, nb, 1))):
        _checks.kernel_tensor(op, name, t, dev, shape=shape)
    if grad_size is not None:
        _checks.kernel_tensor(op, "grad_size", grad_size, dev, shape=(bsz, nb, 1))
    _checks.kernel_map(op, token_map, dev, (bsz, n), nb)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_metric = torch.empty_like(metric, memory_format=torch.contiguous_format)
    grad_s = torch.empty(bsz, n, 1, dtype=torch.float32, device=dev)
    if bsz == 0 or n == 0:
        return grad_x, grad_metric, grad_s

    x, metric, grad_out, out = x.contiguous(), metric.contiguous(), grad_out.contiguous(), out.contiguous()
    out_size, token_map = out_size.contiguous(), token_map.contiguous()
    size = None if size is None else size.contiguous()
    grad_size = None if grad_size is None else grad_size.contiguous()

    interp = interpreting()
    cfg = _config(na, nb, c, d, interp, x.dtype, grad_out.dtype, metric.dtype, block_i, block_j, block_c, block_d)
    bi, bj = cfg["BI"], cfg["BJ"]
    nib, njb = cdiv(na, bi), cdiv(nb, bj)
    f32 = dict(dtype=torch.float32, device=dev)
    g_den = torch.empty(bsz, nb, **f32)
    nrm = torch.empty(bsz, n, **f32)                       # L2 norm of every metric row
    p_ws = torch.empty(bsz, na, nb, **f32)                 # P = G soft (1 - soft)
    rs_ws, proj_ws = torch.empty(bsz, na, **f32), torch.empty(bsz, na, **f32)
    top_ws = torch.empty(bsz, 2, na, dtype=torch.int32, device=dev)
    topv_ws = torch.empty(bsz, 2, na, **f32)
    colp_ws = torch.empty(bsz, nib, nb, **f32)             # per A block: column sums of P S
    s = x if size is None else size

    _fpet_bwd_prep_kernel[(bsz, cdiv(n, cfg["BT"]))](
        grad_out, x if grad_size is None else grad_size, out, out_size, metric, g_den, nrm, n, c, d, nb,
        HAS_GSIZE=grad_size is not None, BT=cfg["BT"], BC=cfg["BC_X"], BD=cfg["BD"], num_warps=cfg["warps_x"])
    if nib > 0:
        _fpet_bwd_scores_kernel[(bsz, nib)](
            grad_out, out_size, x, metric, s, g_den, nrm, p_ws, rs_ws, top_ws, topv_ws, proj_ws, colp_ws,
            n, c, d, na, nb, num_prefix, H, W,
            HAS_SIZE=size is not None, BI=bi, BJ=bj, BC=cfg["BC"], BD=cfg["BD"],
            SCORE_PREC=cfg["SCORE_PREC"], GRAD_PREC=cfg["GRAD_PREC"], NATIVE_M=cfg["NATIVE_M"],
            NATIVE_X=cfg["NATIVE_X"], PADDED=padded, num_warps=cfg["warps_scores"])
    _fpet_bwd_metric_kernel[(bsz, nib + njb)](
        metric, nrm, p_ws, rs_ws, top_ws, topv_ws, proj_ws, colp_ws, grad_metric, n, d, na, nb, num_prefix, H, W,
        BI=bi, BJ=bj, BD=cfg["BD"], GRAD_PREC=cfg["GRAD_PREC"], num_warps=cfg["warps_metric"])
    _fpet_bwd_x_kernel[(bsz, cdiv(n, cfg["BT"]))](
        grad_out, out_size, g_den, x, s, token_map,
        grad_x, grad_s, n, c, nb,
        HAS_SIZE=size is not None, BT=cfg["BT"], BC=cfg["BC_X"], PADDED=padded,
        num_warps=cfg["warps_x"],
    )
    return grad_x, grad_metric, grad_s


def fpet_merge_rows_backward(grad_out: Tensor, grad_size: Optional[Tensor], x: Tensor, metric: Tensor,
                             size: Optional[Tensor], out: Tensor, out_size: Tensor, token_map: Tensor,
                             num_prefix: int, H: int, W: int, **blocks):
    """``fpet_merge_rows_backward``: :func:`fpet_merge_backward` of a padded batch (``padded=True``)."""
    return fpet_merge_backward(grad_out, grad_size, x, metric, size, out, out_size, token_map, num_prefix, H, W,
                               padded=True, **blocks)
