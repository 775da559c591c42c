"""Triton kernels of the ToMe ops (``ops/tome.py``); PYRA's forward (``pyra_triton.py``) launches this
module's merge kernel with its modulation phase (a ``tl.constexpr`` function) switched on.

``tome_merge`` (and ``pyra_merge``): ONE launch, grid (B, channel splits); each program does the whole
step for its image (see ``triton_common``): similarity tiles (chunked over the metric dim D,
so any D runs) and per-row max/argmax, the rank of
every A row (a counting comparison, ties by lower index), top-r selection, the index outputs, the
unmerged rows, and the size-weighted gather of every destination row (PYRA: with the modulation
of its sources, whose statistics the same program computes first). Matching and index outputs are
bit-identical to the reference (float32 scores); merged rows agree to float32 rounding.

``unmerge`` / ``merge_wavg_backward``: one gather launch. ``merge_sum`` / ``merge_wavg`` for an
arbitrary token map: the positions grouped by destination (a stable ``torch.sort`` of the map),
then one launch in which every output row gathers its group: O(N * C), and a token's values
reach only the row it maps to (no one-hot product, where ``0 * inf`` would spread a non-finite
token over its tile).
"""
from __future__ import annotations

import torch

from .. import _checks
from .triton_common import (HAS_TRITON, cdiv, channel_split, check_merge_inputs, check_r, interpreting, pow2, tl,
                            triton)

if HAS_TRITON:
    from .triton_common import (group_by_destination, load_sizes, merge_destinations, row_norms, store_rounded,
                                unit_scores)

    @triton.jit
    def _out_row_b(jj, na, r, DISTILL: tl.constexpr):
        """Output row of ToMe B row j: after the Na - r unmerged rows; B row 0 at 1 with a distill token."""
        row = na - r + jj
        if DISTILL:
            row = tl.where(jj == 0, 1, row)
        return row

    @triton.jit
    def _tome_merge_kernel(x_ptr, m_ptr, s_ptr, out_ptr, osize_ptr, src_ptr, dst_ptr, unm_ptr, map_ptr,
                           wsf_ptr, wsi_ptr, a_ptr, b_ptr, lnw_ptr, lnb_ptr,
                           N, C, D, r, c_per, WSF, WSI, eps,
                           HAS_SIZE: tl.constexpr, CLS: tl.constexpr, DISTILL: tl.constexpr, PYRA: tl.constexpr,
                           PYRA_WEIGHTS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1)
        first = pc == 0  # the first channel program also writes indices and sizes
        c_lo = pc * c_per
        c_hi = tl.minimum(c_lo + c_per, C)
        na = (N + 1) // 2
        nb = N // 2
        n_out = N - r
        g = b * tl.num_programs(1) + pc
        x_b = x_ptr + b * N * C
        m_b = m_ptr + b * N * D
        s_b = s_ptr + b * N
        o_b = out_ptr + b * n_out * C
        os_b = osize_ptr + b * n_out
        best_ws = wsf_ptr + g * WSF          # [Na] best score of each A row
        dst_ws = wsi_ptr + g * WSI           # [Na] its best B row
        srck_ws = dst_ws + na                # [r]  A row of rank k
        dstk_ws = srck_ws + r                # [r]  its destination
        sorted_ws = dstk_ws + r              # [r]  ranks grouped by destination

        # 1. match: best[i] = max_j <a_i, b_j>, dst[i] = lowest argmax
        for i0 in range(0, na, BLOCK):
            ii = i0 + tl.arange(0, BLOCK)
            vi = ii < na
            den_a = row_norms(m_b, 2 * ii, vi, D, BLOCK_D)
            best = tl.full([BLOCK], float("-inf"), tl.float32)
            arg = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, nb, BLOCK):
                jj = j0 + tl.arange(0, BLOCK)
                vj = jj < nb
                s = unit_scores(m_b, 2 * ii, vi, den_a, 2 * jj + 1, vj, row_norms(m_b, 2 * jj + 1, vj, D, BLOCK_D), D,
                                BLOCK_D, PREC)
                s = tl.where(s != s, float("inf"), s)  # NaN: the largest score (as torch.max / torch.sort)
                bad = (jj >= nb)[None, :] | (ii < 0)[:, None]
                if DISTILL:
                    bad = bad | (jj == 0)[None, :]
                if CLS:
                    bad = bad | (ii == 0)[:, None]
                s = tl.where(bad, float("-inf"), s)
                bmax = tl.max(s, 1)
                barg = tl.min(tl.where(s == bmax[:, None], jj[None, :], 2147483647), 1)
                upd = bmax > best
                arg = tl.where(upd, barg, arg)
                best = tl.where(upd, bmax, best)
            tl.store(best_ws + ii, best, mask=vi)
            tl.store(dst_ws + ii, arg, mask=vi)
        tl.debug_barrier()

        # 2. select: rank[i] = #{k: best_k > best_i, or equal and k < i}; the first r ranks merge
        carry = 0
        for i0 in range(0, na, BLOCK):
            ii = i0 + tl.arange(0, BLOCK)
            vi = ii < na
            bi = tl.load(best_ws + ii, mask=vi, other=float("-inf"))
            rank = tl.zeros([BLOCK], tl.int32)
            for k0 in range(0, na, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                bk = tl.load(best_ws + kk, mask=kk < na, other=float("-inf"))
                before = (kk < na)[None, :] & ((bk[None, :] > bi[:, None])
                                               | ((bk[None, :] == bi[:, None]) & (kk[None, :] < ii[:, None])))
                rank += tl.sum(before.to(tl.int32), 1)
            is_src = vi & (rank < r)
            is_unm = vi & (rank >= r)
            di = tl.load(dst_ws + ii, mask=vi, other=0)
            tl.store(srck_ws + rank, ii, mask=is_src)
            tl.store(dstk_ws + rank, di, mask=is_src)
            tl.store(src_ptr + b * r + rank, ii.to(tl.int64), mask=is_src & first)
            tl.store(dst_ptr + b * r + rank, di.to(tl.int64), mask=is_src & first)
            if CLS:  # unmerged rows in ascending order: slot = i - #{sources before i}
                n_src = is_src.to(tl.int32)
                slot = ii - (carry + tl.cumsum(n_src, 0) - n_src)
                carry += tl.sum(n_src, 0)
            else:  # unmerged rows in rank order
                slot = rank - r
            row_u = slot
            if DISTILL:
                row_u = tl.where(slot > 0, slot + 1, slot)
            tl.store(unm_ptr + b * (na - r) + slot, ii.to(tl.int64), mask=is_unm & first)
            tl.store(map_ptr + b * N + 2 * ii, tl.where(is_src, _out_row_b(di, na, r, DISTILL), row_u).to(tl.int64),
                     mask=vi & first)
            s_u = load_sizes(s_b, 2 * ii, is_unm, HAS_SIZE)
            tl.store(os_b + row_u, s_u, mask=is_unm & first)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                msk = is_unm[:, None] & (cc < c_hi)[None, :]
                xv = tl.load(x_b + (2 * ii)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                store_rounded(o_b + row_u[:, None] * C + cc[None, :],
                              tl.where(s_u[:, None] != 0, xv * s_u[:, None] / tl.where(s_u != 0, s_u, 1.0)[:, None],
                                       0.0), msk)
        for j0 in range(0, nb, BLOCK):
            jj = j0 + tl.arange(0, BLOCK)
            tl.store(map_ptr + b * N + 2 * jj + 1, _out_row_b(jj, na, r, DISTILL).to(tl.int64),
                     mask=(jj < nb) & first)
        tl.debug_barrier()

        # 3. group the ranks by destination (stable: rank order within a destination)
        group_by_destination(dstk_ws, r, sorted_ws, BLOCK)
        wt_ws = best_ws + na   # PYRA: [r] token weights
        wc_ws = wt_ws + r      # PYRA: [C] channel weights
        if PYRA:  # PYRA's modulation phase (PYRA_WEIGHTS: pyra_triton._pyra_weights)
            PYRA_WEIGHTS(x_b, s_b, srck_ws, dstk_ws, wt_ws, wc_ws, a_ptr, b_ptr, lnw_ptr, lnb_ptr, r, C,
                         c_lo, c_hi, eps, HAS_SIZE, BLOCK, BLOCK_C)
        tl.debug_barrier()

        # 4. merge: every B row gathers its sources (rank order), size-weighted
        for j0 in range(0, nb, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            merge_destinations(x_b, s_b, o_b, os_b, jj, jj < nb, 2 * jj + 1, _out_row_b(jj, na, r, DISTILL),
                               sorted_ws, dstk_ws, r, srck_ws, wt_ws, wc_ws, 0, 1, 1, C, c_lo, c_hi, first,
                               HAS_SIZE, False, PYRA, BLOCK, BLOCK_C)

    @triton.jit
    def _gather_kernel(y_ptr, map_ptr, out_ptr, s_ptr, osize_ptr, N, M, C,
                       SCALE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[n] = y[map[n]] (0 where map[n] < 0); SCALE: times s[n] / osize[map[n]] (merge_wavg_backward)."""
        b = tl.program_id(0).to(tl.int64)
        nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        vn = nn < N
        mp = tl.load(map_ptr + b * N + nn, mask=vn, other=-1)
        hit = vn & (mp >= 0) & (mp < M)  # out of range (only while a CUDA graph is captured): none
        msk = hit[:, None] & (cc < C)[None, :]
        v = tl.load(y_ptr + b * M * C + mp[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
        if SCALE:  # an output row of merged size 0 is the constant 0: no gradient
            osz = tl.load(osize_ptr + b * M + mp, mask=hit, other=0.0)
            w = tl.where(osz != 0, load_sizes(s_ptr + b * N, nn, hit, HAS_SIZE) / tl.where(osz != 0, osz, 1.0), 0.0)
            v = tl.where(hit[:, None], v * w[:, None], 0.0)
        store_rounded(out_ptr + b * N * C + nn[:, None] * C + cc[None, :], v, vn[:, None] & (cc < C)[None, :])

    @triton.jit
    def _segment_sum_kernel(x_ptr, order_ptr, start_ptr, out_ptr, s_ptr, osize_ptr, N, M, C,
                            WAVG: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """out[m] = sum_{n: map[n] = m} x[n] (WAVG: size-weighted average, and the merged sizes) as a
        gather: ``order`` lists the positions grouped by destination (ascending position within a
        group), ``start[m] .. start[m + 1]`` is output row m's group. O(N * C) work; a token's values
        reach only its own output row; sums in ascending position (the CPU kernels' order)."""
        b = tl.program_id(0).to(tl.int64)
        mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        pc = tl.program_id(2)
        cc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        vm = mm < M
        vc = cc < C
        st = tl.load(start_ptr + b * (M + 1) + mm, mask=vm, other=0)
        cnt = tl.load(start_ptr + b * (M + 1) + mm + 1, mask=vm, other=0) - st
        maxc = tl.max(cnt, 0)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        for t in range(0, maxc):
            vt = t < cnt
            # an unmasked load of an index clamped into this image's row (lanes past their group read an
            # entry they do not use): Triton 3.6 fails to compile a masked load here when C % 16 == 0
            # ('tt.load' op failed to verify that mask type matches ptr type, in its layout pass)
            n_idx = tl.load(order_ptr + b * N + tl.minimum(st + t, N - 1))
            v = tl.load(x_ptr + b * N * C + n_idx[:, None] * C + cc[None, :], mask=vt[:, None] & vc[None, :],
                        other=0.0).to(tl.float32)
            if WAVG:
                sv = load_sizes(s_ptr + b * N, n_idx, vt, HAS_SIZE)
                den += sv
                v = v * sv[:, None]
            acc += tl.where(vt[:, None], v, 0.0)
        if WAVG:  # a row whose sizes sum to 0 (or that nobody maps to) is 0
            acc = tl.where(den[:, None] != 0, acc / tl.where(den != 0, den, 1.0)[:, None], 0.0)
            tl.store(osize_ptr + b * M + mm, den, mask=vm & (pc == 0))
        store_rounded(out_ptr + b * M * C + mm[:, None] * C + cc[None, :], acc, vm[:, None] & vc[None, :])


# ----------------------------------------------------------------------------- launchers
# Tile shapes. On the GPU: 32-row similarity / comparison tiles (64 metric columns per step), 32 x 128
# merge tiles, 8 warps. sm_90 with a launch's specialisation (Triton 3.8, bench/aot_check.py):
# half inputs 218-246 registers, no spills, 32 KB of shared memory; float32 (3xTF32) 255 registers
# and 8-16 bytes of spill stack, 64 KB. The interpreter's cost is per block
# operation, not per element, so it runs 64-row tiles (still several blocks at the test shapes);
# tests also run the GPU tile shapes in the interpreter.
BLOCK = 64 if interpreting() else 32      # rows of A / B per similarity tile, and per rank / group comparison
BLOCK_J = 64 if interpreting() else 32    # destination rows per merge tile
BLOCK_C = 128                             # channels per merge tile
BLOCK_D = 64                              # metric columns per similarity step (any D runs, in chunks)
NUM_WARPS = 8
SPLIT = None      # channel programs per image (None: decided from B and the SM count); tests force it


def _prec() -> str:
    """Similarity tiles: 3xTF32 on tensor cores (float32 accuracy); see ``triton_common.unit_scores``."""
    return "interp" if interpreting() else "tf32x3"


def block_d(d: int) -> int:
    """Metric columns per similarity step: D rounded up to a power of two (>= 16, ``tl.dot``'s
    minimum), at most BLOCK_D."""
    return min(BLOCK_D, pow2(d, 16))


def _size_arg(size, x):
    return (size, True) if size is not None else (x, False)  # dummy pointer when absent


def tome_merge(x, metric, r, size, class_token, distill_token, pyra=None):
    """One launch: ToMe matching and size-weighted merge (PYRA-modulated with
    ``pyra=(weights, a, b, lnw, lnb, eps)``, ``weights`` the modulation phase: ``pyra_triton.pyra_merge``).
    0 <= r <= cap. Returns (out, out_size, src_idx, dst_idx, unm_idx, token_map)."""
    op = "pyra_merge (triton)" if pyra is not None else "tome_merge (triton)"
    check_merge_inputs(op, x, metric, size)
    check_r(op, r, x.shape[1], class_token, distill_token)
    x, metric = x.contiguous(), metric.contiguous()
    size = None if size is None else size.contiguous()
    bsz, n, c = x.shape
    d = metric.shape[-1]
    na = (n + 1) // 2
    dev = x.device
    if r == 0:  # the identity: a copy of x and of the sizes (float32), no launch
        i64 = dict(dtype=torch.int64, device=dev)
        out_size = (torch.ones(bsz, n, 1, dtype=torch.float32, device=dev) if size is None
                    else size.to(torch.float32, copy=True))
        return (x.clone(), out_size, torch.empty(bsz, 0, **i64), torch.empty(bsz, 0, **i64),
                torch.arange(na, **i64).expand(bsz, na).contiguous(), torch.arange(n, **i64).expand(bsz, n).contiguous())
    out = torch.empty(bsz, n - r, c, dtype=x.dtype, device=dev)
    out_size = torch.empty(bsz, n - r, 1, dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    src, dst = torch.empty(bsz, r, **i64), torch.empty(bsz, r, **i64)
    unm, tmap = torch.empty(bsz, na - r, **i64), torch.empty(bsz, n, **i64)
    if bsz == 0:
        return out, out_size, src, dst, unm, tmap
    splits, c_per = channel_split(bsz, c, BLOCK_C, dev, SPLIT)
    wsf = na + (3 * r + c if pyra is not None else 0)
    wsi = na + 3 * r
    ws_f = torch.empty(bsz * splits, wsf, dtype=torch.float32, device=dev)
    ws_i = torch.empty(bsz * splits, wsi, dtype=torch.int32, device=dev)
    s, has_size = _size_arg(size, x)
    weights, a, b, lnw, lnb, eps = pyra if pyra is not None else (None, x, x, x, x, 1e-5)
    _tome_merge_kernel[(bsz, splits)](
        x, metric, s, out, out_size, src, dst, unm, tmap, ws_f, ws_i, a, b, lnw, lnb,
        n, c, d, r, c_per, wsf, wsi, float(eps),
        HAS_SIZE=has_size, CLS=bool(class_token), DISTILL=bool(distill_token), PYRA=pyra is not None,
        PYRA_WEIGHTS=weights, BLOCK_D=block_d(d), BLOCK=BLOCK, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C, PREC=_prec(),
        num_warps=NUM_WARPS)
    return out, out_size, src, dst, unm, tmap


def tome_match(metric, r, class_token, distill_token):
    """The matching alone: the fused kernel run on the metric itself (its merged rows are discarded)."""
    _checks.kernel_tokens("tome_match (triton)", "metric", metric)
    return tome_merge(metric, metric, r, None, class_token, distill_token)[2:]


def _gather(y, token_map, size=None, out_size=None, scale=False):
    y, token_map = y.contiguous(), token_map.contiguous()
    size = None if size is None else size.contiguous()
    bsz, n = token_map.shape
    c = y.shape[-1]
    out = torch.empty(bsz, n, c, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    s, has_size = _size_arg(size, y)
    grid = (bsz, cdiv(n, BLOCK_J), cdiv(c, BLOCK_C))
    _gather_kernel[grid](y, token_map, out, s, y if out_size is None else out_size, n, y.shape[1], c,
                         SCALE=scale, HAS_SIZE=has_size, BLOCK_N=BLOCK_J, BLOCK_C=BLOCK_C, num_warps=4)
    return out


def unmerge(y, token_map):
    op = "unmerge (triton)"
    _checks.kernel_tokens(op, "y", y)
    _checks.kernel_map(op, token_map, y.device, (y.shape[0], None), y.shape[1])
    return _gather(y, token_map)


def merge_wavg_backward(grad_out, size, out_size, token_map):
    op = "merge_wavg_backward (triton)"
    _checks.kernel_tokens(op, "grad_out", grad_out)
    bsz, n_out = grad_out.shape[:2]
    _checks.kernel_map(op, token_map, grad_out.device, (bsz, None), n_out)
    if size is not None:
        _checks.kernel_tensor(op, "size", size, grad_out.device, shape=(bsz, token_map.shape[1], 1))
    _checks.kernel_tensor(op, "out_size", out_size, grad_out.device, shape=(bsz, n_out, 1))
    return _gather(grad_out, token_map, size, out_size.contiguous(), scale=True)


def _scatter(x, token_map, n_out, size=None, wavg=False):
    x, token_map = x.contiguous(), token_map.contiguous()
    size = None if size is None else size.contiguous()
    bsz, n, c = x.shape
    out = torch.empty(bsz, n_out, c, dtype=x.dtype, device=x.device)
    out_size = torch.empty(bsz, n_out, 1, dtype=torch.float32, device=x.device)
    if bsz == 0 or n_out == 0:
        return out, out_size
    # positions grouped by destination (dropped and out-of-range entries last), ascending within a group
    key = torch.where((token_map >= 0) & (token_map < n_out), token_map, n_out)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    starts = torch.searchsorted(sorted_key, torch.arange(n_out + 1, device=x.device).expand(bsz, n_out + 1)
                                .contiguous())
    s, has_size = _size_arg(size, x)
    bc = min(BLOCK_C, pow2(c, 32))
    grid = (bsz, cdiv(n_out, BLOCK_J), max(1, cdiv(c, bc)))  # C == 0: one program still writes the sizes
    _segment_sum_kernel[grid](x, order.contiguous(), starts, out, s, out_size, n, n_out, c, WAVG=wavg,
                              HAS_SIZE=has_size, BLOCK_M=BLOCK_J, BLOCK_C=bc, num_warps=4)
    return out, out_size


def _check_reduce(op, x, size, token_map, n_out):
    _checks.kernel_tokens(op, "x", x)
    _checks.kernel_int(op, "n_out", n_out, 0, _checks.MAX_OUT_ROWS)
    _checks.kernel_map(op, token_map, x.device, tuple(x.shape[:2]), n_out)
    if size is not None:
        _checks.kernel_tensor(op, "size", size, x.device, shape=(x.shape[0], x.shape[1], 1))


def merge_sum(x, token_map, n_out):
    _check_reduce("merge_sum (triton)", x, None, token_map, n_out)
    return _scatter(x, token_map, n_out)[0]


def merge_wavg(x, size, token_map, n_out):
    _check_reduce("merge_wavg (triton)", x, size, token_map, n_out)
    return _scatter(x, token_map, n_out, size, wavg=True)
