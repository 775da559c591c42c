"""Triton FPET straight-through backward (``fpet_merge_backward``, spec section 2; csrc/README.md).

Same values as ``fpet.fpet_merge_backward_reference``; all arithmetic float32. Two launches:

1. ``_fpet_bwd_metric_kernel``, one program per image, phases separated by ``tl.debug_barrier()``:
   (a) ``g_den[j] = -<grad_out[j], out[j]> / out_size[j] (+ grad_size[j])`` into the workspace,
       and the ``[Nb, D_PAD]`` accumulator of ``dB_n`` zeroed;
   (b) per block of A rows: pass 1 over B blocks: score tiles ``A_n B_n^T``, computed as
       ``(m_A m_B^T) / (||m_A|| ||m_B||)`` (prefix columns -inf), running top-2 (lowest index first
       on ties), ``t = (top1 + top2) / 2``;
       pass 2 over B blocks: ``G = z_A g_num^T + s_A g_den^T`` (a C-chunked ``tl.dot``, never
       stored), ``P = G soft (1 - soft)``, ``rowsum += P 1``, ``dA_n += P B_n``, and the image's
       ``dB_n`` accumulator ``+= P^T A_n`` (read-modify-write in fixed i-block order);
       ``dA_n -= rowsum/2 (B_n[top1] + B_n[top2])``, through the normalisation -> grad_metric[A];
   (c) per block of B rows: ``dB_n -= 1/2 sum_i rowsum_i [j in top2(i)] A_n[i]`` (a one-hot tile
       times ``A_n``), through the normalisation -> grad_metric[B].
   The dense ``[Na, Nb]`` soft / G / P matrices never reach memory: score tiles are recomputed.
2. ``_fpet_bwd_x_kernel``, one program per (image, block of tokens): with ``dest = token_map``
   (the merged row of every token, -1 for an unmatched A token), ``g_z = grad_out[dest] /
   out_size[dest]``, ``grad_x = g_z * s``, ``grad_size = <g_z, x> + g_den[dest]``.

No float atomics: every reduction has a fixed order, so results are bit-reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .shapes import grid_sizes
from .triton_common import HAS_TRITON, cdiv, check_grid, check_merge_inputs, interpreting, pow2, tl, triton

if HAS_TRITON:
    from .triton_common import checkerboard_a, checkerboard_b, load_sizes, store_rounded, unit_rows

    @triton.jit
    def _row_norms(m_ptr, pos, valid, D, D_PAD: tl.constexpr):
        """L2 norms of the raw metric rows at ``pos`` (float32, 0 where invalid)."""
        d = tl.arange(0, D_PAD)
        v = tl.load(m_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        return tl.sqrt(tl.sum(v * v, 1))

    @triton.jit
    def _raw_rows(m_ptr, pos, valid, D, D_PAD: tl.constexpr):
        """Metric rows at ``pos`` in their own dtype (0 where invalid), and their L2 norms (float32)."""
        d = tl.arange(0, D_PAD)
        v = tl.load(m_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None] & (d[None, :] < D), other=0.0)
        vf = v.to(tl.float32)
        return v, tl.sqrt(tl.sum(vf * vf, 1))

    @triton.jit
    def _cosine(ra, na, rb, nb, NATIVE: tl.constexpr, PREC: tl.constexpr):
        """Score tile ``A_n B_n^T`` from raw rows: ``(m_A m_B^T) / (||m_A|| ||m_B||)``. ``NATIVE``
        (half metric on a GPU): the half products are exact, accumulated in float32 on tensor cores."""
        if NATIVE:
            dot = tl.dot(ra, tl.trans(rb))
        else:
            dot = tl.dot(ra.to(tl.float32), tl.trans(rb.to(tl.float32)), input_precision=PREC)
        return dot / tl.maximum(na, 1e-12)[:, None] / tl.maximum(nb, 1e-12)[None, :]

    @triton.jit
    def _normalize_backward(dn, n, nrm):
        """Gradient through ``n = m / max(||m||, eps)``: ``(dn - n <n, dn>) / ||m||``, and 0 for rows
        with ``||m|| <= eps`` or a non-finite norm (docs/semantics.md)."""
        big = (nrm > 1e-12) & (nrm < float("inf"))
        n = tl.where(big[:, None], n, 0.0)
        proj = tl.sum(n * dn, 1)
        return tl.where(big[:, None], (dn - n * proj[:, None]) / tl.where(big, nrm, 1.0)[:, None], 0.0)

    @triton.jit
    def _no_nan(v):
        """Rows of a NaN metric enter the gradient products as 0 (their dS entries are 0)."""
        return tl.where(v == v, v, 0.0)

    @triton.jit
    def _fpet_bwd_metric_kernel(
        go_ptr, gsz_in_ptr, out_ptr, osz_ptr, x_ptr, m_ptr, s_ptr,  # inputs
        gm_ptr,  # output: grad_metric [B, N, D]
        gden_ptr, dbw_ptr, rs_ptr, top_ptr,  # workspace: [B, Nb], [B, Nb, D_PAD], [B, Na], [B, 2, Na]
        N, C, D, Na, Nb, p, H, W,
        HAS_SIZE: tl.constexpr, HAS_GSIZE: tl.constexpr,
        BI: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, D_PAD: tl.constexpr,
        SCORE_PREC: tl.constexpr, GRAD_PREC: tl.constexpr, NATIVE_M: tl.constexpr, NATIVE_X: tl.constexpr,
    ):
        img = tl.program_id(0).to(tl.int64)
        go_ptr += img * Nb * C
        out_ptr += img * Nb * C
        osz_ptr += img * Nb
        gsz_in_ptr += img * Nb
        x_ptr += img * N * C
        m_ptr += img * N * D
        s_ptr += img * N
        gm_ptr += img * N * D
        gden_ptr += img * Nb
        dbw_ptr += img * Nb * D_PAD
        rs_ptr += img * Na
        top_ptr += img * 2 * Na

        cc = tl.arange(0, BC)
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D

        # (a) g_den, and the dB_n accumulator zeroed
        for j0 in range(0, Nb, BJ):
            jj = j0 + tl.arange(0, BJ)
            vj = jj < Nb
            acc = tl.zeros([BJ], dtype=tl.float32)
            for c0 in range(0, C, BC):
                c = c0 + cc
                msk = vj[:, None] & (c[None, :] < C)
                g = tl.load(go_ptr + jj[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
                o = tl.load(out_ptr + jj[:, None] * C + c[None, :], mask=msk, other=0.0).to(tl.float32)
                acc += tl.sum(g * o, 1)
            den = tl.load(osz_ptr + jj, mask=vj, other=1.0).to(tl.float32)
            gd = tl.where(den != 0, -acc / tl.where(den != 0, den, 1.0), 0.0)  # constant-0 rows: no gradient
            if HAS_GSIZE:
                gd += tl.load(gsz_in_ptr + jj, mask=vj, other=0.0).to(tl.float32)
            tl.store(gden_ptr + jj, gd, mask=vj)
            tl.store(dbw_ptr + jj[:, None] * D_PAD + dd[None, :], tl.zeros([BJ, D_PAD], dtype=tl.float32),
                     mask=vj[:, None])
        tl.debug_barrier()

        # (b) blocks of A rows
        for i0 in range(0, Na, BI):
            ii = i0 + tl.arange(0, BI)
            vi = ii < Na
            pa = checkerboard_a(ii, p, H, W)
            ra, nrm_a = _raw_rows(m_ptr, pa, vi, D, D_PAD)
            an = _no_nan(ra.to(tl.float32) / tl.maximum(nrm_a, 1e-12)[:, None])
            sa = load_sizes(s_ptr, pa, vi, HAS_SIZE)

            # pass 1: running top-2 of the score rows (tiles come in increasing j: ties keep the earlier)
            r1 = tl.full([BI], float("-inf"), tl.float32)
            r2 = tl.full([BI], float("-inf"), tl.float32)
            i1 = tl.zeros([BI], dtype=tl.int32)
            i2 = tl.zeros([BI], dtype=tl.int32)
            for j0 in range(0, Nb, BJ):
                jj = j0 + tl.arange(0, BJ)
                vj = jj < Nb
                rb, nrm_b = _raw_rows(m_ptr, checkerboard_b(jj, p, H, W), vj, D, D_PAD)
                sc = _cosine(ra, nrm_a, rb, nrm_b, NATIVE_M, SCORE_PREC)
                sc = tl.where((vj & (jj >= p))[None, :] & (sc == sc), sc, float("-inf"))  # NaN: skipped
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

            # pass 2: P = G * soft * (1 - soft), tile by tile
            rowsum = tl.zeros([BI], dtype=tl.float32)
            da = tl.zeros([BI, D_PAD], dtype=tl.float32)
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

                rb, nrm_b = _raw_rows(m_ptr, checkerboard_b(jj, p, H, W), vj, D, D_PAD)
                sc = _cosine(ra, nrm_a, rb, nrm_b, NATIVE_M, SCORE_PREC)
                bn = _no_nan(rb.to(tl.float32) / tl.maximum(nrm_b, 1e-12)[:, None])
                live = vi[:, None] & (vj & (jj >= p))[None, :] & (sc == sc)
                soft = 1.0 / (1.0 + tl.exp(t[:, None] - tl.where(live, sc, 0.0)))
                pm = tl.where(live, g * soft * (1.0 - soft), 0.0)
                rowsum += tl.sum(pm, 1)
                da += tl.dot(pm, bn, input_precision=GRAD_PREC)
                wp = dbw_ptr + jj[:, None] * D_PAD + dd[None, :]
                db = tl.load(wp, mask=vj[:, None], other=0.0)
                db += tl.dot(tl.trans(pm), an, input_precision=GRAD_PREC)
                tl.store(wp, db, mask=vj[:, None])
                tl.debug_barrier()  # the next i-block reads this tile back (possibly another thread)

            b1 = _no_nan(unit_rows(m_ptr, checkerboard_b(i1, p, H, W), vi & (i1 >= 0), D, D_PAD))
            b2 = _no_nan(unit_rows(m_ptr, checkerboard_b(i2, p, H, W), vi & (i2 >= 0), D, D_PAD))
            dn = da - (0.5 * rowsum)[:, None] * (b1 + b2)
            gm = _normalize_backward(dn, an, nrm_a)
            store_rounded(gm_ptr + pa[:, None] * D + dd[None, :], gm, vi[:, None] & d_ok[None, :])
            tl.store(rs_ptr + ii, rowsum, mask=vi)
            tl.store(top_ptr + ii, i1, mask=vi)
            tl.store(top_ptr + Na + ii, i2, mask=vi)
        tl.debug_barrier()

        # (c) blocks of B rows: the top-2 correction of dB_n, then the normalisation
        for j0 in range(0, Nb, BJ):
            jj = j0 + tl.arange(0, BJ)
            vj = jj < Nb
            corr = tl.zeros([BJ, D_PAD], dtype=tl.float32)
            for i0 in range(0, Na, BI):
                ii = i0 + tl.arange(0, BI)
                vi = ii < Na
                rs = tl.load(rs_ptr + ii, mask=vi, other=0.0)
                k1 = tl.load(top_ptr + ii, mask=vi, other=-1)
                k2 = tl.load(top_ptr + Na + ii, mask=vi, other=-1)
                hit = (k1[None, :] == jj[:, None]).to(tl.float32) + (k2[None, :] == jj[:, None]).to(tl.float32)
                an = _no_nan(unit_rows(m_ptr, checkerboard_a(ii, p, H, W), vi, D, D_PAD))
                corr += tl.dot(hit * rs[None, :], an, input_precision=GRAD_PREC)
            db = tl.load(dbw_ptr + jj[:, None] * D_PAD + dd[None, :], mask=vj[:, None], other=0.0)
            dn = db - 0.5 * corr
            pb = checkerboard_b(jj, p, H, W)
            bn = unit_rows(m_ptr, pb, vj, D, D_PAD)
            gm = _normalize_backward(dn, bn, _row_norms(m_ptr, pb, vj, D, D_PAD))
            store_rounded(gm_ptr + pb[:, None] * D + dd[None, :], gm, vj[:, None] & d_ok[None, :])

    @triton.jit
    def _fpet_bwd_x_kernel(
        go_ptr, osz_ptr, gden_ptr, x_ptr, s_ptr, tmap_ptr,  # inputs (gden: launch 1's workspace)
        gx_ptr, gsz_ptr,  # outputs: grad_x [B, N, C], grad_size [B, N, 1] float32
        N, C, Nb,
        HAS_SIZE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
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
        hit = vt & (dest >= 0)
        dest = tl.where(hit, dest, 0)
        s = load_sizes(s_ptr, tt, vt, HAS_SIZE)
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


def _config(na: int, nb: int, c: int, d_pad: int, interp: bool, x_dtype, go_dtype, m_dtype,
            block_i=None, block_j=None, block_c=None) -> dict:
    """Tile sizes, warps and dot precisions of both launches (interpreter: 64-wide tiles, fewer steps).

    Dots whose operands are half inputs (x . grad_out, metric . metric) run natively on GPU tensor
    cores (products exact, float32 accumulation); float32 operands use ``tf32x3`` there (~float32
    accuracy). The interpreter computes every dot in float32 "ieee" (its bf16 dot is wrong)."""
    tile = 64 if interp else 32  # GPU: 32 x 32 tiles, 8 warps: 255 registers, spills in float32 and at D = 128
    # (16 and 176-456 bytes for sm_90, bench/aot_check.py)
    cfg = dict(
        BI=block_i or min(tile, pow2(na)), BJ=block_j or min(tile, pow2(nb)),
        BC=block_c or min(tile, pow2(c)),
        BT=32, BC_X=min(64 if not interp else 256, pow2(c)),
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
                        block_j: Optional[int] = None, block_c: Optional[int] = None):
    """Straight-through FPET backward; returns ``(grad_x [B,N,C] x.dtype, grad_metric [B,N,D]
    metric.dtype, grad_size [B,N,1] float32)``, the values of ``fpet_merge_backward_reference``.
    ``block_*`` override the tile sizes (powers of two >= 32; tests use them to span several tiles)."""
    if not HAS_TRITON:
        raise RuntimeError("fpet_merge_backward (triton): triton is not installed")
    op = "fpet_merge_backward (triton)"
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
    if bsz == 0:
        return grad_x, grad_metric, grad_s

    x, metric, grad_out, out = x.contiguous(), metric.contiguous(), grad_out.contiguous(), out.contiguous()
    out_size, token_map = out_size.contiguous(), token_map.contiguous()
    size = None if size is None else size.contiguous()
    grad_size = None if grad_size is None else grad_size.contiguous()

    d_pad = pow2(d)
    interp = interpreting()
    cfg = _config(na, nb, c, d_pad, interp, x.dtype, grad_out.dtype, metric.dtype, block_i, block_j, block_c)
    ws = torch.empty(bsz * (nb + nb * d_pad + na), dtype=torch.float32, device=dev)
    g_den = ws[: bsz * nb]
    db_ws = ws[bsz * nb: bsz * (nb + nb * d_pad)]
    rs_ws = ws[bsz * (nb + nb * d_pad):]
    top_ws = torch.empty(bsz * 2 * na, dtype=torch.int32, device=dev)

    _fpet_bwd_metric_kernel[(bsz,)](
        grad_out, x if grad_size is None else grad_size, out, out_size, x, metric, x if size is None else size,
        grad_metric, g_den, db_ws, rs_ws, top_ws,
        n, c, d, na, nb, num_prefix, H, W,
        HAS_SIZE=size is not None, HAS_GSIZE=grad_size is not None,
        BI=cfg["BI"], BJ=cfg["BJ"], BC=cfg["BC"], D_PAD=d_pad,
        SCORE_PREC=cfg["SCORE_PREC"], GRAD_PREC=cfg["GRAD_PREC"], NATIVE_M=cfg["NATIVE_M"], NATIVE_X=cfg["NATIVE_X"],
        num_warps=cfg["warps_metric"],
    )
    _fpet_bwd_x_kernel[(bsz, cdiv(n, cfg["BT"]))](
        grad_out, out_size, g_den, x, x if size is None else size, token_map,
        grad_x, grad_s, n, c, nb,
        HAS_SIZE=size is not None, BT=cfg["BT"], BC=cfg["BC_X"],
        num_warps=cfg["warps_x"],
    )
    return grad_x, grad_metric, grad_s


# ----------------------------------------------------------------------------- ahead-of-time specs
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _specialize(fn, sig: dict, const: dict, ints: dict) -> tuple[dict, dict, dict]:
    """What a launch specialises on: int arguments equal to 1 become constexprs, pointers (torch
    allocations) and ints that are multiples of 16 get ``tt.divisibility = 16``."""
    sig, const, attrs = dict(sig), dict(const), {}
    for name, val in ints.items():
        if val == 1:
            sig[name] = "constexpr"
            const[name] = 1
    for name, ty in sig.items():
        if ty.startswith("*") or (ty == "i32" and ints[name] % 16 == 0):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def aot_specs(n: int = 197, num_prefix: int = 1, h: int = 14, w: int = 14, c: int = 768, d: int = 64,
              dtypes=(torch.float16, torch.bfloat16, torch.float32), with_attrs: bool = False) -> list:
    """``(kernel, signature, constexprs, num_warps)`` of both launches as a GPU run makes them, for
    ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
    options={"num_warps": num_warps})`` without a GPU (bench/aot_check.py records the launches themselves
    instead). Default shape ViT-B/16:
    N=197, class token, 14 x 14, C=768, D=64; size and grad_size present (float32).
    ``with_attrs``: a fifth item, the launch's divisibility hints (``ASTSource(..., attrs=attrs)``);
    without them the compiler cannot vectorise the row loads and the register count rises."""
    if not HAS_TRITON:
        return []
    na, nb = grid_sizes(num_prefix, h, w)
    d_pad = pow2(d)
    specs = []
    for dt in dtypes:
        cfg = _config(na, nb, c, d_pad, False, dt, dt, dt)
        t = "*" + _TRITON_DTYPE[dt]
        ints_m = dict(N=n, C=c, D=d, Na=na, Nb=nb, p=num_prefix, H=h, W=w)
        sig_m = {
            "go_ptr": t, "gsz_in_ptr": "*fp32", "out_ptr": t, "osz_ptr": "*fp32", "x_ptr": t, "m_ptr": t,
            "s_ptr": "*fp32", "gm_ptr": t, "gden_ptr": "*fp32", "dbw_ptr": "*fp32", "rs_ptr": "*fp32",
            "top_ptr": "*i32", **{k: "i32" for k in ints_m},
        }
        const_m = dict(HAS_SIZE=True, HAS_GSIZE=True, BI=cfg["BI"], BJ=cfg["BJ"], BC=cfg["BC"], D_PAD=d_pad,
                       SCORE_PREC=cfg["SCORE_PREC"], GRAD_PREC=cfg["GRAD_PREC"], NATIVE_M=cfg["NATIVE_M"],
                       NATIVE_X=cfg["NATIVE_X"])
        sig_m.update({k: "constexpr" for k in const_m})
        ints_x = dict(N=n, C=c, Nb=nb)
        sig_x = {
            "go_ptr": t, "osz_ptr": "*fp32", "gden_ptr": "*fp32", "x_ptr": t, "s_ptr": "*fp32", "tmap_ptr": "*i64",
            "gx_ptr": t, "gsz_ptr": "*fp32", **{k: "i32" for k in ints_x},
        }
        const_x = dict(HAS_SIZE=True, BT=cfg["BT"], BC=cfg["BC_X"])
        sig_x.update({k: "constexpr" for k in const_x})
        for fn, sig, const, ints, warps in ((_fpet_bwd_metric_kernel, sig_m, const_m, ints_m, cfg["warps_metric"]),
                                            (_fpet_bwd_x_kernel, sig_x, const_x, ints_x, cfg["warps_x"])):
            sig, const, attrs = _specialize(fn, sig, const, ints)
            specs.append((fn, sig, const, warps, attrs) if with_attrs else (fn, sig, const, warps))
    return specs
