"""The ops as export-friendly PyTorch: what ``torch.onnx.export`` traces in place of the registered ops.

The public op functions call these while the ONNX exporter is tracing (``ops/_export.py``), so the
exported graph holds standard aten ops (matmul, max, topk, gather, scatter ...) that onnxscript's
torchlib translates, and onnxruntime computes the same matchings and merges as eager.

They are the references of the op modules with two changes: no in-place writes (the graph stays
functional, so a table of decompositions can use them too: ``fpet_kernels.integrations.onnx``, which
reads each op record's ``formulation()``), and
ToMe's ranking through ``topk`` instead of PyTorch's stable ``sort`` (which the exporter does not
translate): ONNX ``TopK`` puts the lower index first among equal values, the spec's tie rule
(a stable descending sort). The merge arithmetic is the references' own.

Each function has its op's schema (``torch.ops.fpet.<name>``, without ``backend``) and returns what
the op returns (tuples of tensors, no ``Matching``).
"""
import torch
from torch import Tensor

from . import fpet, pyra, tome
from .shapes import cap_r, compute_dtype, grid_sizes, size_dtype


def _token_map(n: int, src: Tensor, dst: Tensor, unm: Tensor, distill_token: bool) -> Tensor:
    """``tome.token_map_reference`` without in-place writes."""
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


def tome_match(metric: Tensor, r: int, class_token: bool, distill_token: bool):
    """``tome.tome_match_reference``: (src_idx, dst_idx, unm_idx, token_map)."""
    bsz, n, _ = metric.shape
    na, nb = (n + 1) // 2, n // 2
    r = cap_r(r, n, class_token, distill_token)
    dev = metric.device
    if r == 0:
        empty = torch.zeros(bsz, 0, dtype=torch.int64, device=dev)
        unm = torch.arange(na, device=dev).expand(bsz, na)
        return empty, empty, unm, _token_map(n, empty, empty, unm, distill_token)
    m = tome.normalize(metric.detach().to(compute_dtype(metric)))
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
    return src, dst_idx, unm, _token_map(n, src, dst_idx, unm, distill_token)


def tome_merge(x: Tensor, metric: Tensor, r: int, size, class_token: bool, distill_token: bool):
    """``tome.tome_merge_reference``: (x', size', src_idx, dst_idx, unm_idx, token_map)."""
    src, dst, unm, tmap = tome_match(metric, r, class_token, distill_token)
    cdt = compute_dtype(x, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if src.shape[1] == 0:
        return x, s, src, dst, unm, tmap
    num = tome.merge_by_indices(x.to(cdt) * s, src, dst, unm, "sum", distill_token)
    den = tome.merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return tome.safe_div(num, den).to(x.dtype), den, src, dst, unm, tmap


def merge_wavg(x: Tensor, size, token_map: Tensor, n_out: int):
    return tome.merge_wavg_reference(x, size, token_map, n_out)


def unmerge(y: Tensor, token_map: Tensor):
    return tome.unmerge_reference(y, token_map)


def merge_sum(x: Tensor, token_map: Tensor, n_out: int):
    return tome.merge_sum_reference(x, token_map, n_out)


def fpet_merge(x: Tensor, metric: Tensor, size, num_prefix: int, H: int, W: int):
    """``fpet.fpet_merge_reference`` (forward): (x', size', token_map)."""
    with torch.no_grad():
        scores, a_idx, b_idx = fpet._scores(metric, num_prefix, H, W)
        match = fpet.hard_matching(scores)[0]
    bsz, n = metric.shape[:2]
    nb = grid_sizes(num_prefix, H, W)[1]
    dev = metric.device
    tmap = (torch.zeros(bsz, n, dtype=torch.int64, device=dev)
            .scatter(1, a_idx.expand(bsz, -1), match)
            .scatter(1, b_idx.expand(bsz, -1), torch.arange(nb, device=dev).expand(bsz, nb)))
    cdt = compute_dtype(x, metric, size)
    out, den = tome.merge_wavg_reference(x.to(cdt), None if size is None else size.to(cdt), tmap, nb)
    return out.to(x.dtype), den.to(size_dtype(x, size)), tmap
