"""PYRA token modulation merged with ToMe matching (spec section 3).

Read top to bottom:
  1. reference: the spec in plain PyTorch (fallback and oracle) and the closed-form backward;
  2. the op records (``library.Op``) of ``torch.ops.fpet.{pyra_merge, pyra_merge_backward}`` (C++
     kernels) and their ``_triton`` twins: schemas, fake kernels, schema-shaped references, the export
     formulation, autograd;
  3. the public API ``pyra_merge``: checks, ``library.dispatch``, the ``Matching`` wrap (``padded`` /
     ``threshold``: the per-row matching, ``library.dispatch`` of ``pyra_merge_rows``, ``trim_rows`` and
     the ``RowMatching`` wrap).

PYRA's files: this module, ``pyra_triton.py`` (forward, the ToMe kernel of ``tome_triton.py`` with
this modulation phase), ``pyra_triton_backward.py``, ``csrc/cpu/pyra.cpp``, ``csrc/cpu/pyra_backward.cpp``,
``csrc/cuda/pyra_merge.cuh`` + ``pyra_merge.cu`` (the ToMe body of ``tome_merge.cuh`` with this
modulation) and ``csrc/cuda/pyra_merge_backward.cuh`` + ``pyra_merge_backward.cu``; the per-row op
``pyra_merge_rows`` and its backward (padded batches, threshold merging): ``csrc/cpu/pyra_rows.cpp``,
``csrc/cuda/pyra_merge_rows.cuh`` + ``pyra_merge_rows.cu``, ``pyra_rows_triton.py``.

Per merging layer PYRA learns ``a`` [r, 1], ``b`` [1, C] and a LayerNorm over C. On the sized
tokens ``z = x * size``, with ``S`` the r source rows (rank order) and ``T`` their destinations:
``W = LN(S + T)``, ``wc = 2 sigmoid(a^T W)`` [1, C], ``wt = 2 sigmoid(W b^T) - 1`` [r, 1],
``S' = S + S * wc * wt``; ``S'`` is sum-merged instead of ``S``, sizes merge unmodulated.
``pyra_merge_rows_reference``: the same per row of a padded batch or under a threshold (row b
modulates its r_b sources with ``a[:r_b]``; docs/semantics.md "Padded batches and threshold merging").
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from . import library
from .shapes import cap_r, compute_dtype, size_dtype
from .tome import (Matching, RowMatching, assemble, check_rows_fit, gather_by_map, match_rows, merge_by_indices, output_rows,
                   rows_args, safe_div, static_rows, sum_by_map, tome_match_export, tome_match_reference,
                   tome_match_rows_reference, trim_rows, valid_tokens)


# ----------------------------------------------------------------------------- 1. reference
def _modulation(z: Tensor, src: Tensor, dst: Tensor, a, b, ln_weight, ln_bias, eps: float):
    """S, T, the LayerNorm pieces and the two weights, all [B, r, ...] in z's dtype."""
    bsz, _, c = z.shape
    r = src.shape[1]
    cdt = z.dtype
    s_rows = z[:, 0::2].gather(1, src[..., None].expand(bsz, r, c))
    t_rows = z[:, 1::2].gather(1, dst[..., None].expand(bsz, r, c))
    w = F.layer_norm(s_rows + t_rows, (c,), ln_weight.to(cdt), ln_bias.to(cdt), eps)
    wc = 2 * torch.sigmoid((a.to(cdt).view(1, r, 1) * w).sum(1, keepdim=True))  # [B, 1, C]
    wt = 2 * torch.sigmoid((w * b.to(cdt).view(1, 1, c)).sum(-1, keepdim=True)) - 1  # [B, r, 1]
    return s_rows, t_rows, w, wc, wt


def pyra_merge_reference(x: Tensor, metric: Tensor, r: int, a: Tensor, b: Tensor, ln_weight: Tensor,
                         ln_bias: Tensor, size: Optional[Tensor] = None, class_token: bool = False,
                         distill_token: bool = False, eps: float = 1e-5):
    """Spec 3. ``a`` has exactly ``r`` rows (the effective, capped r). Returns (x', size', Matching)."""
    src, dst, unm, tmap = tome_match_reference(metric, r, class_token, distill_token)
    r = src.shape[1]
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if r == 0:
        return x.clone(), s.to(size_dtype(x, size)).clone(), Matching(src, dst, unm, tmap)
    bsz, _, c = x.shape
    z = x.to(cdt) * s
    s_rows, _, _, wc, wt = _modulation(z, src, dst, a, b, ln_weight, ln_bias, eps)
    s_mod = s_rows + s_rows * wc * wt
    za, zb = z[:, 0::2], z[:, 1::2]
    unm_rows = za.gather(1, unm[..., None].expand(bsz, unm.shape[1], c))
    b_rows = zb.scatter_add(1, dst[..., None].expand(bsz, r, c), s_mod)
    num = assemble(unm_rows, b_rows, distill_token)
    den = merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return safe_div(num, den).to(x.dtype), den.to(size_dtype(x, size)), Matching(src, dst, unm, tmap)


def pyra_merge_backward_reference(grad_out, grad_out_size, x, size, out, out_size, src, dst, unm, a, b,
                                  ln_weight, ln_bias, eps: float, distill_token: bool):
    """Closed-form backward of ``pyra_merge`` -> (grad_x, grad_a, grad_b, grad_ln_weight, grad_ln_bias, grad_size)."""
    bsz, n, c = x.shape
    r, na, nb = src.shape[1], (n + 1) // 2, n // 2
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(bsz, n, 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    xs = x.to(cdt)
    z = xs * s
    s_rows, t_rows, w, wc, wt = _modulation(z, src, dst, a, b, ln_weight, ln_bias, eps)
    y = s_rows + t_rows
    mu = y.mean(-1, keepdim=True)
    rstd = torch.rsqrt((y - mu).square().mean(-1, keepdim=True) + eps)
    yh = (y - mu) * rstd

    den = out_size.to(cdt)
    g_num = safe_div(grad_out.to(cdt), den)  # 0 at a row whose sizes sum to 0 (the constant 0)
    pos_unm, pos_b = output_rows(na, nb, r, distill_token, x.device)
    g_unm, g_b = g_num[:, pos_unm], g_num[:, pos_b]
    g_smod = g_b.gather(1, dst[..., None].expand(bsz, r, c))
    g_s = g_smod * (1 + wc * wt)
    g_wc = (g_smod * s_rows * wt).sum(1, keepdim=True)
    g_wt = (g_smod * s_rows * wc).sum(-1, keepdim=True)
    g_u = g_wc * wc * (1 - wc / 2)  # d(2 sigmoid(u))/du = 2 sig (1 - sig)
    sig_v = (wt + 1) / 2
    g_v = g_wt * 2 * sig_v * (1 - sig_v)
    a_c, b_c = a.to(cdt).view(1, r, 1), b.to(cdt).view(1, 1, c)
    grad_a = (g_u * w).sum(-1).sum(0).view(r, 1)
    grad_b = (g_v * w).sum(1).sum(0).view(1, c)
    g_w = a_c * g_u + g_v * b_c
    grad_lnw = (g_w * yh).sum((0, 1))
    grad_lnb = g_w.sum((0, 1))
    g_yh = g_w * ln_weight.to(cdt)
    g_y = rstd * (g_yh - g_yh.mean(-1, keepdim=True) - yh * (g_yh * yh).mean(-1, keepdim=True))

    g_za = torch.zeros(bsz, na, c, dtype=cdt, device=x.device)
    g_za.scatter_(1, unm[..., None].expand(bsz, unm.shape[1], c), g_unm)
    g_za.scatter_(1, src[..., None].expand(bsz, r, c), g_s + g_y)
    g_zb = g_b.scatter_add(1, dst[..., None].expand(bsz, r, c), g_y)
    g_z = torch.empty_like(z)
    g_z[:, 0::2], g_z[:, 1::2] = g_za, g_zb
    # sizes: through z (g_z * x) and through the denominator (-<g_num, out> of the row holding n)
    g_den = -(g_num * out.to(cdt)).sum(-1, keepdim=True)
    if grad_out_size is not None:
        g_den = g_den + grad_out_size.to(cdt)
    pos_of = torch.empty(bsz, n, dtype=torch.int64, device=x.device)
    pos_a = torch.empty(bsz, na, dtype=torch.int64, device=x.device)
    pos_a.scatter_(1, unm, pos_unm.expand(bsz, -1))
    pos_a.scatter_(1, src, pos_b[dst])
    pos_of[:, 0::2], pos_of[:, 1::2] = pos_a, pos_b.expand(bsz, -1)
    grad_size = (g_z * xs).sum(-1, keepdim=True) + g_den.gather(1, pos_of.unsqueeze(-1))
    return ((g_z * s).to(x.dtype), grad_a.to(a.dtype), grad_b.to(b.dtype), grad_lnw.to(ln_weight.dtype),
            grad_lnb.to(ln_bias.dtype), grad_size.to(out_size.dtype))


def pyra_merge_rows_reference(x: Tensor, metric: Tensor, r: int, a: Tensor, b: Tensor, ln_weight: Tensor,
                              ln_bias: Tensor, size: Optional[Tensor] = None, class_token: bool = False,
                              distill_token: bool = False, eps: float = 1e-5, padded: bool = False,
                              threshold: Optional[float] = None):
    """Spec 3 with a token count and an r per row (docs/semantics.md "Padded batches and threshold
    merging"): row b modulates its ``r_b`` sources with ``a[:r_b]`` (rank order), exactly as the row
    alone would; ``a`` has the static r rows (``static_r``). Returns ``(x' [B, n_out, C], size',
    RowMatching)`` as ``tome_merge_rows_reference``. Differentiable (plain autograd): the matching
    (``tome_match_rows_reference``), then :func:`pyra_merge_rows_op_reference`, the reference of the op
    ``pyra_merge_rows``."""
    valid = valid_tokens(size if padded else None, x)
    src, dst, unm, tmap, kept = tome_match_rows_reference(metric, r, class_token, distill_token, valid, threshold)
    n_out = static_rows(x.shape[1], r, threshold, class_token, distill_token)
    check_rows_fit(kept, n_out)
    out, out_size = pyra_merge_rows_op_reference(x, size, src, dst, tmap, a, b, ln_weight, ln_bias, n_out, eps)
    return out, out_size, RowMatching(src, dst, unm, tmap, kept)


def _rows_modulation(z: Tensor, src: Tensor, dst: Tensor, a, b, ln_weight, ln_bias, eps: float):
    """:func:`_modulation` of a per-row matching (entries -1 past each row's ``r_b`` ranks): S, T, the
    live mask [B, R, 1], the normalised ``yh``, its ``rstd``, ``W`` and the two weights; every rank past
    ``r_b`` has S = T = W = 0 (a constant row: no NaN from it) and takes no part in ``wc``."""
    bsz, _, c = z.shape
    rr = src.shape[1]
    cdt = z.dtype
    live = (src >= 0).unsqueeze(-1)
    s_rows, t_rows = (torch.where(live, h.gather(1, i.clamp_min(0)[..., None].expand(bsz, rr, c)), 0)
                      for h, i in ((z[:, 0::2], src), (z[:, 1::2], dst)))
    y = s_rows + t_rows
    mu = y.mean(-1, keepdim=True)
    rstd = torch.rsqrt((y - mu).square().mean(-1, keepdim=True) + eps)
    yh = (y - mu) * rstd
    w = torch.where(live, yh * ln_weight.to(cdt) + ln_bias.to(cdt), 0)
    wc = 2 * torch.sigmoid((a.to(cdt).view(1, rr, 1) * w).sum(1, keepdim=True))  # only ranks < r_b
    wt = 2 * torch.sigmoid((w * b.to(cdt).view(1, 1, c)).sum(-1, keepdim=True)) - 1
    return s_rows, t_rows, live, yh, rstd, w, wc, wt


def pyra_merge_rows_op_reference(x: Tensor, size: Optional[Tensor], src_idx: Tensor, dst_idx: Tensor,
                                 token_map: Tensor, a: Tensor, b: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                                 n_out: int, eps: float):
    """The op ``pyra_merge_rows``: PYRA's modulated size-weighted merge along a GIVEN per-row matching
    (``tome_match_rows``: ``src_idx`` / ``dst_idx`` [B, R] with -1 past each row's ``r_b`` ranks, the
    ``token_map`` [B, N] with -1 for padding) into ``n_out`` rows. Row b modulates its ``r_b`` sources
    with ``a[:r_b]``; every output row m is ``sum z' / sum s`` over the tokens mapped to it, where
    ``z' = x * s`` except at a source, ``S' = S + S * wc * wt``. Returns ``(x', size')``. Plain
    differentiable PyTorch (the closed-form backward: :func:`pyra_merge_rows_backward_reference`)."""
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    z = x.to(cdt) * s
    bsz, n, c = x.shape
    rr = src_idx.shape[1]
    if rr:
        s_rows, _, live, _, _, _, wc, wt = _rows_modulation(z, src_idx, dst_idx, a, b, ln_weight, ln_bias, eps)
        s_mod = s_rows + s_rows * wc * wt
        # the sources' sized values replaced by S' (ranks past r_b write into a dump row)
        za = torch.cat([z[:, 0::2], z.new_zeros(bsz, 1, c)], dim=1)
        na = za.shape[1] - 1
        za = za.scatter(1, torch.where(live, src_idx.unsqueeze(-1), na).expand(bsz, rr, c), s_mod)[:, :na]
        z = z.clone()
        z[:, 0::2] = za
    num, den = sum_by_map(z, token_map, n_out), sum_by_map(s, token_map, n_out)
    return safe_div(num, den).to(x.dtype), den.to(size_dtype(x, size))


def pyra_merge_rows_backward_reference(grad_out: Tensor, grad_out_size: Optional[Tensor], x: Tensor,
                                       size: Optional[Tensor], out: Tensor, out_size: Tensor, src_idx: Tensor,
                                       dst_idx: Tensor, token_map: Tensor, a: Tensor, b: Tensor, ln_weight: Tensor,
                                       ln_bias: Tensor, eps: float):
    """Closed-form backward of ``pyra_merge_rows`` -> (grad_x, grad_a, grad_b, grad_ln_weight, grad_ln_bias,
    grad_size) (the order of ``pyra_merge_backward``). Ranks past each row's ``r_b`` contribute nothing;
    padding tokens (map -1) get 0.

    With ``g_num[m] = grad_out[m] / out_size[m]`` (0 where the size is 0) and ``G[n] = g_num[map[n]]``:
    a source's ``S'`` gets G, so ``g_S = G (1 + wc wt)`` plus the LayerNorm path ``g_y``, a destination
    ``G + sum g_y`` of its sources, any other token G; ``grad_x = g_z s`` and
    ``grad_size = <g_z, x> + g_den[map[n]]``, ``g_den[m] = -<g_num[m], out[m]> + grad_out_size[m]``."""
    bsz, n, c = x.shape
    rr = src_idx.shape[1]
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(bsz, n, 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    xs = x.to(cdt)
    z = xs * s
    g_num = safe_div(grad_out.to(cdt), out_size.to(cdt))  # 0 at a row whose sizes sum to 0 (the constant 0)
    g_z = gather_by_map(g_num, token_map)  # [B, N, C]: 0 for padding
    grad_a = torch.zeros(rr, 1, dtype=cdt, device=x.device)
    grad_b = torch.zeros(1, c, dtype=cdt, device=x.device)
    grad_lnw = torch.zeros(c, dtype=cdt, device=x.device)
    grad_lnb = torch.zeros(c, dtype=cdt, device=x.device)
    if rr:
        s_rows, _, live, yh, rstd, w, wc, wt = _rows_modulation(z, src_idx, dst_idx, a, b, ln_weight, ln_bias, eps)
        na = (n + 1) // 2
        src_c, dst_c = src_idx.clamp_min(0), dst_idx.clamp_min(0)
        g_smod = torch.where(live, g_z[:, 0::2].gather(1, src_c[..., None].expand(bsz, rr, c)), 0)
        g_s = g_smod * (1 + wc * wt)
        g_wc = (g_smod * s_rows * wt).sum(1, keepdim=True)
        g_wt = (g_smod * s_rows * wc).sum(-1, keepdim=True)
        g_u = g_wc * wc * (1 - wc / 2)  # d(2 sigmoid(u))/du = 2 sig (1 - sig)
        sig_v = (wt + 1) / 2
        g_v = g_wt * 2 * sig_v * (1 - sig_v)
        a_c, b_c = a.to(cdt).view(1, rr, 1), b.to(cdt).view(1, 1, c)
        grad_a = (g_u * w).sum(-1).sum(0).view(rr, 1)
        grad_b = (g_v * w).sum(1).sum(0).view(1, c)
        g_w = torch.where(live, a_c * g_u + g_v * b_c, 0)
        grad_lnw = (g_w * yh).sum((0, 1))
        grad_lnb = g_w.sum((0, 1))
        g_yh = g_w * ln_weight.to(cdt)
        g_y = rstd * (g_yh - g_yh.mean(-1, keepdim=True) - yh * (g_yh * yh).mean(-1, keepdim=True))
        g_y = torch.where(live, g_y, 0)
        # sources: replaced by g_S + g_y (ranks past r_b into a dump row); destinations: + g_y
        g_za = torch.cat([g_z[:, 0::2], g_z.new_zeros(bsz, 1, c)], dim=1)
        g_za = g_za.scatter(1, torch.where(live, src_c.unsqueeze(-1), na).expand(bsz, rr, c), g_s + g_y)[:, :na]
        g_zb = g_z[:, 1::2].scatter_add(1, dst_c[..., None].expand(bsz, rr, c), g_y)
        g_z = torch.empty_like(g_z)
        g_z[:, 0::2], g_z[:, 1::2] = g_za, g_zb
    # sizes: through z (g_z * x) and through the denominator (-<g_num, out> of the row holding n)
    g_den = -(g_num * out.to(cdt)).sum(-1, keepdim=True)
    if grad_out_size is not None:
        g_den = g_den + grad_out_size.to(cdt)
    grad_size = (g_z * xs).sum(-1, keepdim=True) + gather_by_map(g_den, token_map)
    return ((g_z * s).to(x.dtype), grad_a.to(a.dtype), grad_b.to(b.dtype), grad_lnw.to(ln_weight.dtype),
            grad_lnb.to(ln_bias.dtype), grad_size.to(out_size.dtype))


# ----------------------------------------------------------------------------- 2. registered ops
# ``torch.ops.fpet.pyra_merge``: C++ kernels (csrc/cpu/pyra.cpp, csrc/cuda/pyra_merge.cu);
# ``pyra_merge_triton``: pyra_triton.py. The fused backward ``pyra_merge_backward``:
# csrc/cpu/pyra_backward.cpp, csrc/cuda/pyra_merge_backward.cu, pyra_triton_backward.py. See ops/library.py.
def _fake_pyra(x, metric, r, a, b, ln_weight, ln_bias, size, class_token, distill_token, eps):
    bsz, n, c = x.shape
    na = (n + 1) // 2
    i64 = dict(dtype=torch.int64)
    return (x.new_empty(bsz, n - r, c), x.new_empty(bsz, n - r, 1, dtype=size_dtype(x, size)),
            x.new_empty(bsz, r, **i64), x.new_empty(bsz, r, **i64), x.new_empty(bsz, na - r, **i64),
            x.new_empty(bsz, n, **i64))


def _fake_pyra_backward(grad_out, grad_out_size, x, size, out, out_size, src, dst, unm, a, b, ln_weight, ln_bias,
                        eps, distill_token):
    return (torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(ln_weight),
            torch.empty_like(ln_bias), x.new_empty(*x.shape[:2], 1, dtype=out_size.dtype))


def _pyra_merge_op_reference(x, metric, r, a, b, ln_weight, ln_bias, size, class_token, distill_token, eps):
    """:func:`pyra_merge_reference` with the op's schema and outputs (x', size', src, dst, unm, token_map)."""
    out, out_size, m = pyra_merge_reference(x, metric, r, a, b, ln_weight, ln_bias, size, class_token, distill_token,
                                            eps)
    return (out, out_size, *m)


def _pyra_merge_export(x: Tensor, metric: Tensor, r: int, a: Tensor, b: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                       size, class_token: bool, distill_token: bool, eps: float):
    """What ``torch.onnx.export`` traces in place of ``pyra_merge``: :func:`pyra_merge_reference` with
    ToMe's export-friendly matching (``tome.tome_match_export``: ``topk``, no stable sort)
    and no in-place writes. Returns (x', size', src_idx, dst_idx, unm_idx, token_map)."""
    src, dst, unm, tmap = tome_match_export(metric, r, class_token, distill_token)
    r = src.shape[1]
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if r == 0:
        return x, s.to(size_dtype(x, size)), src, dst, unm, tmap
    bsz, _, c = x.shape
    z = x.to(cdt) * s
    s_rows, _, _, wc, wt = _modulation(z, src, dst, a, b, ln_weight, ln_bias, eps)
    s_mod = s_rows + s_rows * wc * wt
    unm_rows = z[:, 0::2].gather(1, unm[..., None].expand(bsz, unm.shape[1], c))
    b_rows = z[:, 1::2].scatter_add(1, dst[..., None].expand(bsz, r, c), s_mod)
    num = assemble(unm_rows, b_rows, distill_token)
    den = merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return (num / den).to(x.dtype), den.to(size_dtype(x, size)), src, dst, unm, tmap


def _pyra_setup(ctx, inputs, output):
    x, _, r, a, b, lnw, lnb, size, _, distill_token, eps = inputs
    out, out_size, src, dst, unm, _ = output
    ctx.args = (eps, distill_token)
    ctx.r = r
    ctx.save_for_backward(x, size, out, out_size, src, dst, unm, a, b, lnw, lnb)


def _pyra_backward(ctx, grad_out, grad_out_size, *_):
    x, size, out, out_size, src, dst, unm, a, b, lnw, lnb = ctx.saved_tensors
    need = ctx.needs_input_grad
    if ctx.r == 0:
        return (grad_out if need[0] else None, None, None, torch.zeros_like(a), torch.zeros_like(b),
                torch.zeros_like(lnw), torch.zeros_like(lnb), grad_out_size if need[7] else None, None, None, None)
    # the fused backward of the forward's kernel family
    gx, ga, gb, gw, gbias, gs = ctx.kernels.pyra_merge_backward(
        grad_out, grad_out_size, x, size, out, out_size, src, dst, unm, a, b, lnw, lnb, *ctx.args)
    return (gx if need[0] else None, None, None, ga if need[3] else None, gb if need[4] else None,
            gw if need[5] else None, gbias if need[6] else None, gs.to(size.dtype) if need[7] else None,
            None, None, None)


def _pyra_triton():
    """``pyra_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import pyra_triton
    return pyra_triton


def _pyra_triton_backward():
    """``pyra_triton_backward.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import pyra_triton_backward
    return pyra_triton_backward


PYRA_MERGE = library.register(library.Op(
    name="pyra_merge",
    schema="(Tensor x, Tensor metric, int r, Tensor a, Tensor b, Tensor ln_weight, Tensor ln_bias, Tensor? size, "
           "bool class_token, bool distill_token, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_pyra, reference=_pyra_merge_op_reference, export=_pyra_merge_export,
    setup_context=_pyra_setup, backward=_pyra_backward, calls=("pyra_merge_backward",), triton=_pyra_triton))
PYRA_MERGE_BACKWARD = library.register(library.Op(
    name="pyra_merge_backward",
    schema="(Tensor grad_out, Tensor? grad_out_size, Tensor x, Tensor? size, Tensor out, Tensor out_size, "
           "Tensor src_idx, Tensor dst_idx, Tensor unm_idx, Tensor a, Tensor b, Tensor ln_weight, Tensor ln_bias, "
           "float eps, bool distill_token) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_pyra_backward, reference=pyra_merge_backward_reference, triton=_pyra_triton_backward,
    public=False))


# ``torch.ops.fpet.pyra_merge_rows``: the modulated merge along a given per-row matching (padded batches,
# threshold merging) and its closed-form backward ``pyra_merge_rows_backward``: C++ kernels csrc/cpu/pyra_rows.cpp
# (CPU, both ops) and csrc/cuda/pyra_merge_rows.cuh + .cu (CUDA, both ops); Triton twins in pyra_rows_triton.py.
def _fake_pyra_rows(x, size, src_idx, dst_idx, token_map, a, b, ln_weight, ln_bias, n_out, eps):
    bsz, _, c = x.shape
    return x.new_empty(bsz, n_out, c), x.new_empty(bsz, n_out, 1, dtype=size_dtype(x, size))


def _fake_pyra_rows_backward(grad_out, grad_out_size, x, size, out, out_size, src_idx, dst_idx, token_map, a, b,
                             ln_weight, ln_bias, eps):
    return (torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(ln_weight),
            torch.empty_like(ln_bias), x.new_empty(*x.shape[:2], 1, dtype=out_size.dtype))


def _pyra_rows_setup(ctx, inputs, output):
    x, size, src, dst, tmap, a, b, lnw, lnb, _, eps = inputs
    out, out_size = output
    ctx.eps = eps
    ctx.save_for_backward(x, size, out, out_size, src, dst, tmap, a, b, lnw, lnb)


def _pyra_rows_backward(ctx, grad_out, grad_out_size):
    x, size, out, out_size, src, dst, tmap, a, b, lnw, lnb = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, ga, gb, gw, gbias, gs = ctx.kernels.pyra_merge_rows_backward(
        grad_out, grad_out_size, x, size, out, out_size, src, dst, tmap, a, b, lnw, lnb, ctx.eps)
    return (gx if need[0] else None, gs.to(size.dtype) if need[1] else None, None, None, None,
            ga if need[5] else None, gb if need[6] else None, gw if need[7] else None, gbias if need[8] else None,
            None, None)


def _pyra_rows_triton():
    """``pyra_rows_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import pyra_rows_triton
    return pyra_rows_triton


PYRA_MERGE_ROWS = library.register(library.Op(
    name="pyra_merge_rows",
    schema="(Tensor x, Tensor? size, Tensor src_idx, Tensor dst_idx, Tensor token_map, Tensor a, Tensor b, "
           "Tensor ln_weight, Tensor ln_bias, int n_out, float eps) -> (Tensor, Tensor)",
    fake=_fake_pyra_rows, reference=pyra_merge_rows_op_reference, setup_context=_pyra_rows_setup,
    backward=_pyra_rows_backward, calls=("pyra_merge_rows_backward",), triton=_pyra_rows_triton))
PYRA_MERGE_ROWS_BACKWARD = library.register(library.Op(
    name="pyra_merge_rows_backward",
    schema="(Tensor grad_out, Tensor? grad_out_size, Tensor x, Tensor? size, Tensor out, Tensor out_size, "
           "Tensor src_idx, Tensor dst_idx, Tensor token_map, Tensor a, Tensor b, Tensor ln_weight, Tensor ln_bias, "
           "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_pyra_rows_backward, reference=pyra_merge_rows_backward_reference, triton=_pyra_rows_triton,
    public=False))


# ----------------------------------------------------------------------------- 3. public API
def pyra_merge(x: Tensor, metric: Tensor, r: int, a: Tensor, b: Tensor, ln_weight: Tensor, ln_bias: Tensor,
               size: Optional[Tensor] = None, class_token: bool = False, distill_token: bool = False,
               eps: float = 1e-5, backend: Optional[str] = None, return_matching: bool = False, *,
               padded: bool = False, threshold: Optional[float] = None):
    """PYRA merge (spec 3): ToMe matching, PYRA-modulated source rows, size-weighted merge.

    ``a`` must be ``[r, 1]`` for the requested ``r``; when ``r`` is capped at ``(N - protected) // 2``
    the first (highest-ranked) rows of ``a`` are used. Returns ``(x', size' float32)`` (and the
    :class:`Matching` with ``return_matching``). Differentiable in x, a, b, ln_weight, ln_bias, size.

    ``padded`` / ``threshold``: per row, as ``tome_merge``: the per-row matching, then the op ``pyra_merge_rows``; row b
    modulates its ``r_b`` sources with ``a[:r_b]``. With a threshold ``r`` is required (it is ``a``'s
    row count and caps every row)."""
    if threshold is not None and r is None:
        raise ValueError("pyra_merge: threshold needs r as well (a has r rows; r caps the merges per row)")
    _, threshold, per_row = rows_args("pyra_merge", r, threshold, padded)
    _checks.merge_inputs(x, metric, size)
    r_req = _checks.count("r", r)
    r = cap_r(r_req, x.shape[1], _checks.flag("class_token", class_token), _checks.flag("distill_token", distill_token))
    c = x.shape[-1]
    _checks.param("a", a, (r_req, 1), x)
    _checks.param("b", b, (1, c), x)
    _checks.param("ln_weight", ln_weight, (c,), x)
    _checks.param("ln_bias", ln_bias, (c,), x)
    eps = _checks.finite_positive("pyra_merge", "eps", eps)
    dtypes = _checks.dtypes(x=x, metric=metric, a=a, b=b, ln_weight=ln_weight, ln_bias=ln_bias, size=size)
    if per_row:  # the per-row formulation: the per-row matching, then the op pyra_merge_rows
        src, dst, unm, tmap, kept = match_rows(metric, r, class_token, distill_token, size, padded, threshold, backend)
        n_out = static_rows(x.shape[1], r, threshold, class_token, distill_token)
        check_rows_fit(kept, n_out)
        out, out_size = library.dispatch(PYRA_MERGE_ROWS, backend, x.device, dtypes, x, size, src, dst, tmap,
                                         a[:src.shape[1]], b, ln_weight, ln_bias, n_out, eps)
        out, out_size, m = trim_rows(out, out_size, RowMatching(src, dst, unm, tmap, kept), threshold)
        return (out, out_size, m) if return_matching else (out, out_size)
    out, out_size, *m = library.dispatch(PYRA_MERGE, backend, x.device, dtypes, x, metric, r, a[:r], b, ln_weight,
                                         ln_bias, size, class_token, distill_token, eps)
    return (out, out_size, Matching(*m)) if return_matching else (out, out_size)
