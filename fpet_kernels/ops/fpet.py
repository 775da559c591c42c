"""FPET differentiable checkerboard matching and merge (spec section 2).

Read top to bottom:
  1. reference: the dense straight-through formulation in plain PyTorch (fallback and oracle),
     and the analytic backward that the kernels implement;
  2. export: the formulation ``torch.onnx.export`` traces in place of the op (no in-place writes);
  3. registered ops ``torch.ops.fpet.{fpet_merge, fpet_merge_backward}`` (C++ kernels) and their
     ``_triton`` twins: one ``library.Op`` record each (schema, fake kernel, reference, export
     formulation, autograd and the op its backward calls, Triton module);
  4. the public API: ``fpet_merge``, ``bipartite_diff_matching`` (closure API; ``merge_wavg`` of its
     merge runs the fused op, ``fpet_kernels/merging.py``). ``fpet_merge`` reads: checks,
     ``library.dispatch`` (export / reference / C++ / Triton, the backend resolved once), wrap;
     with ``padded=True`` it dispatches ``FPET_MERGE_ROWS`` (``torch.ops.fpet.fpet_merge_rows``: the same
     kernels with a static ``padded`` flag, on every backend).

The forward matching matrix ``M`` is one-hot per A row (or empty on a tie), so the forward merge
is a gather; the backward needs the dense ``dL/dM`` (Na x Nb per image), passed through the
straight-through estimator ``M = soft + (hard - soft).detach()`` with ``soft = sigmoid(S - t)``.

``padded=True`` (padded batches of sequences, ``grid=(1, N - p)``; docs/semantics.md "Padded batches
and threshold merging"): scores with a padding (size 0) token are -inf, padding maps to -1, and a
row with no valid destination cell keeps its lone grid token as output row p.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from . import library
from .shapes import NORM_EPS, compute_dtype, grid_sizes, size_dtype
from .tome import merge_wavg_reference, normalize, safe_div, valid_tokens, wavg_by_map


# ----------------------------------------------------------------------------- 1. reference
def resolve_grid(n: int, num_prefix: int, grid=None) -> tuple[int, int]:
    """Spec 2.1: the ``N - p`` grid tokens as a row-major ``(H, W)`` grid."""
    m = n - num_prefix
    if m <= 0:
        raise ValueError(f"metric has N={n} tokens, no grid tokens after the {num_prefix} prefix tokens")
    if grid is None:
        if m == 196:
            h, w = 14, 14
        else:
            w = math.isqrt(m)
            if m % w:
                raise ValueError(f"N - prefix = {m} tokens do not form a grid with W = floor(sqrt({m})) = {w}; "
                                 "pass grid=(H, W)")
            h = m // w
    else:
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)):
            raise TypeError(f"grid must be a pair of ints (H, W), got {grid!r}")
        h, w = grid
        if h <= 0 or w <= 0 or h * w != m:
            raise ValueError(f"grid={tuple(grid)} has {h * w} cells but N - prefix = {m} tokens")
    n_b_grid = grid_sizes(0, h, w)[1]
    if n_b_grid < 2:
        raise ValueError(f"grid ({h}, {w}) has {n_b_grid} destination cells; FPET matching needs at least 2")
    return h, w


def checkerboard(num_prefix: int, h: int, w: int, device=None) -> tuple[Tensor, Tensor]:
    """Spec 2.2: positions of set A and set B (prefix tokens first in B)."""
    pos = num_prefix + torch.arange(h * w, device=device).view(h, w)
    a = torch.cat([pos[0::2, 0::2].flatten(), pos[1::2, 1::2].flatten()])
    b = torch.cat([torch.arange(num_prefix, device=device), pos[1::2, 0::2].flatten(), pos[0::2, 1::2].flatten()])
    return a, b


def _scores(metric: Tensor, num_prefix: int, h: int, w: int, valid: Optional[Tensor] = None):
    a_idx, b_idx = checkerboard(num_prefix, h, w, metric.device)
    m = normalize(metric.to(compute_dtype(metric)))
    scores = m[:, a_idx] @ m[:, b_idx].transpose(-1, -2)
    if num_prefix:
        col = torch.arange(scores.shape[-1], device=metric.device) < num_prefix
        scores = scores.masked_fill(col, -torch.inf)
    if valid is not None:
        scores = mask_padding(scores, valid, a_idx, b_idx)
    return scores, a_idx, b_idx


def mask_padding(scores: Tensor, valid: Tensor, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """Padded batches: a score with a padding token on either side is -inf (no match, no gradient)."""
    return torch.where(valid[:, a_idx].unsqueeze(-1) & valid[:, b_idx].unsqueeze(1), scores, -torch.inf)


def padded_token_map(tmap: Tensor, valid: Tensor, num_prefix: int, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """The token map of a padded batch: padding tokens -1; in a row with no valid destination cell
    (a sequence of at most one grid token) its valid A token keeps a row of its own, output row
    ``num_prefix`` (the first grid B slot)."""
    cell_b = valid[:, b_idx[num_prefix:]].any(1, keepdim=True)  # the row has a valid destination cell
    map_a = torch.where(cell_b | ~valid[:, a_idx], tmap[:, a_idx], num_prefix)
    out = tmap.clone()
    out[:, a_idx] = map_a
    return torch.where(valid, out, -1)


def top2(scores: Tensor):
    """The two top entries of every score row (docs/semantics.md): the two largest scores, ties to
    the lower column index; NaN scores are skipped (as -inf). Returns ``(v1, i1, v2, i2)`` [B, Na]."""
    s = torch.where(torch.isnan(scores), -torch.inf, scores)
    v1, i1 = s.max(dim=-1)  # ties: the first (lowest j) maximum
    v2, i2 = s.scatter(-1, i1.unsqueeze(-1), -torch.inf).max(dim=-1)
    return v1, i1, v2, i2


def valid_scores(scores: Tensor) -> Tensor:
    """Entries that take part in the matching and carry gradient: not NaN, not a prefix column (-inf)."""
    return ~torch.isnan(scores) & (scores > -torch.inf)


def hard_matching(scores: Tensor):
    """Spec 2.4 forward: row i matches its top-1 column iff ``top1 > top2`` (strictly, compared as
    scores); ``(match [B, Na] (-1: none), v1, i1, v2, i2)``."""
    v1, i1, v2, i2 = top2(scores)
    match = torch.where(v1 > v2, i1, -1)
    return match, v1, i1, v2, i2


def diff_matching_reference(metric: Tensor, num_prefix: int, h: int, w: int):
    """Spec 2.3-2.4: the straight-through matching matrix ``M`` [B, Na, Nb] and the index sets.
    The forward value of ``M`` is the hard match (``top1 > top2``), its gradient that of
    ``soft = sigmoid(S - t)``, ``t`` the mean of the two top entries (0 on NaN / prefix entries)."""
    scores, a_idx, b_idx = _scores(metric, num_prefix, h, w)
    with torch.no_grad():
        match, _, i1, _, i2 = hard_matching(scores)
        valid = valid_scores(scores)
        hard = torch.zeros_like(scores).scatter(-1, match.clamp_min(0).unsqueeze(-1), 1.0)  # functional: ONNX export
        hard = hard * (match >= 0).unsqueeze(-1)
    clean = torch.where(torch.isnan(scores), -torch.inf, scores)
    t = (clean.gather(-1, i1.unsqueeze(-1)) + clean.gather(-1, i2.unsqueeze(-1))) / 2
    soft = torch.where(valid, torch.sigmoid(torch.where(valid, scores, 0) - t), 0)
    return soft + (hard - soft).detach(), a_idx, b_idx


def token_map_from_matching(m: Tensor, a_idx: Tensor, b_idx: Tensor, n: int) -> Tensor:
    """Output row (B order) of every token; -1 for an A token that matched nothing (a tie)."""
    bsz, _, nb = m.shape
    hard = m.detach()
    match = torch.where(hard.amax(dim=-1) > 0.5, hard.argmax(dim=-1), torch.full_like(hard[..., 0], -1).long())
    tmap = torch.empty(bsz, n, dtype=torch.int64, device=m.device)
    tmap[:, a_idx] = match
    tmap[:, b_idx] = torch.arange(nb, device=m.device)
    return tmap


def fpet_token_map(metric: Tensor, num_prefix: int, h: int, w: int, valid: Optional[Tensor] = None) -> Tensor:
    """The forward matching as a token map [B, N]: B tokens -> their B index, A tokens -> the B index
    they merge into, -1 when they match nothing (a tie, or no valid score). ``valid`` (padded
    batches): padding tokens -1, and ``padded_token_map``'s rule for rows too short to merge."""
    with torch.no_grad():
        scores, a_idx, b_idx = _scores(metric, num_prefix, h, w, valid)
        match = hard_matching(scores)[0]
    bsz, n = metric.shape[:2]
    tmap = torch.empty(bsz, n, dtype=torch.int64, device=metric.device)
    tmap[:, a_idx] = match
    tmap[:, b_idx] = torch.arange(b_idx.numel(), device=metric.device)
    if valid is not None:
        tmap = padded_token_map(tmap, valid, num_prefix, a_idx, b_idx)
    return tmap


def fpet_merge_reference(x: Tensor, metric: Tensor, size: Optional[Tensor], num_prefix: int, h: int, w: int,
                         padded: bool = False):
    """Spec 2.5: ``x' = (z_B + M^T z_A) / (s_B + M^T s_A)``, ``z = x * s``, with the forward (one-hot)
    ``M`` applied as a gather: a token's values reach only the row it merges into. Returns
    (x', size', token_map); differentiable in x and size (the matching is a constant). ``padded``:
    tokens of size 0 are padding (docs/semantics.md "Padded batches and threshold merging")."""
    _checks.fpet_layout("fpet_merge", x.shape[1], num_prefix, h, w)
    tmap = fpet_token_map(metric, num_prefix, h, w, valid_tokens(size, x) if padded else None)
    nb = grid_sizes(num_prefix, h, w)[1]
    cdt = compute_dtype(x, metric, size)
    out, den = wavg_by_map(x.to(cdt), None if size is None else size.to(cdt), tmap, nb)  # its own map: no check
    return out.to(x.dtype), den.to(size_dtype(x, size)), tmap


def fpet_merge_backward_reference(grad_out, grad_size, x, metric, size, out, out_size, token_map,
                                  num_prefix: int, h: int, w: int, padded: bool = False):
    """The straight-through backward in closed form (what the kernels compute; see csrc/README.md).
    ``padded``: scores with a padding token are -inf, and padding tokens get zero gradients."""
    _checks.fpet_layout("fpet_merge_backward", x.shape[1], num_prefix, h, w)
    nb = grid_sizes(num_prefix, h, w)[1]
    for name, t in (("grad_out", grad_out), ("out", out)):
        _checks.kernel_tensor("fpet_merge_backward", name, t, x.device, shape=(x.shape[0], nb, x.shape[2]),
                              dtypes=_checks.FLOAT_DTYPES)
    _checks.kernel_tensor("fpet_merge_backward", "token_map", token_map, x.device, shape=tuple(x.shape[:2]),
                          dtypes=(torch.int64,))
    cdt = compute_dtype(x, metric, size)
    a_idx, b_idx = checkerboard(num_prefix, h, w, x.device)
    m = metric.to(cdt)
    norms = m.norm(dim=-1, keepdim=True)
    mn = m / norms.clamp_min(NORM_EPS)
    a, b = mn[:, a_idx], mn[:, b_idx]
    scores = a @ b.transpose(-1, -2)
    if num_prefix:
        scores[..., :num_prefix] = -torch.inf
    valid_tok = valid_tokens(size, x) if padded else None
    if padded:
        scores = mask_padding(scores, valid_tok, a_idx, b_idx)
    v1, i1, v2, i2 = top2(scores)
    valid = valid_scores(scores)
    soft = torch.sigmoid(torch.where(valid, scores, 0) - ((v1 + v2) / 2).unsqueeze(-1))

    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    xs = x.to(cdt)
    z = xs * s
    den = out_size.to(cdt)
    g_num = safe_div(grad_out.to(cdt), den)  # a row of merged size 0 is the constant 0: no gradient
    g_den = safe_div(-(grad_out.to(cdt) * out.to(cdt)).sum(-1, keepdim=True), den)
    if grad_size is not None:
        g_den = g_den + grad_size.to(cdt)
    dm = z[:, a_idx] @ g_num.transpose(1, 2) + s[:, a_idx] @ g_den.transpose(1, 2)  # dL/dM [B, Na, Nb]
    p = torch.where(valid, dm * soft * (1 - soft), 0)
    # t's share goes to the two top entries that are valid scores (a NaN / prefix column has none)
    tops = (torch.zeros_like(p).scatter_(-1, i1.unsqueeze(-1), (v1 > -torch.inf).to(p.dtype).unsqueeze(-1))
            + torch.zeros_like(p).scatter_(-1, i2.unsqueeze(-1), (v2 > -torch.inf).to(p.dtype).unsqueeze(-1)))
    ds = p - 0.5 * p.sum(-1, keepdim=True) * tops
    # B rows with a NaN metric (all their scores NaN, P = 0 there) must not spread NaN: 0 rows
    dn = torch.zeros_like(mn)
    dn[:, a_idx] = ds @ torch.nan_to_num(b, nan=0.0)
    dn[:, b_idx] = ds.transpose(1, 2) @ torch.nan_to_num(a, nan=0.0)
    big = (norms > NORM_EPS) & torch.isfinite(norms)
    grad_metric = torch.where(big, (dn - mn * (mn * dn).sum(-1, keepdim=True)) / norms.clamp_min(NORM_EPS), 0)

    match = token_map[:, a_idx]
    hit = (match >= 0).unsqueeze(-1)
    idx = match.clamp_min(0).unsqueeze(-1)
    g_z = torch.empty_like(z)
    g_z[:, a_idx] = g_num.gather(1, idx.expand(-1, -1, g_num.shape[-1])) * hit
    g_z[:, b_idx] = g_num
    g_s = (g_z * xs).sum(-1, keepdim=True)
    g_s[:, a_idx] = torch.where(hit, g_s[:, a_idx] + g_den.gather(1, idx), 0)  # a dropped token: exactly 0
    g_s[:, b_idx] += g_den
    if padded:  # a padding B token's slot is an output row of its own: no gradient reaches the token
        g_z, g_s = (torch.where(valid_tok.unsqueeze(-1), g, 0) for g in (g_z, g_s))
    return (g_z * s).to(x.dtype), grad_metric.to(metric.dtype), g_s.to(out_size.dtype)


# ----------------------------------------------------------------------------- 2. export formulation
def fpet_merge_export(x: Tensor, metric: Tensor, size, num_prefix: int, H: int, W: int):
    """``fpet_merge_reference`` (forward) for ``torch.onnx.export``: the token map without in-place
    writes (the graph stays functional); (x', size', token_map)."""
    with torch.no_grad():
        scores, a_idx, b_idx = _scores(metric, num_prefix, H, W)
        match = hard_matching(scores)[0]
    bsz, n = metric.shape[:2]
    nb = grid_sizes(num_prefix, H, W)[1]
    dev = metric.device
    tmap = (torch.zeros(bsz, n, dtype=torch.int64, device=dev)
            .scatter(1, a_idx.expand(bsz, -1), match)
            .scatter(1, b_idx.expand(bsz, -1), torch.arange(nb, device=dev).expand(bsz, nb)))
    cdt = compute_dtype(x, metric, size)
    out, den = merge_wavg_reference(x.to(cdt), None if size is None else size.to(cdt), tmap, nb)
    return out.to(x.dtype), den.to(size_dtype(x, size)), tmap


# ----------------------------------------------------------------------------- 3. registered ops
# ``torch.ops.fpet.fpet_merge[_backward]``: C++ kernels (csrc/cpu/fpet.cpp, csrc/cuda/fpet_merge.cu);
# ``..._triton``: fpet_triton.py, fpet_triton_backward.py. See ops/library.py.
def _fake_fpet(x, metric, size, num_prefix, H, W):
    bsz, n, c = x.shape
    nb = grid_sizes(num_prefix, H, W)[1]
    return (x.new_empty(bsz, nb, c), x.new_empty(bsz, nb, 1, dtype=size_dtype(x, size)),
            x.new_empty(bsz, n, dtype=torch.int64))


def _fake_fpet_backward(grad_out, grad_size, x, metric, size, out, out_size, token_map, num_prefix, H, W):
    return torch.empty_like(x), torch.empty_like(metric), x.new_empty(*x.shape[:2], 1, dtype=out_size.dtype)


def _fpet_setup(ctx, inputs, output):
    x, metric, size, num_prefix, h, w = inputs
    out, out_size, tmap = output
    ctx.args = (num_prefix, h, w)
    ctx.save_for_backward(x, metric, size, out, out_size, tmap)


def _fpet_backward(ctx, grad_out, grad_out_size, _):
    x, metric, size, out, out_size, tmap = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 6
    gx, gm, gs = ctx.kernels.fpet_merge_backward(grad_out, grad_out_size, x, metric, size, out, out_size, tmap,
                                                 *ctx.args)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gm if need[1] else None,
            gs.to(size.dtype) if need[2] else None, None, None, None)


class _FPETReference(torch.autograd.Function):
    """The reference backend: the forward of spec 2.5 and its straight-through backward in closed
    form (the same pair the kernels implement; the forward applies the hard match as a gather, so
    plain autograd would not reach the metric)."""

    @staticmethod
    def forward(ctx, x, metric, size, num_prefix, h, w, padded=False):
        out, out_size, tmap = fpet_merge_reference(x, metric, size, num_prefix, h, w, padded)
        ctx.args = (num_prefix, h, w, padded)
        ctx.save_for_backward(x, metric, size, out, out_size, tmap)
        ctx.mark_non_differentiable(tmap)
        return out, out_size, tmap

    @staticmethod
    def backward(ctx, grad_out, grad_out_size, _):
        x, metric, size, out, out_size, tmap = ctx.saved_tensors
        gx, gm, gs = fpet_merge_backward_reference(grad_out, grad_out_size, x, metric, size, out, out_size, tmap,
                                                   *ctx.args)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gm if need[1] else None,
                gs.to(size.dtype) if need[2] else None, None, None, None, None)


def _fpet_merge_op_reference(x, metric, size, num_prefix: int, H: int, W: int, padded: bool = False):
    """The reference backend of the op: ``fpet_merge_reference``, with the straight-through backward
    (``_FPETReference``) when an input needs a gradient. ``padded`` (``fpet_merge_rows``): tokens of
    size 0 are padding."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, metric, size)):
        return _FPETReference.apply(x, metric, size, num_prefix, H, W, padded)
    return fpet_merge_reference(x, metric, size, num_prefix, H, W, padded)


def _fpet_triton():
    """``fpet_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import fpet_triton
    return fpet_triton


def _fpet_triton_backward():
    """``fpet_triton_backward.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import fpet_triton_backward
    return fpet_triton_backward


FPET_MERGE = library.register(library.Op(
    "fpet_merge", "(Tensor x, Tensor metric, Tensor? size, int num_prefix, int H, int W) -> (Tensor, Tensor, Tensor)",
    _fake_fpet, reference=_fpet_merge_op_reference, export=fpet_merge_export, setup_context=_fpet_setup,
    backward=_fpet_backward, calls=("fpet_merge_backward",), triton=_fpet_triton))
FPET_MERGE_BACKWARD = library.register(library.Op(
    "fpet_merge_backward", "(Tensor grad_out, Tensor? grad_size, Tensor x, Tensor metric, Tensor? size, "
                           "Tensor out, Tensor out_size, Tensor token_map, int num_prefix, int H, int W) "
                           "-> (Tensor, Tensor, Tensor)",
    _fake_fpet_backward, reference=fpet_merge_backward_reference, triton=_fpet_triton_backward, public=False))


# ``torch.ops.fpet.fpet_merge_rows[_backward]``: the per-row formulation (padded batches, issue 21):
# fpet_merge's schema, tokens of size 0 are padding. The same kernels with a static ``padded`` flag
# (csrc/cpu/fpet.cpp, csrc/cuda/fpet_merge.cuh, fpet_triton.py, fpet_triton_backward.py).
def fpet_merge_rows_reference(x, metric, size, num_prefix: int, H: int, W: int):
    """The reference of ``fpet_merge_rows``: ``fpet_merge_reference(..., padded=True)`` with the
    closed-form straight-through backward (``fpet_merge_rows_backward_reference``) where a gradient
    is needed."""
    return _fpet_merge_op_reference(x, metric, size, num_prefix, H, W, True)


def fpet_merge_rows_backward_reference(grad_out, grad_size, x, metric, size, out, out_size, token_map,
                                       num_prefix: int, H: int, W: int):
    """The reference of ``fpet_merge_rows_backward``: ``fpet_merge_backward_reference(..., padded=True)``
    (scores with a padding token take no part; padding tokens get zero gradients)."""
    return fpet_merge_backward_reference(grad_out, grad_size, x, metric, size, out, out_size, token_map,
                                         num_prefix, H, W, True)


def _fpet_rows_backward(ctx, grad_out, grad_out_size, _):
    x, metric, size, out, out_size, tmap = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 6
    gx, gm, gs = ctx.kernels.fpet_merge_rows_backward(grad_out, grad_out_size, x, metric, size, out, out_size,
                                                      tmap, *ctx.args)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gm if need[1] else None,
            gs.to(size.dtype) if need[2] else None, None, None, None)


FPET_MERGE_ROWS = library.register(library.Op(
    "fpet_merge_rows", "(Tensor x, Tensor metric, Tensor? size, int num_prefix, int H, int W) "
                       "-> (Tensor, Tensor, Tensor)",
    _fake_fpet, reference=fpet_merge_rows_reference, setup_context=_fpet_setup,
    backward=_fpet_rows_backward, calls=("fpet_merge_rows_backward",), triton=_fpet_triton))
FPET_MERGE_ROWS_BACKWARD = library.register(library.Op(
    "fpet_merge_rows_backward", "(Tensor grad_out, Tensor? grad_size, Tensor x, Tensor metric, Tensor? size, "
                                "Tensor out, Tensor out_size, Tensor token_map, int num_prefix, int H, int W) "
                                "-> (Tensor, Tensor, Tensor)",
    _fake_fpet_backward, reference=fpet_merge_rows_backward_reference, triton=_fpet_triton_backward,
    public=False))


# ----------------------------------------------------------------------------- 4. public API
def fpet_merge(x: Tensor, metric: Tensor, size: Optional[Tensor] = None, class_token: bool = False,
               distill_token: bool = False, grid=None, backend: Optional[str] = None,
               return_token_map: bool = False, num_prefix: Optional[int] = None, padded: bool = False):
    """FPET merge: every A token of the checkerboard merges into its best B token (or vanishes on a
    tie); ``N -> Nb`` tokens in B order. Returns ``(x', size' float32)`` (``+ token_map`` when
    ``return_token_map``). Differentiable in ``x``, ``metric`` (straight-through) and ``size``.
    ``num_prefix`` (e.g. class + register tokens) overrides the count of prefix tokens that
    ``class_token`` / ``distill_token`` give; prefix tokens are never merged.
    ``padded``: tokens of ``size`` 0 are padding (a padded batch of sequences, ``grid=(1, N - p)``;
    docs/semantics.md "Padded batches and threshold merging"): the op ``fpet_merge_rows``, kernels on every
    backend; without a size-0 token the same values as ``padded=False``, bit for bit."""
    _checks.merge_inputs(x, metric, size)
    _checks.flag("padded", padded)
    p = int(_checks.flag("class_token", class_token)) + int(_checks.flag("distill_token", distill_token))
    if num_prefix is not None:
        p = _checks.count("num_prefix", num_prefix)
    h, w = resolve_grid(x.shape[1], p, grid)
    dtypes = _checks.dtypes(x=x, metric=metric, size=size)
    out, out_size, tmap = library.dispatch(FPET_MERGE_ROWS if padded else FPET_MERGE, backend, x.device, dtypes,
                                           x, metric, size, p, h, w)
    return (out, out_size, tmap) if return_token_map else (out, out_size)


class FPETMerge:
    """``merge(x, mode="sum")`` of an FPET matching: ``x_B + M^T x_A`` with the straight-through
    ``M`` (differentiable in the metric). "mean" divides by ``1 + M^T 1``; "amax" uses the hard match."""

    def __init__(self, metric: Tensor, num_prefix: int, h: int, w: int, backend: Optional[str]):
        _checks.backend_name(backend)
        self.metric, self.num_prefix, self.h, self.w, self.backend = metric, num_prefix, h, w, backend
        self.m, self.a_idx, self.b_idx = diff_matching_reference(metric, num_prefix, h, w)
        self.n_in = metric.shape[1]

    @property
    def token_map(self) -> Tensor:
        return token_map_from_matching(self.m, self.a_idx, self.b_idx, self.n_in)

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        if mode not in ("sum", "mean", "amax"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'amax', got {mode!r}")
        _checks.tokens("x", x)
        _checks.closure_input("x", x, self.metric, self.n_in)
        xa, xb = x[:, self.a_idx], x[:, self.b_idx]
        tmap = self.token_map[:, self.a_idx]
        nb = xb.shape[1]
        # the hard (forward) merge as a scatter into the B rows (row nb: the dropped A rows), so a
        # token's values reach only the row it merges into
        idx = torch.where(tmap >= 0, tmap, torch.full_like(tmap, nb)).unsqueeze(-1).expand_as(xa)
        ext = torch.cat([xb, xb[:, :1]], dim=1)
        if mode == "amax":
            return ext.scatter_reduce(1, idx, xa, reduce="amax")[:, :nb]
        out = ext.scatter_add(1, idx, xa)[:, :nb]
        # the straight-through gradient in the metric: (M - hard)^T x_A is 0 in value; non-finite
        # entries of x_A are left out of it (their gradient is not a number anyway)
        delta = (self.m - self.m.detach()).transpose(1, 2).to(x.dtype)
        out = out + delta @ torch.where(torch.isfinite(xa), xa, torch.zeros((), dtype=x.dtype, device=x.device))
        if mode == "mean":
            out = out / (1 + self.m.transpose(1, 2).to(x.dtype).sum(-1, keepdim=True))
        return out


def bipartite_diff_matching(metric: Tensor, class_token: bool = False, distill_token: bool = False, grid=None,
                            backend: Optional[str] = None) -> FPETMerge:
    """Drop-in for FPET's differentiable matching: returns ``merge``. ``fpet_kernels.merge_wavg(merge,
    x, size)`` recognises it and runs the fused ``fpet_merge`` op (same values and gradients)."""
    _checks.tokens("metric", metric)
    _checks.backend_name(backend)
    p = int(_checks.flag("class_token", class_token)) + int(_checks.flag("distill_token", distill_token))
    h, w = resolve_grid(metric.shape[1], p, grid)
    return FPETMerge(metric, p, h, w, backend)
