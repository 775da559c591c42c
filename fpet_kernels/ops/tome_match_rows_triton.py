"""Triton kernel of ``tome_match_rows`` (``ops/tome.py``): ToMe's matching with a token count and an r
per row (padded batches: tokens of size 0 are padding; threshold merging). The oracle is
``tome_match_rows_reference``; the semantics: docs/semantics.md "Padded batches and threshold merging".

ONE launch, one program per image, in phases separated by barriers:
  0. counts over the row's tokens: valid tokens, valid / candidate A and B tokens, the protected
     valid tokens, hence the row's cap on r;
  1. similarity tiles (as ``tome_triton``: chunked over D, NaN as the largest score), masked to the
     candidate sources (valid A tokens but the class token) and destinations (valid B tokens but the
     distillation token); best score and lowest argmax per A row, and the count of candidates reaching
     the threshold; the row's r;
  2. the output row of every valid B token (``n_unm + its rank among the valid B``; the first at 1 with
     a distillation token) into a workspace, and the B entries of the token map;
  3. the rank of every A row by a counting comparison of the keys (group: candidate, class token,
     padding; best descending; index), the source / destination / unmerged indices and the A entries
     of the map; the -1 tails; the identity map of a row that merges nothing.
The index outputs equal the reference's (float32 scores)."""
from __future__ import annotations

import torch

from .. import _checks
from .triton_common import HAS_TRITON, interpreting, pow2, tl, triton

if HAS_TRITON:
    from .triton_common import row_norms, unit_scores

    @triton.jit
    def _valid(s_b, pos, inb, HAS_SIZE: tl.constexpr):
        """Tokens at ``pos`` that are not padding (size != 0); False outside the row (``inb`` False)."""
        if HAS_SIZE:
            return inb & (tl.load(s_b + pos, mask=inb, other=0.0) != 0)
        return inb

    @triton.jit
    def _tome_match_rows_kernel(m_ptr, s_ptr, src_ptr, dst_ptr, unm_ptr, map_ptr, kept_ptr, wsf_ptr, wsi_ptr,
                                N, D, R, r, thr,
                                HAS_SIZE: tl.constexpr, HAS_R: tl.constexpr, HAS_THR: tl.constexpr,
                                CLS: tl.constexpr, DISTILL: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        na = (N + 1) // 2
        nb = N // 2
        m_b = m_ptr + b * N * D
        s_b = s_ptr + b * N
        best_ws = wsf_ptr + b * na     # [Na] best score of each A row (-inf: not a candidate)
        dst_ws = wsi_ptr + b * (na + nb)  # [Na] its best B row
        posb_ws = dst_ws + na          # [Nb] output row of each B token (-1: padding)

        # 0. counts
        n_valid = 0
        na_valid = 0
        n_cand_a = 0
        n_cand_b = 0
        for n0 in range(0, N, BLOCK):
            nn = n0 + tl.arange(0, BLOCK)
            v = _valid(s_b, nn, nn < N, HAS_SIZE)
            is_a = (nn % 2) == 0
            ca = v & is_a
            cb = v & ~is_a
            na_valid += tl.sum(ca.to(tl.int32), 0)
            if CLS:
                ca = ca & (nn != 0)
            if DISTILL:
                cb = cb & (nn != 1)
            n_valid += tl.sum(v.to(tl.int32), 0)
            n_cand_a += tl.sum(ca.to(tl.int32), 0)
            n_cand_b += tl.sum(cb.to(tl.int32), 0)
        prot = 0
        if CLS:
            prot += tl.sum(_valid(s_b, tl.arange(0, 2), tl.arange(0, 2) < tl.minimum(N, 1), HAS_SIZE).to(tl.int32), 0)
        if DISTILL:
            p1 = tl.arange(0, 2) + 1
            prot += tl.sum(_valid(s_b, p1, (p1 < N) & (p1 < 2), HAS_SIZE).to(tl.int32), 0)
        cap = tl.minimum((n_valid - prot) // 2, n_cand_a)
        cap = tl.where(n_cand_b > 0, cap, 0)
        if HAS_R:
            cap = tl.minimum(cap, r)

        # 1. best[i] = max over candidate B of <a_i, b_j> (NaN largest), dst[i] = lowest argmax
        reach = 0
        for i0 in range(0, na, BLOCK):
            ii = i0 + tl.arange(0, BLOCK)
            vi = ii < na
            ca = _valid(s_b, 2 * ii, vi, HAS_SIZE)
            if CLS:
                ca = ca & (ii != 0)
            den_a = row_norms(m_b, 2 * ii, vi, D, BLOCK_D)
            best = tl.full([BLOCK], float("-inf"), tl.float32)
            arg = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, nb, BLOCK):
                jj = j0 + tl.arange(0, BLOCK)
                vj = jj < nb
                cb = _valid(s_b, 2 * jj + 1, vj, HAS_SIZE)
                if DISTILL:
                    cb = cb & (jj != 0)
                s = unit_scores(m_b, 2 * ii, vi, den_a, 2 * jj + 1, vj, row_norms(m_b, 2 * jj + 1, vj, D, BLOCK_D), D,
                                BLOCK_D, PREC)
                s = tl.where(s != s, float("inf"), s)  # NaN: the largest score (as torch.max / torch.sort)
                s = tl.where(ca[:, None] & cb[None, :], s, float("-inf"))
                bmax = tl.max(s, 1)
                barg = tl.min(tl.where(s == bmax[:, None], jj[None, :], 2147483647), 1)
                upd = bmax > best
                arg = tl.where(upd, barg, arg)
                best = tl.where(upd, bmax, best)
            best = tl.where(ca, best, float("-inf"))
            if HAS_THR:
                reach += tl.sum((ca & (best >= thr)).to(tl.int32), 0)
            tl.store(best_ws + ii, best, mask=vi)
            tl.store(dst_ws + ii, arg, mask=vi)
        r_row = cap
        if HAS_THR:
            r_row = tl.minimum(reach, cap)
        n_unm = na_valid - r_row
        merges = r_row > 0
        tl.store(kept_ptr + b, (n_valid - r_row).to(tl.int64))

        # 2. output rows of the B tokens (the j-th valid one: n_unm + j; the first at 1 with a distill token)
        carry = 0
        for j0 in range(0, nb, BLOCK):
            jj = j0 + tl.arange(0, BLOCK)
            vj = jj < nb
            vbj = _valid(s_b, 2 * jj + 1, vj, HAS_SIZE)
            k = carry + tl.cumsum(vbj.to(tl.int32), 0) - 1
            carry += tl.sum(vbj.to(tl.int32), 0)
            pos = n_unm + k
            if DISTILL:
                pos = tl.where(k == 0, 1, pos)
            pos = tl.where(vbj, pos, -1)
            tl.store(posb_ws + jj, pos, mask=vj)
            tl.store(map_ptr + b * N + 2 * jj + 1, pos.to(tl.int64), mask=vj & merges)
        tl.debug_barrier()

        # 3. rank[i] = #{k: key_k < key_i}, key = (group, best descending, index); the first r_row merge
        carry = 0
        for i0 in range(0, na, BLOCK):
            ii = i0 + tl.arange(0, BLOCK)
            vi = ii < na
            va = _valid(s_b, 2 * ii, vi, HAS_SIZE)
            gi = (~va).to(tl.int32)
            if CLS:
                gi += (va & (ii == 0)).to(tl.int32)
            bi = tl.load(best_ws + ii, mask=vi, other=float("-inf"))
            rank = tl.zeros([BLOCK], tl.int32)
            for k0 in range(0, na, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                vk = kk < na
                vak = _valid(s_b, 2 * kk, vk, HAS_SIZE)
                gk = (~vak).to(tl.int32)
                if CLS:
                    gk += (vak & (kk == 0)).to(tl.int32)
                bk = tl.load(best_ws + kk, mask=vk, other=float("-inf"))
                ahead = (gk[None, :] < gi[:, None]) | ((gk[None, :] == gi[:, None]) & (
                    (bk[None, :] > bi[:, None]) | ((bk[None, :] == bi[:, None]) & (kk[None, :] < ii[:, None]))))
                rank += tl.sum((vk[None, :] & ahead).to(tl.int32), 1)
            is_src = vi & (rank < r_row)
            is_unm = vi & va & (rank >= r_row)
            di = tl.load(dst_ws + ii, mask=vi, other=0)
            tl.store(src_ptr + b * R + rank, ii.to(tl.int64), mask=is_src)
            tl.store(dst_ptr + b * R + rank, di.to(tl.int64), mask=is_src)
            # unmerged slot: ascending (a class token, or a row that merges nothing) or rank order
            n_u = is_unm.to(tl.int32)
            slot_asc = carry + tl.cumsum(n_u, 0) - n_u
            carry += tl.sum(n_u, 0)
            if CLS:
                slot = slot_asc
            else:
                slot = tl.where(merges, rank - r_row, slot_asc)
            tl.store(unm_ptr + b * na + slot, ii.to(tl.int64), mask=is_unm)
            row_u = slot
            if DISTILL:
                row_u = tl.where(slot > 0, slot + 1, slot)
            pb = tl.load(posb_ws + di, mask=is_src, other=-1)
            tl.store(map_ptr + b * N + 2 * ii, tl.where(is_src, pb, tl.where(is_unm, row_u, -1)).to(tl.int64),
                     mask=vi & merges)
        # the -1 tails (slots no token above writes)
        for k0 in range(0, R, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            tail = (kk < R) & (kk >= r_row)
            tl.store(src_ptr + b * R + kk, tl.full([BLOCK], -1, tl.int64), mask=tail)
            tl.store(dst_ptr + b * R + kk, tl.full([BLOCK], -1, tl.int64), mask=tail)
        for k0 in range(0, na, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            tl.store(unm_ptr + b * na + kk, tl.full([BLOCK], -1, tl.int64), mask=(kk < na) & (kk >= n_unm))
        # a row that merges nothing: every valid token in input order
        carry = 0
        for n0 in range(0, N, BLOCK):
            nn = n0 + tl.arange(0, BLOCK)
            vn = nn < N
            v = _valid(s_b, nn, vn, HAS_SIZE)
            k = carry + tl.cumsum(v.to(tl.int32), 0) - 1
            carry += tl.sum(v.to(tl.int32), 0)
            tl.store(map_ptr + b * N + nn, tl.where(v, k, -1).to(tl.int64), mask=vn & ~merges)


BLOCK = 64 if interpreting() else 32  # rows per similarity / comparison tile (as tome_triton)
BLOCK_D = 64
NUM_WARPS = 8


def _prec() -> str:
    return "interp" if interpreting() else "tf32x3"


def tome_match_rows(metric, r, class_token, distill_token, size, threshold):
    """The launcher of ``torch.ops.fpet.tome_match_rows_triton``: checks (every index the kernel writes
    is bounded by the shapes), outputs, one launch. Returns (src [B, R], dst [B, R], unm [B, Na],
    token_map [B, N], kept [B])."""
    op = "tome_match_rows (triton)"
    _checks.kernel_tokens(op, "metric", metric)
    bsz, n, d = metric.shape
    dev = metric.device
    if size is not None:
        _checks.kernel_tensor(op, "size", size, dev, shape=(bsz, n, 1))
    _checks.flag("class_token", class_token)
    _checks.flag("distill_token", distill_token)
    if r is not None:
        _checks.kernel_int(op, "r", r, 0)
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0:  # False for NaN
        raise ValueError(f"{op}: threshold must be a number in [-1, 1], got {threshold!r}")
    cap = _checks.r_cap(n, class_token, distill_token)
    big = cap if r is None else min(r, cap)
    na, nb = (n + 1) // 2, n // 2
    i64 = dict(dtype=torch.int64, device=dev)
    src, dst = torch.empty(bsz, big, **i64), torch.empty(bsz, big, **i64)
    unm, tmap, kept = torch.empty(bsz, na, **i64), torch.empty(bsz, n, **i64), torch.empty(bsz, **i64)
    if bsz == 0 or n == 0:
        kept.zero_()
        return src, dst, unm, tmap, kept
    metric = metric.contiguous()
    s = metric if size is None else size.contiguous()
    ws_f = torch.empty(bsz, na, dtype=torch.float32, device=dev)
    ws_i = torch.empty(bsz, na + nb, dtype=torch.int32, device=dev)
    _tome_match_rows_kernel[(bsz,)](
        metric, s, src, dst, unm, tmap, kept, ws_f, ws_i, n, d, big, 0 if r is None else int(r),
        0.0 if threshold is None else float(threshold),
        HAS_SIZE=size is not None, HAS_R=r is not None, HAS_THR=threshold is not None, CLS=bool(class_token),
        DISTILL=bool(distill_token), BLOCK_D=min(BLOCK_D, pow2(d, 16)), BLOCK=BLOCK, PREC=_prec(),
        num_warps=NUM_WARPS)
    return src, dst, unm, tmap, kept
