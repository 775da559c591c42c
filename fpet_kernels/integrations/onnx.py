"""ONNX export of patched models: ``import fpet_kernels.integrations.onnx``, then
``torch.onnx.export(model, (x,), dynamo=True)`` with no extra argument.

Opt-in by importing this module (``fpet_kernels`` does not import it): the decompositions go into
torch's global table, and Inductor, when the environment variable ``CI`` is set, refuses to compile
an op that has both a decomposition there and no lowering (``make_fallback ... a decomposition
exists``); a model compiled with Inductor in a process that never imported this module is unaffected.
``unregister()`` takes them out again.

Mechanism: each forward op of the package (``torch.ops.fpet.{tome_match, tome_merge, merge_wavg,
unmerge, merge_sum, fpet_merge, pyra_merge}`` and their ``*_triton`` twins, ``attention_inputs_triton``) gets a decomposition into its
pure-PyTorch reference (written without in-place writes) in ``torch._decomp.decomposition_table``.
The dynamo ONNX exporter builds its decomposition table from that table (plus
``torch.export.default_decompositions()``) for every op without an ONNX function, so the custom ops
become standard aten ops (matmul, max, topk, gather, scatter ...) that onnxscript's torchlib translates. Registered once when this module is
imported (it only touches ``torch._decomp``; no onnx import).

Scope: nothing else reads that global table wholesale: ``torch.compile`` (Inductor) and
``ExportedProgram.run_decompositions()`` use their own tables, so compiled models and plain
``torch.export`` programs keep the fused custom ops. Cost: the ONNX graph computes the merges with
the reference formulation (dense ops; onnxruntime runs them on any device), not the fused kernels.
The reference is the spec's oracle, so the ONNX model computes the same matchings as eager.

Needs a compiled backend to be live (the public functions then call the registered ops): with the
reference backend the graph holds ``aten.sort.stable``, which the exporter cannot translate.

``export(model, args, path)`` below is a thin convenience wrapper (dynamo=True, optional path).
"""
from __future__ import annotations

import torch

from ..ops import attention as _attention, fpet as _fpet, pyra as _pyra, tome as _tome

_REGISTERED = False


# The references written without in-place writes (the exporter's decomposition pass takes functional
# graphs only): the matching and token maps below; the merge arithmetic is the references' own.
def _token_map(n: int, src, dst, unm, distill_token: bool):
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


def _match(metric, r: int, class_token: bool, distill_token: bool):
    bsz, n, _ = metric.shape
    na, nb = (n + 1) // 2, n // 2
    r = _tome.cap_r(r, n, class_token, distill_token)
    dev = metric.device
    if r == 0:
        empty = torch.zeros(bsz, 0, dtype=torch.int64, device=dev)
        unm = torch.arange(na, device=dev).expand(bsz, na)
        return empty, empty, unm, _token_map(n, empty, empty, unm, distill_token)
    m = _tome.normalize(metric.detach().to(_tome.compute_dtype(metric)))
    scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
    if class_token:
        scores = scores.masked_fill((torch.arange(na, device=dev) == 0).view(1, na, 1), -torch.inf)
    if distill_token:
        scores = scores.masked_fill((torch.arange(nb, device=dev) == 0).view(1, 1, nb), -torch.inf)
    best, dst = scores.max(dim=-1)
    # ONNX TopK puts the lower index first among equal values: the spec's tie rule (a stable sort)
    rank = torch.topk(best, na, dim=-1, largest=True, sorted=True).indices
    src, unm = rank[:, :r], rank[:, r:]
    if class_token:
        unm = torch.topk(unm, na - r, dim=-1, largest=False, sorted=True).values
    dst_idx = dst.gather(1, src)
    return src, dst_idx, unm, _token_map(n, src, dst_idx, unm, distill_token)


def _tome_match(metric, r, class_token, distill_token, backend=None):
    return _match(metric, r, class_token, distill_token)


def _tome_merge(x, metric, r, size, class_token, distill_token, backend=None):
    src, dst, unm, tmap = _match(metric, r, class_token, distill_token)
    cdt = _tome.compute_dtype(x, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if src.shape[1] == 0:
        return x, s, src, dst, unm, tmap
    num = _tome.merge_by_indices(x.to(cdt) * s, src, dst, unm, "sum", distill_token)
    den = _tome.merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return (num / den).to(x.dtype), den, src, dst, unm, tmap


def _merge_wavg(x, size, token_map, n_out, backend=None):
    return _tome.merge_wavg_reference(x, size, token_map, n_out)


def _unmerge(y, token_map, backend=None):
    return _tome.unmerge_reference(y, token_map)


def _merge_sum(x, token_map, n_out, backend=None):
    return _tome.merge_sum_reference(x, token_map, n_out)


def _fpet_merge(x, metric, size, num_prefix, H, W, backend=None):
    m, a_idx, b_idx = _fpet.diff_matching_reference(metric, num_prefix, H, W)
    cdt = _tome.compute_dtype(x, metric, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    z = x.to(cdt) * s
    mt = m.transpose(1, 2).to(cdt)
    out = (z[:, b_idx] + mt @ z[:, a_idx]) / (s[:, b_idx] + mt @ s[:, a_idx])
    den = s[:, b_idx] + mt @ s[:, a_idx]
    bsz, na, nb = m.shape
    hard = m.detach()
    match = torch.where(hard.amax(dim=-1) > 0.5, hard.argmax(dim=-1), torch.full_like(hard[..., 0], -1).long())
    tmap = (torch.zeros(bsz, x.shape[1], dtype=torch.int64, device=x.device)
            .scatter(1, a_idx.expand(bsz, na), match)
            .scatter(1, b_idx.expand(bsz, nb), torch.arange(nb, device=x.device).expand(bsz, nb)))
    return out.to(x.dtype), den.to(_tome.size_dtype(x, size)), tmap


def _pyra_merge(x, metric, r, a, b, ln_weight, ln_bias, size, class_token, distill_token, eps, backend=None):
    src, dst, unm, tmap = _match(metric, r, class_token, distill_token)
    r = src.shape[1]
    cdt = _tome.compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if r == 0:
        return x, s.to(_tome.size_dtype(x, size)), src, dst, unm, tmap
    bsz, _, c = x.shape
    z = x.to(cdt) * s
    s_rows, _, _, wc, wt = _pyra._modulation(z, src, dst, a, b, ln_weight, ln_bias, eps)
    s_mod = s_rows + s_rows * wc * wt
    unm_rows = z[:, 0::2].gather(1, unm[..., None].expand(bsz, unm.shape[1], c))
    b_rows = z[:, 1::2].scatter_add(1, dst[..., None].expand(bsz, r, c), s_mod)
    num = _tome.assemble(unm_rows, b_rows, distill_token)
    den = _tome.merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return (num / den).to(x.dtype), den.to(_tome.size_dtype(x, size)), src, dst, unm, tmap


def _attention_inputs(qkv, size, num_heads, scale, pad_v, backend=None):
    return tuple(_attention.attention_inputs_reference(qkv, size, num_heads, scale, pad_v))


DECOMPOSITIONS = {"tome_match": _tome_match, "tome_merge": _tome_merge, "merge_wavg": _merge_wavg,
                  "unmerge": _unmerge, "merge_sum": _merge_sum, "fpet_merge": _fpet_merge,
                  "pyra_merge": _pyra_merge, "attention_inputs": _attention_inputs}


def register() -> None:
    """Put the decompositions into ``torch._decomp.decomposition_table`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    table = torch._decomp.decomposition_table
    for name, fn in DECOMPOSITIONS.items():
        for op in registered_ops(name):
            table[op] = fn
    _REGISTERED = True


def unregister() -> None:
    """Take the decompositions out of ``torch._decomp.decomposition_table`` again."""
    global _REGISTERED
    table = torch._decomp.decomposition_table
    for name in DECOMPOSITIONS:
        for op in registered_ops(name):
            table.pop(op, None)
    _REGISTERED = False


def registered_ops(name: str) -> list:
    """The op overloads of ``name``: the op and its Triton twin ``<name>_triton`` (same schema), those defined."""
    packets = (getattr(torch.ops.fpet, n, None) for n in (name, f"{name}_triton"))
    return [p.default for p in packets if p is not None]


def export(model: torch.nn.Module, args: tuple, path=None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True, **kwargs)``: returns the ``ONNXProgram``.
    Works without this wrapper too once this module is imported (the import registers the decompositions)."""
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of the model's inputs, got {type(args).__name__}")
    register()
    return torch.onnx.export(model, args, path, dynamo=True, **kwargs)


register()
