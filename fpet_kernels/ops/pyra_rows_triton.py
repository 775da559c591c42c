"""Triton kernels of ``pyra_merge_rows`` and ``pyra_merge_rows_backward`` (``ops/pyra.py``: PYRA's modulated
merge along a given per-row matching; padded batches and threshold merging, docs/semantics.md "Padded
batches and threshold merging"). The reference and oracle: ``pyra_merge_rows_op_reference`` and
``pyra_merge_rows_backward_reference``.

Forward, two launches:
  1. grid (B,): the modulation of every image's live ranks (``r_b`` of them, ranks past it are -1) with
     ``pyra_triton._pyra_weights`` (the phase the fused ``pyra_merge`` kernel runs): LayerNorm statistics
     of ``S + T``, ``wt[k]``, ``wc[c]`` into a float32 workspace;
  2. grid (B, output-row blocks, channel blocks): every output row gathers its tokens (the positions
     grouped by output row: a stable ``torch.sort`` of the map, as ``tome_triton.merge_wavg``) and sums
     ``z = x * s``, a source's replaced by ``S + S * wc * wt[k]``, over the sum of their sizes.
Backward, two launches: (grid (B,)) the parameter gradients per image (reduced over images by the
launcher in image order) and ``g_y`` of every live rank (the LayerNorm backward) into a workspace; then
(grid (B, token blocks)) every token's ``g_z``: ``G = grad_out[map] / out_size[map]``, a source
``G (1 + wc wt) + g_y``, a destination ``G`` plus the ``g_y`` of its sources (grouped by destination,
rank order), giving ``grad_x = g_z s`` and ``grad_size = <g_z, x> + g_den[map]``.

Indices: a rank is used only while it is in range (``0 <= src < Na``, ``0 <= dst < Nb``) and every rank
before it is (``r_b``, computed on the device), and map entries outside ``[-1, n_out)`` are skipped, so
nothing is read or written out of bounds whatever the indices; the launcher also checks them (one host
sync; skipped inside a backward, ``_checks.trusted_maps``) for a clear error.
"""
from __future__ import annotations

import torch

from .. import _checks
from .triton_common import HAS_TRITON, cdiv, interpreting, pow2, tl, triton

if HAS_TRITON:
    from .pyra_triton import _pyra_weights
    from .triton_common import load_sizes, store_rounded

    @triton.jit
    def _rows_weights_kernel(x_ptr, s_ptr, src_ptr, dst_ptr, rrow_ptr, ws_ptr, a_ptr, b_ptr, lnw_ptr, lnb_ptr,
                             N, C, R, WS, eps, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Image b's modulation: ws[b] = [wt (r_b), wc (C), mean (r_b), rstd (r_b)] (``_pyra_weights``' layout)."""
        bi = tl.program_id(0).to(tl.int64)
        r = tl.load(rrow_ptr + bi)
        wt_ws = ws_ptr + bi * WS
        _pyra_weights(x_ptr + bi * N * C, s_ptr + bi * N, src_ptr + bi * R, dst_ptr + bi * R, wt_ws, wt_ws + r,
                      a_ptr, b_ptr, lnw_ptr, lnb_ptr, r, C, 0, C, eps, HAS_SIZE, BLOCK, BLOCK_C)

    @triton.jit
    def _rows_merge_kernel(x_ptr, s_ptr, order_ptr, start_ptr, rank_ptr, rrow_ptr, ws_ptr, out_ptr, osize_ptr,
                           N, M, C, NA, WS, HAS_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[m] = sum z' / sum s over the tokens mapped to m (ascending position), 0 where the sizes sum to 0."""
        bi = tl.program_id(0).to(tl.int64)
        mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        pc = tl.program_id(2)
        cc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        vm = mm < M
        vc = cc < C
        r = tl.load(rrow_ptr + bi)
        wt_ws = ws_ptr + bi * WS
        wc = tl.load(wt_ws + r + cc, mask=vc, other=0.0)
        st = tl.load(start_ptr + bi * (M + 1) + mm, mask=vm, other=0)
        cnt = tl.load(start_ptr + bi * (M + 1) + mm + 1, mask=vm, other=0) - st
        maxc = tl.max(cnt, 0)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        for t in range(0, maxc):
            vt = t < cnt
            n_idx = tl.load(order_ptr + bi * N + tl.minimum(st + t, N - 1))  # clamped: see tome_triton
            msk = vt[:, None] & vc[None, :]
            sv = load_sizes(s_ptr + bi * N, n_idx, vt, HAS_SIZE)
            v = tl.load(x_ptr + bi * N * C + n_idx[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            v = v * sv[:, None]
            is_a = vt & (n_idx % 2 == 0)
            k = tl.load(rank_ptr + bi * NA + n_idx // 2, mask=is_a, other=-1)
            src = is_a & (k >= 0) & (k < r)
            wt = tl.load(wt_ws + k, mask=src, other=0.0)
            v = tl.where(src[:, None], v + v * wc[None, :] * wt[:, None], v)  # S' = S + S wc wt
            acc += tl.where(msk, v, 0.0)
            den += sv
        acc = tl.where(den[:, None] != 0, acc / tl.where(den != 0, den, 1.0)[:, None], 0.0)
        tl.store(osize_ptr + bi * M + mm, den, mask=vm & (pc == 0))
        store_rounded(out_ptr + bi * M * C + mm[:, None] * C + cc[None, :], acc, vm[:, None] & vc[None, :])

    @triton.jit
    def _gnum(go_ptr, os_ptr, m, valid, cc, vc, C):
        """grad_out[m] / out_size[m] for a [BLOCK] vector of rows (0 where invalid or the size is 0)."""
        osz = tl.load(os_ptr + m, mask=valid, other=0.0).to(tl.float32)
        ok = valid & (osz != 0)
        g = tl.load(go_ptr + m[:, None] * C + cc[None, :], mask=ok[:, None] & vc[None, :], other=0.0).to(tl.float32)
        return g / tl.where(ok, osz, 1.0)[:, None]

    @triton.jit
    def _rows_param_kernel(go_ptr, os_ptr, x_ptr, s_ptr, src_ptr, dst_ptr, map_ptr, rrow_ptr, ws_ptr, gy_ptr,
                           part_ptr, a_ptr, b_ptr, lnw_ptr, lnb_ptr, N, M, C, R, WS, HAS_SIZE: tl.constexpr,
                           BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Image b: the parameter gradients' partial sums part[b] = [grad_a (R), grad_b, grad_lnw, grad_lnb
        (C each)] and g_y [R, C] of its live ranks; ws[b] holds the forward's modulation (``_pyra_weights``)
        and, after it, g_u (C) and g_v (R)."""
        bi = tl.program_id(0).to(tl.int64)
        r = tl.load(rrow_ptr + bi)
        wt_ws = ws_ptr + bi * WS
        wc_ws = wt_ws + r
        gu_ws = wt_ws + 3 * R + C
        gv_ws = gu_ws + C
        x_b = x_ptr + bi * N * C
        s_b = s_ptr + bi * N
        go_b = go_ptr + bi * M * C
        os_b = os_ptr + bi * M
        p_b = part_ptr + bi * (R + 3 * C)
        # 1. g_wt[k] = <G S, wc> -> g_v[k]; g_wc[c] = sum_k G S wt[k] -> g_u
        for k0 in range(0, r, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            vk = kk < r
            si = tl.load(src_ptr + bi * R + kk, mask=vk, other=0)
            ss = load_sizes(s_b, 2 * si, vk, HAS_SIZE)
            mrow = tl.load(map_ptr + bi * N + 2 * si, mask=vk, other=-1)
            okm = vk & (mrow >= 0) & (mrow < M)
            wt = tl.load(wt_ws + kk, mask=vk, other=0.0)
            acc = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                vc = cc < C
                msk = vk[:, None] & vc[None, :]
                gs = _gnum(go_b, os_b, mrow, okm, cc, vc, C) * tl.load(
                    x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32) * ss[:, None]
                wc = tl.load(wc_ws + cc, mask=vc, other=0.0)
                acc += tl.sum(tl.where(msk, gs * wc[None, :], 0.0), 1)
            sv = (wt + 1.0) / 2.0
            tl.store(gv_ws + kk, acc * 2.0 * sv * (1.0 - sv), mask=vk)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < C
            acc = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, r, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                vk = kk < r
                si = tl.load(src_ptr + bi * R + kk, mask=vk, other=0)
                ss = load_sizes(s_b, 2 * si, vk, HAS_SIZE)
                mrow = tl.load(map_ptr + bi * N + 2 * si, mask=vk, other=-1)
                okm = vk & (mrow >= 0) & (mrow < M)
                wt = tl.load(wt_ws + kk, mask=vk, other=0.0)
                msk = vk[:, None] & vc[None, :]
                gs = _gnum(go_b, os_b, mrow, okm, cc, vc, C) * tl.load(
                    x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32) * ss[:, None]
                acc += tl.sum(tl.where(msk, gs * wt[:, None], 0.0), 0)
            wc = tl.load(wc_ws + cc, mask=vc, other=0.0)
            tl.store(gu_ws + cc, acc * wc * (1.0 - wc / 2.0), mask=vc)
        tl.debug_barrier()
        # 2. per rank block: grad_a[k] = <g_u, W[k]>, grad_b += g_v W, g_W = a g_u + g_v b, grad_lnw += g_W yh,
        #    grad_lnb += g_W; g_y = rstd (g_yh - mean(g_yh) - yh mean(g_yh yh)) with g_yh = g_W lnw
        for k0 in range(0, R, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            vk = kk < r
            si = tl.load(src_ptr + bi * R + kk, mask=vk, other=0)
            dj = tl.load(dst_ptr + bi * R + kk, mask=vk, other=0)
            ss = load_sizes(s_b, 2 * si, vk, HAS_SIZE)
            sd = load_sizes(s_b, 2 * dj + 1, vk, HAS_SIZE)
            mean = tl.load(wt_ws + r + C + kk, mask=vk, other=0.0)
            rstd = tl.load(wt_ws + 2 * r + C + kk, mask=vk, other=0.0)
            gv = tl.load(gv_ws + kk, mask=vk, other=0.0)
            ak = tl.load(a_ptr + kk, mask=vk, other=0.0).to(tl.float32)
            ga = tl.zeros([BLOCK], tl.float32)
            m1 = tl.zeros([BLOCK], tl.float32)
            m2 = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, C, BLOCK_C):  # pass 1: grad_a, the parameter sums, the two means
                cc = c0 + tl.arange(0, BLOCK_C)
                vc = cc < C
                msk = vk[:, None] & vc[None, :]
                y = (tl.load(x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * ss[:, None]
                     + tl.load(x_b + (2 * dj + 1)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * sd[:, None])
                yh = tl.where(msk, (y - mean[:, None]) * rstd[:, None], 0.0)
                lw = tl.load(lnw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                gu = tl.load(gu_ws + cc, mask=vc, other=0.0)
                w = tl.where(msk, yh * lw[None, :] + lb[None, :], 0.0)
                ga += tl.sum(w * gu[None, :], 1)
                gw = tl.where(msk, ak[:, None] * gu[None, :] + gv[:, None] * bv[None, :], 0.0)
                gyh = gw * lw[None, :]
                m1 += tl.sum(gyh, 1)
                m2 += tl.sum(gyh * yh, 1)
                pb = tl.load(p_b + R + cc, mask=vc & (k0 > 0), other=0.0)
                tl.store(p_b + R + cc, pb + tl.sum(gv[:, None] * w, 0), mask=vc)
                plw = tl.load(p_b + R + C + cc, mask=vc & (k0 > 0), other=0.0)
                tl.store(p_b + R + C + cc, plw + tl.sum(gw * yh, 0), mask=vc)
                plb = tl.load(p_b + R + 2 * C + cc, mask=vc & (k0 > 0), other=0.0)
                tl.store(p_b + R + 2 * C + cc, plb + tl.sum(gw, 0), mask=vc)
            tl.store(p_b + kk, ga, mask=kk < R)  # ranks past r_b: 0
            m1 = m1 / C
            m2 = m2 / C
            for c0 in range(0, C, BLOCK_C):  # pass 2: g_y
                cc = c0 + tl.arange(0, BLOCK_C)
                vc = cc < C
                msk = vk[:, None] & vc[None, :]
                y = (tl.load(x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * ss[:, None]
                     + tl.load(x_b + (2 * dj + 1)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * sd[:, None])
                yh = tl.where(msk, (y - mean[:, None]) * rstd[:, None], 0.0)
                lw = tl.load(lnw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                gu = tl.load(gu_ws + cc, mask=vc, other=0.0)
                gyh = (ak[:, None] * gu[None, :] + gv[:, None] * bv[None, :]) * lw[None, :]
                gy = tl.where(msk, rstd[:, None] * (gyh - m1[:, None] - yh * m2[:, None]), 0.0)
                tl.store(gy_ptr + bi * R * C + kk[:, None] * C + cc[None, :], gy, mask=(kk < R)[:, None] & vc[None, :])
            tl.debug_barrier()  # the partial sums above are read back by the next rank block

    @triton.jit
    def _rows_token_kernel(go_ptr, os_ptr, gden_ptr, x_ptr, s_ptr, map_ptr, rank_ptr, rrow_ptr, ws_ptr, gy_ptr,
                           order_ptr, start_ptr, gx_ptr, gsize_ptr, N, M, C, R, NA, NB, WS,
                           HAS_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Every token's g_z (see the module docstring): grad_x = g_z s, grad_size = <g_z, x> + g_den[map]."""
        bi = tl.program_id(0).to(tl.int64)
        nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        vn = nn < N
        r = tl.load(rrow_ptr + bi)
        wt_ws = ws_ptr + bi * WS
        mp = tl.load(map_ptr + bi * N + nn, mask=vn, other=-1)
        hit = vn & (mp >= 0) & (mp < M)
        is_a = vn & (nn % 2 == 0)
        is_b = vn & (nn % 2 == 1)
        k = tl.load(rank_ptr + bi * NA + nn // 2, mask=is_a, other=-1)
        src = is_a & (k >= 0) & (k < r)
        wt = tl.load(wt_ws + k, mask=src, other=0.0)
        st = tl.load(start_ptr + bi * (NB + 1) + nn // 2, mask=is_b, other=0)
        cnt = tl.load(start_ptr + bi * (NB + 1) + nn // 2 + 1, mask=is_b, other=0) - st
        maxc = tl.max(cnt, 0)
        sv = load_sizes(s_ptr + bi * N, nn, vn, HAS_SIZE)
        dot = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < C
            msk = vn[:, None] & vc[None, :]
            g = _gnum(go_ptr + bi * M * C, os_ptr + bi * M, mp, hit, cc, vc, C)
            wc = tl.load(wt_ws + r + cc, mask=vc, other=0.0)
            gys = tl.load(gy_ptr + bi * R * C + k[:, None] * C + cc[None, :], mask=src[:, None] & vc[None, :],
                          other=0.0)
            g = tl.where(src[:, None], g * (1.0 + wc[None, :] * wt[:, None]) + gys, g)
            # a destination: the g_y of its sources, rank order. Every operand is [BLOCK_N, BLOCK_C] (the
            # per-token bounds and ranks repeated along C): 1-D masks and gathers inside this loop fail
            # Triton 3.6's layout pass on sm_90.
            nb2 = (nn // 2)[:, None] + 0 * cc[None, :]
            isb2 = is_b[:, None] & vc[None, :]
            for t in range(0, maxc):
                pos = tl.load(start_ptr + bi * (NB + 1) + nb2, mask=isb2, other=0) + t
                vt = isb2 & (pos < tl.load(start_ptr + bi * (NB + 1) + nb2 + 1, mask=isb2, other=0))
                kd = tl.load(order_ptr + bi * R + tl.minimum(pos, R - 1), mask=vt, other=0)
                g += tl.load(gy_ptr + bi * R * C + kd * C + cc[None, :], mask=vt, other=0.0)
            xv = tl.load(x_ptr + bi * N * C + nn[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            dot += tl.sum(tl.where(msk, g * xv, 0.0), 1)
            store_rounded(gx_ptr + bi * N * C + nn[:, None] * C + cc[None, :], g * sv[:, None], msk)
        gden = tl.load(gden_ptr + bi * M + mp, mask=hit, other=0.0)
        tl.store(gsize_ptr + bi * N + nn, dot + gden, mask=vn)


# ----------------------------------------------------------------------------- launchers
BLOCK = 64 if interpreting() else 32      # ranks per tile
BLOCK_M = 64 if interpreting() else 32    # output rows / tokens per tile
BLOCK_C = 128                             # channels per tile
NUM_WARPS = 8


def _size_arg(size, x):
    return (size.contiguous(), True) if size is not None else (x, False)  # dummy pointer when absent


def _check_args(op, x, size, src_idx, dst_idx, token_map, a, b, ln_weight, ln_bias, n_out, eps):
    _checks.kernel_tokens(op, "x", x)
    bsz, n, c = x.shape
    dev = x.device
    if size is not None:
        _checks.kernel_tensor(op, "size", size, dev, shape=(bsz, n, 1))
    _checks.kernel_tensor(op, "src_idx", src_idx, dev, shape=(bsz, None), dtypes=(torch.int64,))
    rr = src_idx.shape[1]
    na, nb = (n + 1) // 2, n // 2
    if rr > na:
        raise ValueError(f"{op}: src_idx must have at most ceil(N/2) = {na} columns, got {tuple(src_idx.shape)}")
    _checks.kernel_tensor(op, "dst_idx", dst_idx, dev, shape=(bsz, rr), dtypes=(torch.int64,))
    if not 0 <= n_out <= n:
        raise ValueError(f"{op}: n_out must be in [0, {n}] (x has N = {n} tokens), got {n_out}")
    _checks.kernel_map(op, token_map, dev, (bsz, n), n_out)
    for name, t, shape in (("a", a, (rr, 1)), ("b", b, (1, c)), ("ln_weight", ln_weight, (c,)),
                           ("ln_bias", ln_bias, (c,))):
        _checks.kernel_tensor(op, name, t, dev, shape=shape)
    _checks.finite_positive(op, "eps", eps)
    capturing = src_idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if src_idx.numel() and not _checks.maps_trusted() and not capturing:
        live = src_idx >= 0
        ok = ((src_idx >= -1) & (src_idx < na) & (~live | ((dst_idx >= 0) & (dst_idx < nb)))).all()
        prefix = (live[:, 1:] <= live[:, :-1]).all() if rr > 1 else torch.ones((), dtype=torch.bool)
        if not bool(ok & prefix):  # the one sync
            raise ValueError(f"{op}: src_idx / dst_idx must be a per-row matching (tome_match_rows): src_idx in "
                             f"[-1, {na}) with the -1 entries after each row's ranks, dst_idx in [0, {nb}) where "
                             "src_idx >= 0")
    return bsz, n, c, rr, na, nb


def _ranks(src_idx, dst_idx, na, nb):
    """r_b per image (the ranks in range, each after ranks in range: so every rank below it is safe to
    read) and rank_of [B, Na] (int64: the rank whose source is A token i, -1 none)."""
    bsz, rr = src_idx.shape
    ok = (src_idx >= 0) & (src_idx < na) & (dst_idx >= 0) & (dst_idx < nb)
    r_row = ok.long().cumprod(1).sum(1) if rr else torch.zeros(bsz, dtype=torch.int64, device=src_idx.device)
    live = torch.arange(rr, device=src_idx.device) < r_row[:, None]
    rank_of = torch.full((bsz, na + 1), -1, dtype=torch.int64, device=src_idx.device)
    if rr:
        rank_of.scatter_(1, torch.where(live, src_idx, na),
                         torch.where(live, torch.arange(rr, device=src_idx.device).expand(bsz, rr), -1))
    return r_row.contiguous(), rank_of[:, :na].contiguous(), live


def _groups(key, n_groups):
    """Positions grouped by ``key`` (ascending position within a group; keys outside [0, n_groups)
    last): (order, start [B, n_groups + 1])."""
    key = torch.where((key >= 0) & (key < n_groups), key, n_groups)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    starts = torch.searchsorted(sorted_key.contiguous(),
                                torch.arange(n_groups + 1, device=key.device).expand(key.shape[0], n_groups + 1)
                                .contiguous())
    return order.contiguous(), starts.contiguous()


def _weights(x, s, has_size, src, dst, r_row, a, b, ln_weight, ln_bias, eps, ws_cols):
    bsz, n, c = x.shape
    rr = src.shape[1]
    ws = torch.zeros(bsz, ws_cols, dtype=torch.float32, device=x.device)
    _rows_weights_kernel[(bsz,)](x, s, src, dst, r_row, ws, a.contiguous().view(-1), b.contiguous().view(-1),
                                 ln_weight.contiguous(), ln_bias.contiguous(), n, c, rr, ws_cols, float(eps),
                                 HAS_SIZE=has_size, BLOCK=BLOCK, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return ws


def pyra_merge_rows(x, size, src_idx, dst_idx, token_map, a, b, ln_weight, ln_bias, n_out, eps):
    op = "pyra_merge_rows (triton)"
    bsz, n, c, rr, na, nb = _check_args(op, x, size, src_idx, dst_idx, token_map, a, b, ln_weight, ln_bias, n_out,
                                        eps)
    x = x.contiguous()
    src, dst, tmap = src_idx.contiguous(), dst_idx.contiguous(), token_map.contiguous()
    out = torch.empty(bsz, n_out, c, dtype=x.dtype, device=x.device)
    out_size = torch.empty(bsz, n_out, 1, dtype=torch.float32, device=x.device)
    if bsz == 0 or n_out == 0:
        return out, out_size
    s, has_size = _size_arg(size, x)
    r_row, rank_of, _ = _ranks(src, dst, na, nb)
    ws_cols = 3 * rr + c
    ws = _weights(x, s, has_size, src, dst, r_row, a, b, ln_weight, ln_bias, eps, ws_cols)
    order, starts = _groups(tmap, n_out)
    bc = min(BLOCK_C, pow2(c, 32))
    grid = (bsz, cdiv(n_out, BLOCK_M), max(1, cdiv(c, bc)))
    _rows_merge_kernel[grid](x, s, order, starts, rank_of, r_row, ws, out, out_size, n, n_out, c, na, ws_cols,
                             HAS_SIZE=has_size, BLOCK_M=BLOCK_M, BLOCK_C=bc, num_warps=4)
    return out, out_size


def pyra_merge_rows_backward(grad_out, grad_out_size, x, size, out, out_size, src_idx, dst_idx, token_map, a, b,
                             ln_weight, ln_bias, eps):
    op = "pyra_merge_rows_backward (triton)"
    _checks.kernel_tokens(op, "grad_out", grad_out)
    n_out = grad_out.shape[1]
    bsz, n, c, rr, na, nb = _check_args(op, x, size, src_idx, dst_idx, token_map, a, b, ln_weight, ln_bias, n_out,
                                        eps)
    _checks.kernel_tensor(op, "grad_out", grad_out, x.device, shape=(bsz, n_out, c))
    _checks.kernel_tensor(op, "out", out, x.device, shape=(bsz, n_out, c))
    _checks.kernel_tensor(op, "out_size", out_size, x.device, shape=(bsz, n_out, 1))
    if grad_out_size is not None:
        _checks.kernel_tensor(op, "grad_out_size", grad_out_size, x.device, shape=(bsz, n_out, 1))
    x, grad_out = x.contiguous(), grad_out.contiguous()
    src, dst, tmap = src_idx.contiguous(), dst_idx.contiguous(), token_map.contiguous()
    os32 = out_size.to(torch.float32).contiguous()
    grad_x = torch.empty_like(x)
    grad_size = torch.empty(bsz, n, 1, dtype=torch.float32, device=x.device)
    part = torch.zeros(bsz, rr + 3 * c, dtype=torch.float32, device=x.device)
    if bsz and n:
        s, has_size = _size_arg(size, x)
        r_row, rank_of, live = _ranks(src, dst, na, nb)
        ws_cols = 4 * rr + 2 * c  # the modulation (3 R + C), then g_u (C), g_v (R)
        ws = _weights(x, s, has_size, src, dst, r_row, a, b, ln_weight, ln_bias, eps, ws_cols)
        gy = torch.zeros(bsz, max(rr, 1), c, dtype=torch.float32, device=x.device)
        if rr and c:
            _rows_param_kernel[(bsz,)](grad_out, os32, x, s, src, dst, tmap, r_row, ws, gy, part,
                                       a.contiguous().view(-1), b.contiguous().view(-1), ln_weight.contiguous(),
                                       ln_bias.contiguous(), n, n_out, c, rr, ws_cols, HAS_SIZE=has_size,
                                       BLOCK=BLOCK, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        # g_den[m] = -<g_num[m], out[m]> + grad_out_size[m]
        g_num = torch.where(os32 != 0, grad_out.float() / torch.where(os32 != 0, os32, 1.0), 0.0)
        gden = -(g_num * out.float()).sum(-1)
        if grad_out_size is not None:
            gden = gden + grad_out_size[..., 0].float()
        order, starts = _groups(torch.where(live, dst, nb), nb)
        bc = min(BLOCK_C, pow2(c, 32))
        _rows_token_kernel[(bsz, cdiv(n, BLOCK_M))](
            grad_out, os32, gden.contiguous(), x, s, tmap, rank_of, r_row, ws, gy, order, starts, grad_x, grad_size,
            n, n_out, c, max(rr, 1), na, nb, ws_cols, HAS_SIZE=has_size, BLOCK_N=BLOCK_M, BLOCK_C=bc, num_warps=4)
    total = part.sum(0)
    # copy=True: every output has its own storage (a custom op's outputs may not alias)
    grad_a = total[:rr].view(rr, 1).to(a.dtype, copy=True)
    grad_b = total[rr:rr + c].view(1, c).to(b.dtype, copy=True)
    grad_lnw = total[rr + c:rr + 2 * c].to(ln_weight.dtype, copy=True)
    grad_lnb = total[rr + 2 * c:].to(ln_bias.dtype, copy=True)
    return grad_x, grad_a, grad_b, grad_lnw, grad_lnb, grad_size.to(out_size.dtype)
