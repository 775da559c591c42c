"""ToMe bipartite soft matching and size-weighted merge / unmerge (spec section 1).

Read top to bottom:
  1. reference: the spec written in plain PyTorch (the fallback and the test oracle);
  2. export:    the formulations ``torch.onnx.export`` traces in place of the ops (no in-place
     writes, ranking through ``topk``);
  3. registered ops ``torch.ops.fpet.{tome_match, tome_match_rows, tome_merge, merge_wavg,
     merge_wavg_backward, unmerge, merge_sum}``: one ``library.Op`` record each (schema, fake kernel,
     reference, export formulation, autograd and the ops its backward calls, Triton module
     ``tome_triton``; ``tome_match_rows``: ``tome_match_rows_triton``);
  4. the public API: ``tome_match``, ``tome_merge``, ``unmerge``, ``bipartite_soft_matching`` (ToMe's
     closure API), ``compose_token_map``, ``parse_r``. Each reads: checks, ``library.dispatch``
     (export / reference / C++ / Triton, the backend resolved once), wrap; per-row calls (``padded`` /
     ``threshold``) dispatch ``tome_match_rows`` (then ``merge_wavg`` along its map).

Index conventions. Set A = even positions (``Na = ceil(N/2)``), set B = odd positions
(``Nb = N // 2``). ``src_idx``/``unm_idx`` index A, ``dst_idx`` indexes B. ``token_map[b, n]`` is the
output row that holds input token ``n`` after the merge (``-1``: dropped, FPET only), so
``unmerge(y) = y.gather(token_map)`` and ``merge(x, "sum")`` is the adjoint scatter.

Padded batches and threshold merging (issue 21, docs/semantics.md): ``tome_match_rows_reference`` /
``tome_merge_rows_reference`` give every row its own token count (tokens of size 0 are padding) and
its own r (capped, or from a similarity threshold); the matching is a :class:`RowMatching`. The
registered op ``torch.ops.fpet.tome_match_rows`` computes it on every backend (C++ CPU
``csrc/cpu/tome_match_rows.cpp``, CUDA ``csrc/cuda/tome_match_rows.cuh``, Triton
``tome_match_rows_triton.py``); the public functions take it with ``padded=`` / ``threshold=``.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _checks
from . import _backend, library
from .shapes import NORM_EPS, cap_r, check_map_range, compute_dtype, size_dtype  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- 1. reference
def normalize(metric: Tensor) -> Tensor:
    """``m / max(||m||, 1e-12)`` (as F.normalize). Its gradient at a row with ``||m|| <= 1e-12`` is 0
    (docs/semantics.md): F.normalize's ``dn / 1e-12`` there overflows half precision."""
    norm = metric.norm(dim=-1, keepdim=True)
    big = norm > NORM_EPS
    m = torch.where(big, metric, metric.detach())
    return m / torch.where(big, norm, norm.detach()).clamp_min(NORM_EPS)


r_cap = _checks.r_cap


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (a merged row whose sizes sum to 0; docs/semantics.md)."""
    zero = den == 0
    return torch.where(zero, torch.zeros((), dtype=num.dtype, device=num.device), num / torch.where(zero, 1, den))


def output_rows(na: int, nb: int, r: int, distill_token: bool, device) -> tuple[Tensor, Tensor]:
    """Output row of each unmerged slot and of each B row (spec 1.7 order)."""
    pos_unm = torch.arange(na - r, device=device)
    pos_b = torch.arange(na - r, na - r + nb, device=device)
    if distill_token:  # [unm[0], B[0], unm[1:], B[1:]]
        pos_unm = pos_unm + (pos_unm > 0).long()
        if nb > 0:
            pos_b[0] = 1
    return pos_unm, pos_b


def token_map_reference(n: int, src: Tensor, dst: Tensor, unm: Tensor, distill_token: bool) -> Tensor:
    bsz, r = src.shape
    na, nb = (n + 1) // 2, n // 2
    if r == 0:
        return torch.arange(n, device=src.device).expand(bsz, n).contiguous()
    pos_unm, pos_b = output_rows(na, nb, r, distill_token, src.device)
    map_a = torch.empty(bsz, na, dtype=torch.int64, device=src.device)
    map_a.scatter_(1, unm, pos_unm.expand(bsz, -1))
    map_a.scatter_(1, src, pos_b[dst])
    out = torch.empty(bsz, n, dtype=torch.int64, device=src.device)
    out[:, 0::2] = map_a
    out[:, 1::2] = pos_b.expand(bsz, -1)
    return out


def tome_match_reference(metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False):
    """Spec 1.2-1.6 -> (src_idx [B, r], dst_idx [B, r], unm_idx [B, Na-r], token_map [B, N])."""
    bsz, n, _ = metric.shape
    na = (n + 1) // 2
    r = cap_r(r, n, class_token, distill_token)
    dev = metric.device
    if r == 0:
        empty = torch.empty(bsz, 0, dtype=torch.int64, device=dev)
        unm = torch.arange(na, device=dev).expand(bsz, na).contiguous()
        return empty, empty.clone(), unm, token_map_reference(n, empty, empty, unm, distill_token)
    with torch.no_grad():
        m = normalize(metric.to(compute_dtype(metric)))
        scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -torch.inf
        if distill_token:
            scores[:, :, 0] = -torch.inf
        best, dst = scores.max(dim=-1)  # ties: the first (lowest j) maximum
        rank = torch.sort(best, dim=-1, descending=True, stable=True).indices  # ties: lower i first
        src, unm = rank[:, :r].clone(), rank[:, r:].clone()  # clones: op outputs may not alias
        if class_token:
            unm = unm.sort(dim=-1).values
        dst_idx = dst.gather(1, src)
    return src, dst_idx, unm, token_map_reference(n, src, dst_idx, unm, distill_token)


def merge_by_indices(x: Tensor, src: Tensor, dst: Tensor, unm: Tensor, mode: str = "mean",
                     distill_token: bool = False) -> Tensor:
    """Spec 1.7, literally: gather unmerged and source A rows, reduce sources into B rows."""
    if src.shape[1] == 0:
        return x
    a, b = x[:, 0::2], x[:, 1::2]
    bsz, _, c = x.shape
    unm_rows = a.gather(1, unm[..., None].expand(bsz, unm.shape[1], c))
    src_rows = a.gather(1, src[..., None].expand(bsz, src.shape[1], c))
    b = b.scatter_reduce(1, dst[..., None].expand(bsz, dst.shape[1], c), src_rows, reduce=mode)
    return assemble(unm_rows, b, distill_token)


def assemble(unm_rows: Tensor, b_rows: Tensor, distill_token: bool) -> Tensor:
    """Output order of spec 1.7: ``[unm, B]``, or ``[unm[0], B[0], unm[1:], B[1:]]`` with a distill token."""
    if distill_token:
        return torch.cat([unm_rows[:, :1], b_rows[:, :1], unm_rows[:, 1:], b_rows[:, 1:]], dim=1)
    return torch.cat([unm_rows, b_rows], dim=1)


def tome_merge_reference(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None,
                         class_token: bool = False, distill_token: bool = False):
    """Spec 1.9 with the spec 1 matching: (x', size' float32, Matching). Differentiable in x and size."""
    src, dst, unm, tmap = tome_match_reference(metric, r, class_token, distill_token)
    cdt = compute_dtype(x, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if src.shape[1] == 0:
        return x.clone(), s.clone(), Matching(src, dst, unm, tmap)
    num = merge_by_indices(x.to(cdt) * s, src, dst, unm, "sum", distill_token)
    den = merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return safe_div(num, den).to(x.dtype), den, Matching(src, dst, unm, tmap)


def _dump_index(token_map: Tensor, n_out: int) -> Tensor:
    """The output row of every token, ``n_out`` (an extra row, dropped afterwards) for entries -1:
    a dropped token never meets another row's values (no ``0 * inf``)."""
    return torch.where(token_map >= 0, token_map, n_out).unsqueeze(-1)


def merge_wavg_reference(x: Tensor, size: Optional[Tensor], token_map: Tensor, n_out: int):
    """Size-weighted average of the tokens each output row holds (map entries -1 are dropped)."""
    _checks.reference_map_args("merge_wavg", x, token_map, n_out, size)
    if token_map.shape[1] != x.shape[1]:
        raise ValueError(f"merge_wavg: token_map has {token_map.shape[1]} entries per image but x has "
                         f"{x.shape[1]} tokens")
    return wavg_by_map(x, size, token_map, n_out)


def wavg_by_map(x: Tensor, size: Optional[Tensor], token_map: Tensor, n_out: int):
    """``merge_wavg_reference`` without the argument checks, for a map the caller produced (FPET's
    forward): no data check, so no host sync."""
    bsz, n, c = x.shape
    cdt = compute_dtype(x, size)
    s = torch.ones(bsz, n, 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    idx = _dump_index(token_map, n_out)
    num = torch.zeros(bsz, n_out + 1, c, dtype=cdt, device=x.device).scatter_add(1, idx.expand(bsz, n, c),
                                                                                 x.to(cdt) * s)
    den = torch.zeros(bsz, n_out + 1, 1, dtype=cdt, device=x.device).scatter_add(1, idx, s)
    num, den = num[:, :n_out], den[:, :n_out]
    return safe_div(num, den).to(x.dtype), den


def sum_by_map(x: Tensor, token_map: Tensor, n_out: int) -> Tensor:
    """Each output row sums the tokens mapped to it (entries -1 dropped), in x's dtype; no checks
    (a map the caller produced)."""
    bsz, n, c = x.shape
    idx = _dump_index(token_map, n_out).expand(bsz, n, c)
    return x.new_zeros(bsz, n_out + 1, c).scatter_add(1, idx, x)[:, :n_out]


def unmerge_reference(y: Tensor, token_map: Tensor) -> Tensor:
    """Spec 1.8: every input token gets the row that holds it (zeros for dropped tokens)."""
    _checks.reference_map_args("unmerge", y, token_map, y.shape[1] if isinstance(y, Tensor) and y.dim() == 3 else 0,
                               x_name="y")
    return gather_by_map(y, token_map)


def gather_by_map(y: Tensor, token_map: Tensor) -> Tensor:
    """``unmerge_reference`` without the argument checks, for a map the caller produced or checked."""
    bsz, n = token_map.shape
    out = y.gather(1, token_map.clamp_min(0).unsqueeze(-1).expand(bsz, n, y.shape[-1]))
    return torch.where((token_map >= 0).unsqueeze(-1), out, torch.zeros_like(out))


def merge_sum_reference(x: Tensor, token_map: Tensor, n_out: int) -> Tensor:
    """Adjoint of ``unmerge``: each output row sums the tokens mapped to it."""
    _checks.reference_map_args("merge_sum", x, token_map, n_out)
    if token_map.shape[1] != x.shape[1]:
        raise ValueError(f"merge_sum: token_map has {token_map.shape[1]} entries per image but x has "
                         f"{x.shape[1]} tokens")
    bsz, n, c = x.shape
    cdt = compute_dtype(x)
    idx = _dump_index(token_map, n_out).expand(bsz, n, c)
    out = torch.zeros(bsz, n_out + 1, c, dtype=cdt, device=x.device).scatter_add(1, idx, x.to(cdt))
    return out[:, :n_out].to(x.dtype)


def merge_wavg_backward_reference(grad_out: Tensor, size: Optional[Tensor], out_size: Tensor,
                                  token_map: Tensor) -> Tensor:
    """d merge_wavg / d x: ``grad_x[n] = grad_out[map[n]] * s[n] / out_size[map[n]]`` (0 where
    ``out_size[map[n]] == 0``: that output row is the constant 0)."""
    _checks.reference_map_args("merge_wavg_backward", grad_out, token_map, grad_out.shape[1], size,
                               x_name="grad_out")
    _checks.kernel_tensor("merge_wavg_backward", "out_size", out_size, grad_out.device,
                          shape=(grad_out.shape[0], grad_out.shape[1], 1), dtypes=_checks.FLOAT_DTYPES)
    cdt = compute_dtype(grad_out, out_size)
    g = gather_by_map(safe_div(grad_out.to(cdt), out_size.to(cdt)), token_map)  # the map checked above
    if size is not None:
        g = g * size.to(cdt)
    return g.to(grad_out.dtype)


def merge_wavg_size_grad(grad_out: Tensor, grad_out_size: Optional[Tensor], x: Tensor, out: Tensor,
                         out_size: Tensor, token_map: Tensor) -> Tensor:
    """d merge_wavg / d size (rarely needed: sizes are usually constants):
    ``grad_s[n] = <grad_out[m], x[n] - out[m]> / out_size[m] + grad_out_size[m]`` with ``m = map[n]``."""
    cdt = compute_dtype(x, out_size)  # a backward: the forward's map (gathers without checks)
    g = (gather_by_map(grad_out.to(cdt), token_map) * (x.to(cdt) - gather_by_map(out.to(cdt), token_map)))
    g = safe_div(g.sum(-1, keepdim=True), gather_by_map(out_size.to(cdt), token_map))
    if grad_out_size is not None:
        g = g + gather_by_map(grad_out_size.to(cdt), token_map)
    return g * (token_map >= 0).unsqueeze(-1)


# Padded batches and threshold merging (issue 21; docs/semantics.md "Padded batches and threshold
# merging"). One batched formulation for both: every row gets its own token count and its own r.
def valid_tokens(size: Optional[Tensor], like: Tensor) -> Tensor:
    """``[B, N]`` bool: the tokens that are not padding (``size != 0``; ``size=None``: all tokens)."""
    if size is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return size[..., 0] != 0


def check_threshold(op: str, threshold) -> Optional[float]:
    """``threshold`` is None or a number in ``[-1, 1]`` (a cosine similarity; NaN is an error)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{op}: threshold must be a float in [-1, 1] or None, got {type(threshold).__name__}")
    if not -1.0 <= float(threshold) <= 1.0:  # False for NaN
        raise ValueError(f"{op}: threshold must be a number in [-1, 1], got {threshold!r}")
    return float(threshold)


def static_r(r: Optional[int], n: int, class_token: bool, distill_token: bool) -> int:
    """The width of ``src_idx`` / ``dst_idx`` of a per-row matching: the largest r any row of N tokens
    can have (``min(r, cap(N))``; ``r=None``, threshold only: ``cap(N)``)."""
    cap = r_cap(n, class_token, distill_token)
    return cap if r is None else cap_r(r, n, class_token, distill_token)


def static_rows(n: int, r: Optional[int], threshold: Optional[float], class_token: bool, distill_token: bool) -> int:
    """Output rows of a per-row merge op: ``N - min(r, cap(N))`` with r only (every right-padded row
    fits: ``n - min(r, cap(n))`` grows with n), ``N`` with a threshold (a row may merge nothing)."""
    return n if threshold is not None else n - static_r(r, n, class_token, distill_token)


def _rank_in_row(mask: Tensor) -> Tensor:
    """Position of every True entry among the True entries of its row (0, 1, ...); garbage elsewhere."""
    return mask.long().cumsum(-1) - 1


def tome_match_rows_reference(metric: Tensor, r: Optional[int], class_token: bool = False,
                              distill_token: bool = False, valid: Optional[Tensor] = None,
                              threshold: Optional[float] = None):
    """ToMe matching with a token count and an r per row (padding ``~valid``; a threshold).

    Returns ``(src_idx [B, R], dst_idx [B, R], unm_idx [B, Na], token_map [B, N], kept [B])`` with
    ``R = static_r(r)``: row b uses the first ``r_b`` entries of ``src_idx`` / ``dst_idx`` and the first
    ``na_b - r_b`` of ``unm_idx`` (``na_b`` its valid A tokens), the rest are -1; padding tokens map to
    -1; ``kept[b]`` is the number of valid output rows. A right-padded row gets exactly what the row
    alone gets from ``tome_match_reference`` (with its own cap on r); rows with ``r_b == 0`` keep
    their tokens in input order, as the unpadded op does at r = 0."""
    bsz, n, _ = metric.shape
    na, nb = (n + 1) // 2, n // 2
    dev = metric.device
    big = static_r(r, n, class_token, distill_token)
    if valid is None:
        valid = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    va, vb = valid[:, 0::2], valid[:, 1::2]
    cand_a, cand_b = va.clone(), vb.clone()  # possible sources / destinations
    if class_token and na:
        cand_a[:, 0] = False
    if distill_token and nb:
        cand_b[:, 0] = False
    n_valid = valid.sum(1)
    prot = (valid[:, :1].sum(1) if class_token else 0) + (valid[:, 1:2].sum(1) if distill_token else 0)
    cap = torch.minimum((n_valid - prot) // 2, cand_a.sum(1))  # right padding: r_cap(n_b)
    cap = torch.where(cand_b.any(1), cap, 0)
    if r is not None:
        cap = cap.clamp_max(r)
    with torch.no_grad():
        m = normalize(metric.to(compute_dtype(metric)))
        scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
        scores = torch.where(cand_a.unsqueeze(-1) & cand_b.unsqueeze(1), scores, -torch.inf)
        if nb:
            best, dst = scores.max(dim=-1)  # ties: the first (lowest j) maximum; NaN first
        else:  # N = 1: no B token
            best = torch.full((bsz, na), -torch.inf, dtype=scores.dtype, device=dev)
            dst = torch.zeros(bsz, na, dtype=torch.int64, device=dev)
        # the candidates in rank order (best descending, ties to the lower i), then the other valid A
        # token (the class token), then padding, each in index order
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        group = (~cand_a).to(torch.uint8) + (~va).to(torch.uint8)
        order = order.gather(1, torch.sort(group.gather(1, order), dim=-1, stable=True).indices)
        if threshold is None:
            r_row = cap
        else:  # the candidates reaching the threshold are a prefix of the ranking (NaN counts as reaching it)
            reach = cand_a & ~(best < threshold)
            r_row = torch.minimum(reach.sum(1), cap)
        slot = torch.arange(na, device=dev).expand(bsz, na)
        is_src = slot < r_row.unsqueeze(1)  # slot k of the ranking is a source
        src_full = torch.where(is_src, order, -1)
        src = src_full[:, :big].clone()
        dst_idx = torch.where(src >= 0, dst.gather(1, src.clamp_min(0)), -1)
        # unmerged valid A tokens: rank order, ascending with a class token or when the row merges nothing
        na_valid = va.sum(1)
        in_unm = ~is_src & (slot < na_valid.unsqueeze(1))
        ascending = (r_row == 0).unsqueeze(1) | class_token
        key = torch.where(ascending, order, slot)  # sort key among the unmerged slots
        key = torch.where(in_unm, key, na + slot)  # sources and padding after them
        unm_order = torch.sort(key, dim=-1, stable=True).indices
        unm = torch.where(slot < (na_valid - r_row).unsqueeze(1), order.gather(1, unm_order), -1)
        tmap = _row_token_map(valid, src, dst_idx, unm, r_row, distill_token)
        kept = n_valid - r_row
    return src, dst_idx, unm, tmap, kept


def _row_token_map(valid: Tensor, src: Tensor, dst: Tensor, unm: Tensor, r_row: Tensor, distill_token: bool):
    """The token map of a per-row matching (spec 1.7 order per row, padding -1)."""
    bsz, n = valid.shape
    na = (n + 1) // 2
    dev = valid.device
    vb = valid[:, 1::2]
    n_unm = (unm >= 0).sum(1, keepdim=True)
    k = torch.arange(na, device=dev).expand(bsz, na)
    pos_unm = k + (k > 0).long() if distill_token else k  # [unm[0], B[0], unm[1:], B[1:]]
    j = _rank_in_row(vb)  # the j-th valid B token
    pos_b = n_unm + j
    if distill_token:
        pos_b = torch.where(j == 0, 1, pos_b)
    map_a = torch.full((bsz, na + 1), -1, dtype=torch.int64, device=dev)  # column na: dump for -1 entries
    unm_dump = torch.where(unm >= 0, unm, na)
    map_a.scatter_(1, unm_dump, torch.where(unm >= 0, pos_unm, -1))
    pos_b_v = torch.where(vb, pos_b, -1)
    if src.shape[1]:
        src_dump = torch.where(src >= 0, src, na)
        map_a.scatter_(1, src_dump, torch.where(src >= 0, pos_b_v.gather(1, dst.clamp_min(0)), -1))
    out = torch.empty(bsz, n, dtype=torch.int64, device=dev)
    out[:, 0::2] = map_a[:, :na]
    out[:, 1::2] = pos_b_v
    # rows that merge nothing: every valid token in input order
    ident = torch.where(valid, _rank_in_row(valid), -1)
    return torch.where((r_row == 0).unsqueeze(1), ident, out)


def tome_merge_rows_reference(x: Tensor, metric: Tensor, r: Optional[int], size: Optional[Tensor] = None,
                              class_token: bool = False, distill_token: bool = False, padded: bool = False,
                              threshold: Optional[float] = None):
    """``tome_merge`` with a token count and an r per row: ``(x' [B, n_out, C], size', RowMatching)``,
    ``n_out = static_rows(...)``; row b holds its ``kept[b]`` valid rows first, then rows of x = 0,
    size = 0. ``padded``: tokens of size 0 are padding. Differentiable in x and size (plain autograd)."""
    valid = valid_tokens(size if padded else None, x)
    src, dst, unm, tmap, kept = tome_match_rows_reference(metric, r, class_token, distill_token, valid, threshold)
    n_out = static_rows(x.shape[1], r, threshold, class_token, distill_token)
    check_rows_fit(kept, n_out)
    out, out_size = wavg_by_map(x, size, tmap, n_out)
    return out, out_size, RowMatching(src, dst, unm, tmap, kept)


def check_rows_fit(kept: Tensor, n_out: int) -> None:
    """Right-padded rows always fit the static output; padding elsewhere may not (one host sync)."""
    if kept.numel() and int(kept.max()) > n_out:
        raise ValueError(f"size: a row keeps {int(kept.max())} valid tokens but the op returns {n_out} rows; "
                         "padding must be at the right end of each row (right-pad the batch)")


# ----------------------------------------------------------------------------- 2. export formulations
# What ``torch.onnx.export`` traces in place of the ops (the records' ``export``): the references
# without in-place writes (the graph stays functional, so a decomposition table can use them too:
# ``fpet_kernels.integrations.onnx``), ToMe's ranking through ``topk`` instead of the stable ``sort``
# that the exporter does not translate (ONNX ``TopK`` puts the lower index first among equal values,
# the spec's tie rule). The merge arithmetic is the references' own; ``merge_wavg``, ``unmerge`` and
# ``merge_sum`` export their references as they are.
def token_map_export(n: int, src: Tensor, dst: Tensor, unm: Tensor, distill_token: bool) -> Tensor:
    """``token_map_reference`` without in-place writes."""
    bsz, r = src.shape
    na, nb = (n + 1) // 2, n // 2
    dev = src.device
    pos_unm = torch.arange(na - r, device=dev)
    pos_b = torch.arange(na - r, na - r + nb, device=dev)
    if distill_token:  # spec 1.7 order [unm[0], B[0], unm[1:], B[1:]]
        pos_unm = pos_unm + (pos_unm > 0).long()
        pos_b = torch.where(torch.arange(nb, device=dev) == 0, torch.ones_like(pos_b), pos_b)
    map_a = torch.zeros(bsz, na, dtype=torch.int64, device=dev).scatter(1, unm, pos_unm.expand(bsz, -1))
    if r:
        map_a = map_a.scatter(1, src, pos_b[dst])
    map_b = pos_b.expand(bsz, nb)
    if na > nb:
        map_b = torch.cat([map_b, map_b.new_zeros(bsz, na - nb)], dim=1)
    return torch.stack([map_a, map_b], dim=-1).reshape(bsz, 2 * na)[:, :n]


def tome_match_export(metric: Tensor, r: int, class_token: bool, distill_token: bool):
    """``tome_match_reference`` for the exporter: (src_idx, dst_idx, unm_idx, token_map)."""
    bsz, n, _ = metric.shape
    na, nb = (n + 1) // 2, n // 2
    r = cap_r(r, n, class_token, distill_token)
    dev = metric.device
    if r == 0:
        empty = torch.zeros(bsz, 0, dtype=torch.int64, device=dev)
        unm = torch.arange(na, device=dev).expand(bsz, na)
        return empty, empty, unm, token_map_export(n, empty, empty, unm, distill_token)
    m = normalize(metric.detach().to(compute_dtype(metric)))
    scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
    if class_token:
        scores = scores.masked_fill((torch.arange(na, device=dev) == 0).view(1, na, 1), -torch.inf)
    if distill_token:
        scores = scores.masked_fill((torch.arange(nb, device=dev) == 0).view(1, 1, nb), -torch.inf)
    best, dst = scores.max(dim=-1)  # ties: the first (lowest j) maximum, as ONNX ArgMax
    rank = torch.topk(best, na, dim=-1, largest=True, sorted=True).indices  # ONNX TopK: ties lower i first
    src, unm = rank[:, :r], rank[:, r:]
    if class_token:
        unm = torch.topk(unm, na - r, dim=-1, largest=False, sorted=True).values
    dst_idx = dst.gather(1, src)
    return src, dst_idx, unm, token_map_export(n, src, dst_idx, unm, distill_token)


def tome_merge_export(x: Tensor, metric: Tensor, r: int, size, class_token: bool, distill_token: bool):
    """``tome_merge_reference`` for the exporter: (x', size', src_idx, dst_idx, unm_idx, token_map)."""
    src, dst, unm, tmap = tome_match_export(metric, r, class_token, distill_token)
    cdt = compute_dtype(x, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if src.shape[1] == 0:
        return x, s, src, dst, unm, tmap
    num = merge_by_indices(x.to(cdt) * s, src, dst, unm, "sum", distill_token)
    den = merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return safe_div(num, den).to(x.dtype), den, src, dst, unm, tmap


# ----------------------------------------------------------------------------- 3. registered ops
# ``torch.ops.fpet.<op>``: C++ kernels (csrc/cpu/tome.cpp, csrc/cuda/{tome_merge,merge_wavg}.cu);
# ``torch.ops.fpet.<op>_triton``: tome_triton.py. Contracts: csrc/README.md. See ops/library.py.
class Matching(NamedTuple):
    """The result of a ToMe matching: tensors only, so it flows through torch.compile.

    ``token_map`` [B, N] is the compact source map of spec 1.10: for each input token, the row of
    the merged tensor that now holds it. ``unmerge(y, matching)`` gathers with it."""
    src_idx: Tensor
    dst_idx: Tensor
    unm_idx: Tensor
    token_map: Tensor


class RowMatching(NamedTuple):
    """A ToMe matching with a token count and an r per row (padded batches, threshold merging;
    docs/semantics.md). As :class:`Matching`, with ``-1`` past each row's entries in ``src_idx``,
    ``dst_idx`` (width: the largest r) and ``unm_idx`` (width ``Na``), padding tokens mapped to -1,
    and ``kept`` [B]: the number of valid output rows of each row."""
    src_idx: Tensor
    dst_idx: Tensor
    unm_idx: Tensor
    token_map: Tensor
    kept: Tensor


def _fake_match(metric, r, class_token=False, distill_token=False):
    bsz, n, _ = metric.shape
    na = (n + 1) // 2
    kw = dict(dtype=torch.int64)
    return (metric.new_empty(bsz, r, **kw), metric.new_empty(bsz, r, **kw),
            metric.new_empty(bsz, na - r, **kw), metric.new_empty(bsz, n, **kw))


def _fake_merge(x, metric, r, size, class_token, distill_token):
    bsz, n, c = x.shape
    return (x.new_empty(bsz, n - r, c), x.new_empty(bsz, n - r, 1, dtype=size_dtype(x, size))) + _fake_match(metric, r)


def _fake_wavg(x, size, token_map, n_out):
    bsz, _, c = x.shape
    return x.new_empty(bsz, n_out, c), x.new_empty(bsz, n_out, 1, dtype=size_dtype(x, size))


def _fake_wavg_backward(grad_out, size, out_size, token_map):
    bsz, n = token_map.shape
    return grad_out.new_empty(bsz, n, grad_out.shape[-1])


def _fake_unmerge(y, token_map):
    bsz, n = token_map.shape
    return y.new_empty(bsz, n, y.shape[-1])


def _fake_merge_sum(x, token_map, n_out):
    return x.new_empty(x.shape[0], n_out, x.shape[-1])


def _tome_match_rows_op_reference(metric, r, class_token, distill_token, size, threshold):
    """``tome_match_rows_reference`` with the op's arguments (``torch.ops.fpet.tome_match_rows``):
    ``size`` None: no padding; else its size-0 tokens are padding."""
    _checks.tokens("metric", metric)
    if size is not None:
        _checks.tokens("size", size, last=1)
        _checks.same_tokens("metric", metric, "size", size)
    if r is not None:
        r = _checks.count("r", r)
    return tome_match_rows_reference(metric, r, class_token, distill_token, valid_tokens(size, metric),
                                     check_threshold("tome_match_rows", threshold))


def _fake_match_rows(metric, r, class_token, distill_token, size, threshold):
    bsz, n, _ = metric.shape
    na = (n + 1) // 2
    big = static_r(r, n, class_token, distill_token)
    kw = dict(dtype=torch.int64)
    return (metric.new_empty(bsz, big, **kw), metric.new_empty(bsz, big, **kw), metric.new_empty(bsz, na, **kw),
            metric.new_empty(bsz, n, **kw), metric.new_empty(bsz, **kw))


def _tome_merge_op_reference(x, metric, r, size, class_token, distill_token):
    """``tome_merge_reference`` returning what the op returns: (x', size', src_idx, dst_idx, unm_idx, token_map)."""
    out, out_size, m = tome_merge_reference(x, metric, r, size, class_token, distill_token)
    return (out, out_size) + tuple(m)


# autograd: the matching carries no gradient; the weighted merge is linear in x.
def _wavg_setup(ctx, x, size, out, out_size, token_map):
    ctx.has_size = size is not None
    ctx.save_for_backward(x if ctx.needs_size_grad else None, size, out if ctx.needs_size_grad else None,
                          out_size, token_map)


def _wavg_backward(ctx, grad_out, grad_out_size):
    x, size, out, out_size, token_map = ctx.saved_tensors
    grad_x = grad_size = None
    if ctx.needs_x_grad:
        grad_x = ctx.kernels.merge_wavg_backward(grad_out, size, out_size, token_map)
    if ctx.needs_size_grad:
        grad_size = merge_wavg_size_grad(grad_out, grad_out_size, x, out, out_size, token_map).to(size.dtype)
    return grad_x, grad_size


def _tome_merge_setup(ctx, inputs, output):
    x, _, _, size, _, _ = inputs
    ctx.needs_x_grad, ctx.needs_size_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    _wavg_setup(ctx, x, size, output[0], output[1], output[5])


def _tome_merge_backward(ctx, grad_out, grad_out_size, *_):
    grad_x, grad_size = _wavg_backward(ctx, grad_out, grad_out_size)
    return grad_x, None, None, grad_size, None, None


def _merge_wavg_setup(ctx, inputs, output):
    x, size, token_map, _ = inputs
    ctx.needs_x_grad, ctx.needs_size_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    _wavg_setup(ctx, x, size, output[0], output[1], token_map)


def _merge_wavg_backward(ctx, grad_out, grad_out_size):
    grad_x, grad_size = _wavg_backward(ctx, grad_out, grad_out_size)
    return grad_x, grad_size, None, None


def _unmerge_setup(ctx, inputs, output):
    y, token_map = inputs
    ctx.n_out = y.shape[1]
    ctx.save_for_backward(token_map)


def _unmerge_backward(ctx, grad):
    (token_map,) = ctx.saved_tensors
    return ctx.kernels.merge_sum(grad, token_map, ctx.n_out), None


def _merge_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _merge_sum_backward(ctx, grad):
    (token_map,) = ctx.saved_tensors
    return ctx.kernels.unmerge(grad, token_map), None, None


def _tome_triton():
    """``tome_triton.py``, imported at the first Triton call (importing Triton is slow)."""
    from . import tome_triton
    return tome_triton


def _tome_match_rows_triton():
    """``tome_match_rows_triton.py``, imported at the first Triton call."""
    from . import tome_match_rows_triton
    return tome_match_rows_triton


TOME_MATCH = library.register(library.Op(
    "tome_match", "(Tensor metric, int r, bool class_token, bool distill_token) -> (Tensor, Tensor, Tensor, Tensor)",
    _fake_match, reference=tome_match_reference, export=tome_match_export, triton=_tome_triton))
# the per-row matching (padded batches, threshold merging; docs/semantics.md): size None = no padding,
# else its size-0 tokens are padding; r None = threshold only. No gradient (indices).
TOME_MATCH_ROWS = library.register(library.Op(
    "tome_match_rows", "(Tensor metric, int? r, bool class_token, bool distill_token, Tensor? size, "
                       "float? threshold) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_match_rows, reference=_tome_match_rows_op_reference, triton=_tome_match_rows_triton))
TOME_MERGE = library.register(library.Op(
    "tome_merge", "(Tensor x, Tensor metric, int r, Tensor? size, bool class_token, bool distill_token) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_merge, reference=_tome_merge_op_reference, export=tome_merge_export,
    setup_context=_tome_merge_setup, backward=_tome_merge_backward, calls=("merge_wavg_backward",),
    triton=_tome_triton))
# a user-given map: the reference checks it (one host sync), as the kernels do
MERGE_WAVG = library.register(library.Op(
    "merge_wavg", "(Tensor x, Tensor? size, Tensor token_map, int n_out) -> (Tensor, Tensor)",
    _fake_wavg, reference=merge_wavg_reference, setup_context=_merge_wavg_setup, backward=_merge_wavg_backward,
    calls=("merge_wavg_backward",), triton=_tome_triton))
MERGE_WAVG_BACKWARD = library.register(library.Op(
    "merge_wavg_backward", "(Tensor grad_out, Tensor? size, Tensor out_size, Tensor token_map) -> Tensor",
    _fake_wavg_backward, reference=merge_wavg_backward_reference, triton=_tome_triton, public=False))
UNMERGE = library.register(library.Op(
    "unmerge", "(Tensor y, Tensor token_map) -> Tensor",
    _fake_unmerge, reference=unmerge_reference, setup_context=_unmerge_setup, backward=_unmerge_backward,
    calls=("merge_sum",), triton=_tome_triton))
MERGE_SUM = library.register(library.Op(
    "merge_sum", "(Tensor x, Tensor token_map, int n_out) -> Tensor",
    _fake_merge_sum, reference=merge_sum_reference, setup_context=_merge_sum_setup, backward=_merge_sum_backward,
    calls=("unmerge",), triton=_tome_triton, public=False))


# ----------------------------------------------------------------------------- 4. public API
def rows_args(op: str, r, threshold, padded) -> tuple:
    """Checks r / threshold / padded of a merge op: ``(r or None, threshold or None, per_row)``;
    ``per_row``: the per-row formulation (padded batches, threshold merging) runs."""
    _checks.flag("padded", padded)
    threshold = check_threshold(op, threshold)
    if r is None:
        if threshold is None:
            raise TypeError(f"r must be a Python int, got NoneType ({op}: pass r, threshold, or both: r then "
                            "caps the merges per row)")
    else:
        r = _checks.count("r", r)
    return r, threshold, padded or threshold is not None


def tome_match(metric: Tensor, r: Optional[int], class_token: bool = False, distill_token: bool = False,
               backend: Optional[str] = None, *, size: Optional[Tensor] = None, padded: bool = False,
               threshold: Optional[float] = None):
    """ToMe bipartite soft matching (spec 1.1-1.6) as explicit indices.

    ``padded`` (tokens of ``size`` 0 are padding) or ``threshold`` (each row merges its A tokens whose
    best score reaches it, at most ``r`` when r is given): a :class:`RowMatching` with a count per row
    (docs/semantics.md "Padded batches and threshold merging"; ``torch.ops.fpet.tome_match_rows``)."""
    r, threshold, per_row = rows_args("tome_match", r, threshold, padded)
    if per_row:
        _checks.tokens("metric", metric)
        if size is not None:
            _checks.tokens("size", size, last=1)
            _checks.same_tokens("metric", metric, "size", size)
        cls, dist = _checks.flag("class_token", class_token), _checks.flag("distill_token", distill_token)
        return match_rows(metric, r, cls, dist, size, padded, threshold, backend)
    _checks.tokens("metric", metric)
    r = cap_r(_checks.count("r", r), metric.shape[1], _checks.flag("class_token", class_token),
              _checks.flag("distill_token", distill_token))
    return Matching(*library.dispatch(TOME_MATCH, backend, metric.device, {"metric": metric.dtype},
                                      metric, r, class_token, distill_token))


def tome_merge(x: Tensor, metric: Tensor, r: Optional[int], size: Optional[Tensor] = None, class_token: bool = False,
               distill_token: bool = False, backend: Optional[str] = None, *, padded: bool = False,
               threshold: Optional[float] = None):
    """Fused ToMe step: match on ``metric`` and size-weighted merge of ``x``.

    Returns ``(x' [B, N-r, C], size' [B, N-r, 1] float32, matching)``; ``r`` is capped at
    ``(N - protected) // 2``. Differentiable in ``x`` (and ``size``); the matching carries no gradient.

    Per row (docs/semantics.md "Padded batches and threshold merging"; ``tome_match_rows`` then
    ``merge_wavg`` along its map, on every backend): ``padded=True`` makes tokens of ``size`` 0 padding, each row merging ``min(r, cap(n_b))``
    of its ``n_b`` valid tokens into ``N - min(r, cap(N))`` rows (valid rows first, then rows of 0
    with size 0); ``threshold`` merges, per row, the A tokens whose best score is ``>= threshold``
    (at most ``r``), and the result is trimmed to the longest row (one host sync). The matching is
    then a :class:`RowMatching` (``kept``: the valid rows of each row).
    """
    r, threshold, per_row = rows_args("tome_merge", r, threshold, padded)
    if per_row:
        _checks.merge_inputs(x, metric, size)
        cls, dist = _checks.flag("class_token", class_token), _checks.flag("distill_token", distill_token)
        m = match_rows(metric, r, cls, dist, size, padded, threshold, backend)
        n_out = static_rows(x.shape[1], r, threshold, cls, dist)
        if threshold is None:  # one host sync: padding not at the right end may not fit (N rows always do)
            check_rows_fit(m.kept, n_out)
        with library.trusted_maps():  # the map is the matching's, its rows checked just above
            out, out_size = library.dispatch(MERGE_WAVG, backend, x.device, _checks.dtypes(x=x, size=size),
                                             x, size, m.token_map, n_out)
        return trim_rows(out, out_size, m, threshold)
    _checks.merge_inputs(x, metric, size)
    r = cap_r(_checks.count("r", r), x.shape[1], _checks.flag("class_token", class_token),
              _checks.flag("distill_token", distill_token))
    dtypes = _checks.dtypes(x=x, metric=metric, size=size)
    if r == 0:  # spec 5: the identity, x itself (bit-identical), sizes as given (float32) or ones
        _backend.resolve(backend, x.device, dtypes, op="tome_merge")  # the backend's errors all the same
        return (x, size.to(size_dtype(x, size)) if size is not None
                else torch.ones(*x.shape[:2], 1, dtype=size_dtype(x, size), device=x.device),
                Matching(*tome_match_reference(metric, 0, class_token, distill_token)))
    out, out_size, *m = library.dispatch(TOME_MERGE, backend, x.device, dtypes, x, metric, r, size, class_token,
                                         distill_token)
    return out, out_size, Matching(*m)


def match_rows(metric: Tensor, r: Optional[int], class_token: bool, distill_token: bool, size: Optional[Tensor],
               padded: bool, threshold: Optional[float], backend: Optional[str] = None) -> "RowMatching":
    """The per-row matching of checked arguments: ``torch.ops.fpet.tome_match_rows`` (or its reference)
    on the backend resolved from ``backend``; ``size`` marks padding only when ``padded``."""
    size = size if padded else None
    return RowMatching(*library.dispatch(TOME_MATCH_ROWS, backend, metric.device,
                                         _checks.dtypes(metric=metric, size=size),
                                         metric, r, class_token, distill_token, size, threshold))


def trim_rows(out: Tensor, out_size: Tensor, m: "RowMatching", threshold: Optional[float]):
    """Threshold merging: the batch keeps its longest row (one host sync); r only: the static rows."""
    if threshold is None or m.kept.numel() == 0:
        return out, out_size, m
    n_keep = int(m.kept.max())
    return out[:, :n_keep], out_size[:, :n_keep], m


def _as_map(matching) -> Tensor:
    return matching.token_map if isinstance(matching, (Matching, RowMatching)) else matching


def unmerge(y: Tensor, matching, backend: Optional[str] = None) -> Tensor:
    """Back to the tokens before the merge: ``out[:, n] = y[:, token_map[:, n]]`` (spec 1.8).

    ``matching`` is a :class:`Matching` or a token map ``[B, N]`` (e.g. from ``compose_token_map``,
    to unmerge several layers back to the original resolution)."""
    _checks.tokens("y", y)
    tmap = _as_map(matching)
    _checks.token_map("matching.token_map", tmap, y)
    if isinstance(matching, Matching):
        n_out = tmap.shape[1] - matching.src_idx.shape[1]
        if y.shape[1] != n_out:
            raise ValueError(f"y has {y.shape[1]} tokens but the matching produced {n_out}")
    return library.dispatch(UNMERGE, backend, y.device, {"y": y.dtype}, y, tmap)


def compose_token_map(token_map: Optional[Tensor], matching) -> Tensor:
    """Compact source tracking (spec 1.10): given the map of the original tokens onto the tokens
    before this merge (``None`` = identity), return their map onto the tokens after it."""
    step = _as_map(matching)
    _checks.token_map("matching.token_map", step)
    if token_map is None:
        return step
    _checks.token_map("token_map", token_map, step, tokens_name="matching.token_map")
    _checks.map_range("compose_token_map", "token_map", token_map, step.shape[1])
    out = step.gather(1, token_map.clamp_min(0))
    return torch.where(token_map >= 0, out, torch.full_like(out, -1))


class ToMeMerge:
    """``merge(x, mode="mean")`` of a ToMe matching (ToMe's closure API, spec 1.7)."""

    def __init__(self, matching: Matching, distill_token: bool, backend: Optional[str] = None):
        _checks.backend_name(backend)
        self.matching = matching
        self.backend = backend
        self.distill_token = distill_token
        self.r = matching.src_idx.shape[1]
        self.n_out = matching.token_map.shape[1] - self.r

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        if mode not in ("sum", "mean", "amax"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'amax', got {mode!r}")
        _checks.tokens("x", x)
        _checks.closure_input("x", x, self.matching.token_map, self.matching.token_map.shape[1])
        m = self.matching
        return merge_by_indices(x, m.src_idx, m.dst_idx, m.unm_idx, mode, self.distill_token)


class ToMeUnmerge:
    """``unmerge(y)`` of a ToMe matching (spec 1.8)."""

    def __init__(self, matching: Matching):
        self.matching = matching

    def __call__(self, y: Tensor) -> Tensor:
        _checks.tokens("y", y)
        n_out = self.matching.token_map.shape[1] - self.matching.src_idx.shape[1]
        _checks.closure_input("y", y, self.matching.token_map, n_out)
        if self.matching.src_idx.shape[1] == 0:
            return y
        return gather_by_map(y, self.matching.token_map)  # the matching's own map: no check


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False,
                            backend: Optional[str] = None):
    """Drop-in for ToMe's function of the same name: returns ``(merge, unmerge)`` callables.

    ``merge(x, mode)`` and ``unmerge(y)`` are differentiable PyTorch gathers/scatters on the explicit
    indices; ``fpet_kernels.merge_wavg(merge, x, size)`` recognises the merge and runs the fused
    kernel. ``merge.matching`` holds the indices and the compact token map."""
    m = tome_match(metric, r, class_token, distill_token, backend)
    return ToMeMerge(m, distill_token, backend), ToMeUnmerge(m)


def parse_r(num_layers: int, r) -> list:
    """Per-layer merge schedule (ToMe's ``parse_r``): an int (every layer), a list (per layer,
    padded with 0), or ``(r, inflection)`` with ``inflection`` in [-1, 1]."""
    num_layers = _checks.count("num_layers", num_layers)
    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(f"r has {len(r)} entries for {num_layers} layers")
        out = [_checks.count("r[i]", v) for v in r] + [0] * (num_layers - len(r))
    elif isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError("r as a tuple must be (r, inflection)")
        rr, inflect = _checks.count("r", r[0]), float(r[1])
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflection must be in [-1, 1], got {inflect}")
        lo = int(rr * (1.0 - inflect))
        hi = 2 * rr - lo
        span = max(num_layers - 1, 1)
        out = [int(lo + (hi - lo) * i / span) for i in range(num_layers)]
    else:
        out = [_checks.count("r", r)] * num_layers
    return out
