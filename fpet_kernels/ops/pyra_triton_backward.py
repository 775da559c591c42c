"""Triton PYRA backward (``pyra_merge_backward``, spec section 3; csrc/README.md).

Same values as ``pyra.pyra_merge_backward_reference``; all arithmetic float32. Nothing of the
forward but its output is kept: the LayerNorm statistics and both weights are recomputed from ``x``
and the matching (``src_idx``, ``dst_idx``, ``unm_idx``). Three launches:

1. ``_pyra_bwd_stats_kernel`` and ``_pyra_bwd_params_kernel``, grid (B, r / BLOCK_K): one program
   per block of sources of an image (k: the r sources in rank order, S = z_A[src_k], T = z_B[dst_k],
   z = x * s, G = g_num of k's destination row, g_num = grad_out / out_size,
   0 where out_size is 0):
   (a) mean and rstd of ``y = S + T`` over C, ``wt = 2 sigmoid(<W, b>) - 1`` with
       ``W = (y - mean) rstd ln_w + ln_b``;
   (b) this block's partial sums of ``u = sum_k a_k W[k]`` and ``g_wc = sum_k G S wt_k`` per channel,
       to a workspace ``[B, r / BLOCK_K, 2, C]``;
   -- second launch --
   (c) ``wc = 2 sigmoid(u)``, ``g_u = g_wc wc (1 - wc / 2)`` from the blocks' partials added in
       block order (every program the same sums; the first block also stores them for step 2);
       ``g_wt = <G S, wc>`` -> ``g_v``, ``grad_a = <g_u, W>``, and the LayerNorm backward's two
       row means of ``g_yh = (a g_u + g_v b) ln_w``;
   (d) this block's partial sums of ``grad_b``, ``grad_ln_weight``, ``grad_ln_bias``;
   (e) (first block) the sources grouped by destination (stable counting sort, rank order).
   The parameter gradients are per (image, block) partial sums, summed afterwards by ``torch.sum``
   in a fixed order.
2. ``_pyra_bwd_tokens_kernel``, one program per (image, block of tokens of one kind): the tokens are enumerated
   as the unmerged slots, then the sources (rank order), then the B rows; each gets ``g_z`` (its
   row's ``g_num``; a source adds ``G wc wt_k + g_y[k]``; a B row adds the ``g_y`` of its sources in
   rank order), ``grad_x = g_z s`` and ``grad_size = <g_z, x> - <g_num, out> + grad_out_size`` of its
   output row.

No float atomics: every reduction has a fixed order, so results are bit-reproducible.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .triton_common import HAS_TRITON, cdiv, interpreting, tl, triton

if HAS_TRITON:
    from .tome_triton import _out_row_b
    from .triton_common import destination_ranges, group_by_destination, load_sizes, store_rounded

    @triton.jit
    def _z_rows(x_b, s_b, pos, valid, cc, vc, C, HAS_SIZE: tl.constexpr):
        """z = x * s at token positions ``pos``, channels ``cc``: float32 [BLOCK, BLOCK_C], 0 where invalid."""
        v = tl.load(x_b + pos[:, None] * C + cc[None, :], mask=valid[:, None] & vc[None, :], other=0.0)
        return v.to(tl.float32) * load_sizes(s_b, pos, valid, HAS_SIZE)[:, None]

    @triton.jit
    def _gnum_rows(go_b, os_b, row, valid, cc, vc, C):
        """g_num = grad_out / out_size at output rows ``row``, float32, 0 where invalid or where
        out_size is 0 (a merged row whose sizes sum to 0 is the constant 0)."""
        g = tl.load(go_b + row[:, None] * C + cc[None, :], mask=valid[:, None] & vc[None, :], other=0.0)
        den = tl.load(os_b + row, mask=valid, other=1.0).to(tl.float32)
        zero = den == 0.0
        return tl.where(zero[:, None], 0.0, g.to(tl.float32) / tl.where(zero, 1.0, den)[:, None])

    @triton.jit
    def _y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE: tl.constexpr):
        """y = S + T of sources with A rows ``si`` and destinations ``dj``."""
        return (_z_rows(x_b, s_b, 2 * si, vk, cc, vc, C, HAS_SIZE)
                + _z_rows(x_b, s_b, 2 * dj + 1, vk, cc, vc, C, HAS_SIZE))

    @triton.jit
    def _ln_channels(lw_ptr, lb_ptr, c0, C, BLOCK_C: tl.constexpr):
        """Channels ``c0 .. c0 + BLOCK_C``: (cc, valid, LayerNorm weight and bias in float32)."""
        cc = c0 + tl.arange(0, BLOCK_C)
        vc = cc < C
        lw = tl.load(lw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + cc, mask=vc, other=0.0).to(tl.float32)
        return cc, vc, lw, lb

    @triton.jit
    def _source_block(src_b, dst_b, mean_ws, rstd_ws, a_ptr, k0, r, BLOCK_K: tl.constexpr):
        """Sources ``k0 .. k0 + BLOCK_K`` of one image: (kk, valid, A rows, destinations, LayerNorm mean
        and rstd of the forward (from the workspace), a[k] in float32)."""
        kk = k0 + tl.arange(0, BLOCK_K)
        vk = kk < r
        si = tl.load(src_b + kk, mask=vk, other=0)
        dj = tl.load(dst_b + kk, mask=vk, other=0)
        mean = tl.load(mean_ws + kk, mask=vk, other=0.0)
        rstd = tl.load(rstd_ws + kk, mask=vk, other=0.0)
        ak = tl.load(a_ptr + kk, mask=vk, other=0.0).to(tl.float32)
        return kk, vk, si, dj, mean, rstd, ak

    @triton.jit
    def _grad_y(x_b, s_b, si, dj, vk, mean, rstd, gv, m1, m2, ak, gu, bv, lw, cc, vc, C, HAS_SIZE: tl.constexpr):
        """The LayerNorm backward of the sources: g_y = rstd (g_yh - m1 - yh m2), g_yh = (a g_u + g_v b) ln_w."""
        yh = (_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
        gyh = (ak[:, None] * gu[None, :] + gv[:, None] * bv[None, :]) * lw[None, :]
        gy = rstd[:, None] * (gyh - m1[:, None] - yh * m2[:, None])
        return tl.where(vk[:, None] & vc[None, :], gy, 0.0)

    @triton.jit
    def _pyra_bwd_stats_kernel(x_ptr, s_ptr, go_ptr, os_ptr, src_ptr, dst_ptr, a_ptr, b_ptr, lw_ptr, lb_ptr,
                               wsf_ptr, chan_ptr, N, C, r, eps,
                               HAS_SIZE: tl.constexpr, DISTILL: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """Grid (B, r / BLOCK_K): phase (a) for this block of sources, and its partial sums of (b)."""
        img = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        na = (N + 1) // 2
        n_out = N - r
        x_b = x_ptr + img * N * C
        s_b = s_ptr + img * N
        go_b = go_ptr + img * n_out * C
        os_b = os_ptr + img * n_out
        src_b = src_ptr + img * r
        dst_b = dst_ptr + img * r
        ws = wsf_ptr + img * (6 * r + 2 * C)
        chan = chan_ptr + (img * tl.cdiv(r, BLOCK_K) + kb) * 2 * C   # [C] partial u, [C] partial g_wc

        # (a) LayerNorm statistics and token weights of the sources
        kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        vk = kk < r
        si = tl.load(src_b + kk, mask=vk, other=0)
        dj = tl.load(dst_b + kk, mask=vk, other=0)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            acc += tl.sum(_y_rows(x_b, s_b, si, dj, vk, cc, cc < C, C, HAS_SIZE), 1)
        mean = acc / C
        acc = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < C
            d = tl.where(vk[:, None] & vc[None, :],
                         _y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None], 0.0)
            acc += tl.sum(d * d, 1)
        rstd = 1.0 / tl.sqrt(acc / C + eps)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc, vc, lw, lb = _ln_channels(lw_ptr, lb_ptr, c0, C, BLOCK_C)
            bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            w = ((_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
                 * lw[None, :] + lb[None, :])
            acc += tl.sum(tl.where(vk[:, None] & vc[None, :], w * bv[None, :], 0.0), 1)
        wt = 2.0 * tl.sigmoid(acc) - 1.0
        tl.store(ws + kk, mean, mask=vk)
        tl.store(ws + r + kk, rstd, mask=vk)
        tl.store(ws + 2 * r + kk, wt, mask=vk)

        # (b) this block's share of u = sum_k a_k W[k] and g_wc = sum_k G S wt_k, per channel
        ak = tl.load(a_ptr + kk, mask=vk, other=0.0).to(tl.float32)
        row = _out_row_b(dj, na, r, DISTILL)
        for c0 in range(0, C, BLOCK_C):
            cc, vc, lw, lb = _ln_channels(lw_ptr, lb_ptr, c0, C, BLOCK_C)
            msk = vk[:, None] & vc[None, :]
            w = ((_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
                 * lw[None, :] + lb[None, :])
            gs = _gnum_rows(go_b, os_b, row, vk, cc, vc, C) * _z_rows(x_b, s_b, 2 * si, vk, cc, vc, C, HAS_SIZE)
            tl.store(chan + cc, tl.sum(tl.where(msk, ak[:, None] * w, 0.0), 0), mask=vc)
            tl.store(chan + C + cc, tl.sum(gs * wt[:, None], 0), mask=vc)

    @triton.jit
    def _wc_gu(chan_b, cc, vc, nkb, C):
        """Channel weights ``wc = 2 sigmoid(u)`` and ``g_u = g_wc wc (1 - wc / 2)`` of channels ``cc``:
        the source blocks' partial sums of u and g_wc added in block order (deterministic)."""
        u = tl.zeros(cc.shape, tl.float32)
        gwc = tl.zeros(cc.shape, tl.float32)
        for kb in range(0, nkb):
            u += tl.load(chan_b + kb * 2 * C + cc, mask=vc, other=0.0)
            gwc += tl.load(chan_b + kb * 2 * C + C + cc, mask=vc, other=0.0)
        wc = 2.0 * tl.sigmoid(u)
        return wc, gwc * wc * (1.0 - wc / 2.0)

    @triton.jit
    def _pyra_bwd_params_kernel(x_ptr, s_ptr, go_ptr, os_ptr, src_ptr, dst_ptr, a_ptr, b_ptr, lw_ptr, lb_ptr,
                                wsf_ptr, wsi_ptr, chan_ptr, ga_ptr, part_ptr, N, C, r,
                                HAS_SIZE: tl.constexpr, DISTILL: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_C: tl.constexpr):
        """Grid (B, r / BLOCK_K): phases (c) and (d) for this block of sources (their parameter
        gradients as one partial sum per block), (e) and the channel weights in the first block."""
        img = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        nkb = tl.cdiv(r, BLOCK_K)
        na = (N + 1) // 2
        n_out = N - r
        x_b = x_ptr + img * N * C
        s_b = s_ptr + img * N
        go_b = go_ptr + img * n_out * C
        os_b = os_ptr + img * n_out
        src_b = src_ptr + img * r
        dst_b = dst_ptr + img * r
        ws = wsf_ptr + img * (6 * r + 2 * C)
        mean_ws = ws            # [r] each
        rstd_ws = ws + r
        wt_ws = ws + 2 * r
        gv_ws = ws + 3 * r
        m1_ws = ws + 4 * r
        m2_ws = ws + 5 * r
        wc_ws = ws + 6 * r      # [C] each
        gu_ws = ws + 6 * r + C
        chan_b = chan_ptr + img * nkb * 2 * C
        pt = part_ptr + (img * nkb + kb) * 3 * C   # grad_b, grad_ln_weight, grad_ln_bias [C] each

        # (c) per source: g_v, grad_a, and the two means of the LayerNorm backward
        kk, vk, si, dj, mean, rstd, ak = _source_block(src_b, dst_b, mean_ws, rstd_ws, a_ptr, kb * BLOCK_K, r,
                                                       BLOCK_K)
        wt = tl.load(wt_ws + kk, mask=vk, other=0.0)
        row = _out_row_b(dj, na, r, DISTILL)
        gwt = tl.zeros([BLOCK_K], tl.float32)
        ga = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc, vc, lw, lb = _ln_channels(lw_ptr, lb_ptr, c0, C, BLOCK_C)
            wc, gu = _wc_gu(chan_b, cc, vc, nkb, C)
            if kb == 0:  # for the token kernel
                tl.store(wc_ws + cc, wc, mask=vc)
                tl.store(gu_ws + cc, gu, mask=vc)
            w = ((_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
                 * lw[None, :] + lb[None, :])
            gs = _gnum_rows(go_b, os_b, row, vk, cc, vc, C) * _z_rows(x_b, s_b, 2 * si, vk, cc, vc, C, HAS_SIZE)
            gwt += tl.sum(gs * wc[None, :], 1)
            ga += tl.sum(tl.where(vk[:, None] & vc[None, :], gu[None, :] * w, 0.0), 1)
        sv = (wt + 1.0) / 2.0
        gv = gwt * 2.0 * sv * (1.0 - sv)
        m1 = tl.zeros([BLOCK_K], tl.float32)
        m2 = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < C
            msk = vk[:, None] & vc[None, :]
            lw = tl.load(lw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            wc, gu = _wc_gu(chan_b, cc, vc, nkb, C)
            yh = (_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
            gyh = tl.where(msk, (ak[:, None] * gu[None, :] + gv[:, None] * bv[None, :]) * lw[None, :], 0.0)
            m1 += tl.sum(gyh, 1)
            m2 += tl.sum(tl.where(msk, gyh * yh, 0.0), 1)
        tl.store(gv_ws + kk, gv, mask=vk)
        tl.store(m1_ws + kk, m1 / C, mask=vk)
        tl.store(m2_ws + kk, m2 / C, mask=vk)
        tl.store(ga_ptr + img * r + kk, ga, mask=vk)

        # (d) this block's share of grad_b, grad_ln_weight, grad_ln_bias (sums over its sources)
        for c0 in range(0, C, BLOCK_C):
            cc, vc, lw, lb = _ln_channels(lw_ptr, lb_ptr, c0, C, BLOCK_C)
            bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            wc, gu = _wc_gu(chan_b, cc, vc, nkb, C)
            msk = vk[:, None] & vc[None, :]
            yh = (_y_rows(x_b, s_b, si, dj, vk, cc, vc, C, HAS_SIZE) - mean[:, None]) * rstd[:, None]
            w = yh * lw[None, :] + lb[None, :]
            gw = ak[:, None] * gu[None, :] + gv[:, None] * bv[None, :]
            tl.store(pt + cc, tl.sum(tl.where(msk, gv[:, None] * w, 0.0), 0), mask=vc)
            tl.store(pt + C + cc, tl.sum(tl.where(msk, gw * yh, 0.0), 0), mask=vc)
            tl.store(pt + 2 * C + cc, tl.sum(tl.where(msk, gw, 0.0), 0), mask=vc)

        # (e) the sources grouped by destination, for the token kernel
        if kb == 0:
            group_by_destination(dst_b, r, wsi_ptr + img * r, BLOCK_K)

    @triton.jit
    def _token_block(x_b, s_b, go_b, gos_b, os_b, out_b, src_b, dst_b, unm_b, a_ptr, b_ptr, lw_ptr, ws, sorted_b,
                     gx_b, gsize_b, blk, na, nb, r, C, KIND: tl.constexpr, HAS_SIZE: tl.constexpr,
                     HAS_GSIZE: tl.constexpr, DISTILL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        """grad_x and grad_size of one block of tokens of one KIND: 0 unmerged slots, 1 sources (ranks),
        2 B rows. Each kind compiles its own code (fewer live registers than one mixed block)."""
        ii = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        if KIND == 0:
            valid = ii < na - r
            pos = 2 * tl.load(unm_b + ii, mask=valid, other=0)
            row = ii
            if DISTILL:
                row = tl.where(ii > 0, ii + 1, ii)
        elif KIND == 1:
            valid = ii < r
            si = tl.load(src_b + ii, mask=valid, other=0)
            dk = tl.load(dst_b + ii, mask=valid, other=0)
            pos = 2 * si
            row = _out_row_b(dk, na, r, DISTILL)
            mean = tl.load(ws + ii, mask=valid, other=0.0)
            rstd = tl.load(ws + r + ii, mask=valid, other=0.0)
            wt = tl.load(ws + 2 * r + ii, mask=valid, other=0.0)
            gv = tl.load(ws + 3 * r + ii, mask=valid, other=0.0)
            m1 = tl.load(ws + 4 * r + ii, mask=valid, other=0.0)
            m2 = tl.load(ws + 5 * r + ii, mask=valid, other=0.0)
            ak = tl.load(a_ptr + ii, mask=valid, other=0.0).to(tl.float32)
        else:
            valid = ii < nb
            pos = 2 * ii + 1
            row = _out_row_b(ii, na, r, DISTILL)
            start, cnt = destination_ranges(dst_b, r, tl.where(valid, ii, 2147483647), BLOCK_K)
            cnt = tl.where(valid, cnt, 0)
            maxc = tl.max(cnt, 0)
        s_pos = load_sizes(s_b, pos, valid, HAS_SIZE)
        xdot = tl.zeros([BLOCK_T], tl.float32)
        odot = tl.zeros([BLOCK_T], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < C
            msk = valid[:, None] & vc[None, :]
            gz = _gnum_rows(go_b, os_b, row, valid, cc, vc, C)
            o = tl.load(out_b + row[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            odot += tl.sum(gz * o, 1)
            if KIND == 1:
                lw = tl.load(lw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                wc = tl.load(ws + 6 * r + cc, mask=vc, other=0.0)
                gu = tl.load(ws + 6 * r + C + cc, mask=vc, other=0.0)
                gz = (gz * (1.0 + wc[None, :] * wt[:, None])
                      + _grad_y(x_b, s_b, si, dk, valid, mean, rstd, gv, m1, m2, ak, gu, bv, lw, cc, vc, C, HAS_SIZE))
            if KIND == 2:
                lw = tl.load(lw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                gu = tl.load(ws + 6 * r + C + cc, mask=vc, other=0.0)
                for t in range(0, maxc):
                    vt = t < cnt
                    kt = tl.load(sorted_b + start + t, mask=vt, other=0)
                    gz += _grad_y(x_b, s_b, tl.load(src_b + kt, mask=vt, other=0), tl.load(dst_b + kt, mask=vt, other=0),
                                  vt, tl.load(ws + kt, mask=vt, other=0.0), tl.load(ws + r + kt, mask=vt, other=0.0),
                                  tl.load(ws + 3 * r + kt, mask=vt, other=0.0),
                                  tl.load(ws + 4 * r + kt, mask=vt, other=0.0),
                                  tl.load(ws + 5 * r + kt, mask=vt, other=0.0),
                                  tl.load(a_ptr + kt, mask=vt, other=0.0).to(tl.float32), gu, bv, lw, cc, vc, C,
                                  HAS_SIZE)
            xv = tl.load(x_b + pos[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            xdot += tl.sum(tl.where(msk, gz * xv, 0.0), 1)
            store_rounded(gx_b + pos[:, None] * C + cc[None, :], gz * s_pos[:, None], msk)
        gden = -odot
        if HAS_GSIZE:
            gden += tl.load(gos_b + row, mask=valid, other=0.0).to(tl.float32)
        tl.store(gsize_b + pos, xdot + gden, mask=valid)

    @triton.jit
    def _pyra_bwd_tokens_kernel(x_ptr, s_ptr, go_ptr, gos_ptr, os_ptr, out_ptr, src_ptr, dst_ptr, unm_ptr,
                                a_ptr, b_ptr, lw_ptr, wsf_ptr, wsi_ptr, gx_ptr, gsize_ptr, N, C, r,
                                HAS_SIZE: tl.constexpr, HAS_GSIZE: tl.constexpr, DISTILL: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """Programs along axis 1: the blocks of unmerged slots, then of sources (rank order), then of B rows."""
        img = tl.program_id(0).to(tl.int64)
        pid = tl.program_id(1)
        na = (N + 1) // 2
        nb = N // 2
        n_out = N - r
        nbu = tl.cdiv(na - r, BLOCK_T)
        nbs = tl.cdiv(r, BLOCK_T)
        x_b = x_ptr + img * N * C
        s_b = s_ptr + img * N
        go_b = go_ptr + img * n_out * C
        gos_b = gos_ptr + img * n_out
        os_b = os_ptr + img * n_out
        out_b = out_ptr + img * n_out * C
        src_b = src_ptr + img * r
        dst_b = dst_ptr + img * r
        unm_b = unm_ptr + img * (na - r)
        ws = wsf_ptr + img * (6 * r + 2 * C)
        sorted_b = wsi_ptr + img * r
        gx_b = gx_ptr + img * N * C
        gsize_b = gsize_ptr + img * N
        if pid < nbu:
            _token_block(x_b, s_b, go_b, gos_b, os_b, out_b, src_b, dst_b, unm_b, a_ptr, b_ptr, lw_ptr, ws, sorted_b,
                         gx_b, gsize_b, pid, na, nb, r, C, 0, HAS_SIZE, HAS_GSIZE, DISTILL, BLOCK_T, BLOCK_K, BLOCK_C)
        elif pid < nbu + nbs:
            _token_block(x_b, s_b, go_b, gos_b, os_b, out_b, src_b, dst_b, unm_b, a_ptr, b_ptr, lw_ptr, ws, sorted_b,
                         gx_b, gsize_b, pid - nbu, na, nb, r, C, 1, HAS_SIZE, HAS_GSIZE, DISTILL, BLOCK_T, BLOCK_K,
                         BLOCK_C)
        else:
            _token_block(x_b, s_b, go_b, gos_b, os_b, out_b, src_b, dst_b, unm_b, a_ptr, b_ptr, lw_ptr, ws, sorted_b,
                         gx_b, gsize_b, pid - nbu - nbs, na, nb, r, C, 2, HAS_SIZE, HAS_GSIZE, DISTILL, BLOCK_T,
                         BLOCK_K, BLOCK_C)


# ----------------------------------------------------------------------------- launcher
# Tiles: 32 sources / tokens by 64 channels, 8 warps on the GPU (sm_90, bench/aot_check.py: no register
# spills when C is a multiple of 16; at C = 100 the tokens kernel spills 64-120 bytes); the
# interpreter's cost is per block operation, so it runs 64-row tiles.
BLOCK_K = 64 if interpreting() else 32
BLOCK_T = 64 if interpreting() else 32
BLOCK_C = 64
NUM_WARPS = 8


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(grad_out, grad_out_size, x, size, out, out_size, src_idx, dst_idx, unm_idx, a, b, ln_weight, ln_bias,
                eps, distill_token):
    """Every argument's device, dtype and shape, and the matching's index ranges (one host sync, skipped
    where the matching is trusted: in the backward of ``pyra_merge``, whose forward produced it): the
    kernels index memory with them."""
    name = "pyra_merge_backward"
    for t, what in ((x, "x"), (grad_out, "grad_out"), (out, "out")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: {what} must be a 3-d tensor [B, N, C], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    bsz, n, c = x.shape
    na, nb = (n + 1) // 2, n // 2
    r = src_idx.shape[1] if src_idx.dim() == 2 else -1
    if not 0 <= r <= min(na, nb):
        raise ValueError(f"{name}: src_idx must be [B, r] with r <= {min(na, nb)}, got {tuple(src_idx.shape)}")
    if distill_token and nb > 0 and r >= na:
        raise ValueError(f"{name}: with distill_token, at least one A row must stay unmerged, got r = {r}")
    shapes = [(grad_out, "grad_out", (bsz, n - r, c)), (out, "out", (bsz, n - r, c)),
              (out_size, "out_size", (bsz, n - r, 1)), (src_idx, "src_idx", (bsz, r)), (dst_idx, "dst_idx", (bsz, r)),
              (unm_idx, "unm_idx", (bsz, na - r)), (a, "a", (r, 1)), (b, "b", (1, c)), (ln_weight, "ln_weight", (c,)),
              (ln_bias, "ln_bias", (c,)), (x, "x", (bsz, n, c))]
    if size is not None:
        shapes.append((size, "size", (bsz, n, 1)))
    if grad_out_size is not None:
        shapes.append((grad_out_size, "grad_out_size", (bsz, n - r, 1)))
    for t, what, shape in shapes:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: {what} must be on {x.device} (x's device), got {t.device}")
        index = what in ("src_idx", "dst_idx", "unm_idx")
        if index and t.dtype != torch.int64:
            raise ValueError(f"{name}: {what} must be an int64 tensor, got {t.dtype}")
        if not index and t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name}: {what} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (isinstance(eps, float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive finite float, got {eps!r}")
    if bsz == 0 or na == 0 or _checks.maps_trusted():
        return
    both = torch.cat([src_idx, unm_idx], 1)
    ok = (torch.sort(both, 1).values == torch.arange(na, device=x.device)).all()
    if r > 0:
        ok = ok & ((dst_idx >= 0) & (dst_idx < nb)).all()
    if not bool(ok):
        raise ValueError(f"{name}: src_idx and unm_idx must together name every A row in [0, {na}) once, and "
                         f"dst_idx entries must be in [0, {nb})")


def pyra_merge_backward(grad_out, grad_out_size, x, size, out, out_size, src_idx, dst_idx, unm_idx, a, b, ln_weight,
                        ln_bias, eps, distill_token):
    """Gradients of ``pyra_merge`` in x, a, b, ln_weight, ln_bias and size (the raw kernel of
    csrc/README.md ``pyra_merge_backward``: same arguments, same results; inputs of the forward's shapes)."""
    _check_args(grad_out, grad_out_size, x, size, out, out_size, src_idx, dst_idx, unm_idx, a, b, ln_weight,
                ln_bias, eps, distill_token)
    c_ = lambda t: None if t is None else t.contiguous()  # noqa: E731
    grad_out, grad_out_size, x, size, out = map(c_, (grad_out, grad_out_size, x, size, out))
    src_idx, dst_idx, unm_idx = map(c_, (src_idx, dst_idx, unm_idx))
    bsz, n, c = x.shape
    r = src_idx.shape[1]
    na, nb = (n + 1) // 2, n // 2
    dev = x.device
    grad_x = torch.empty_like(x)
    grad_size = torch.empty(bsz, n, 1, dtype=torch.float32, device=dev)
    nkb = cdiv(r, BLOCK_K)
    ga = torch.zeros(bsz, r, dtype=torch.float32, device=dev)
    part = torch.zeros(bsz * max(nkb, 1), 3 * c, dtype=torch.float32, device=dev)
    if bsz > 0 and n > 0:
        os32 = out_size.to(torch.float32).contiguous()
        av = a.contiguous().view(-1)
        bv = b.contiguous().view(-1)
        lw, lb = ln_weight.contiguous(), ln_bias.contiguous()
        s = size if size is not None else x
        gs = grad_out_size if grad_out_size is not None else os32
        wsf = torch.zeros(bsz, 6 * r + 2 * c, dtype=torch.float32, device=dev)
        wsi = torch.empty(bsz, max(r, 1), dtype=torch.int32, device=dev)
        if r > 0:
            chan = torch.empty(bsz, nkb, 2, c, dtype=torch.float32, device=dev)  # per source block: u, g_wc
            _pyra_bwd_stats_kernel[(bsz, nkb)](
                x, s, grad_out, os32, src_idx, dst_idx, av, bv, lw, lb, wsf, chan, n, c, r, float(eps),
                HAS_SIZE=size is not None, DISTILL=bool(distill_token), BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
                num_warps=NUM_WARPS)
            _pyra_bwd_params_kernel[(bsz, nkb)](
                x, s, grad_out, os32, src_idx, dst_idx, av, bv, lw, lb, wsf, wsi, chan, ga, part, n, c, r,
                HAS_SIZE=size is not None, DISTILL=bool(distill_token), BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
                num_warps=NUM_WARPS)
        blocks = cdiv(na - r, BLOCK_T) + cdiv(r, BLOCK_T) + cdiv(nb, BLOCK_T)
        _pyra_bwd_tokens_kernel[(bsz, blocks)](
            x, s, grad_out, gs, os32, out, src_idx, dst_idx, unm_idx, av, bv, lw, wsf, wsi, grad_x, grad_size,
            n, c, r, HAS_SIZE=size is not None, HAS_GSIZE=grad_out_size is not None, DISTILL=bool(distill_token),
            BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    total = part.sum(0)  # (image, source block) partials in a fixed order
    return (grad_x, ga.sum(0).view(r, 1).to(a.dtype), total[:c].view(1, c).to(b.dtype, copy=True),
            total[c:2 * c].to(ln_weight.dtype, copy=True),
            total[2 * c:].to(ln_bias.dtype, copy=True), grad_size.to(out_size.dtype))
