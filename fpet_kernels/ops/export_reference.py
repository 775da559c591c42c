"""The ops as export-friendly PyTorch: what ``torch.onnx.export`` traces in place of the registered ops.

The public op functions call these while the ONNX exporter is tracing (``ops/_export.py``), so the
exported graph holds standard aten ops (matmul, max, topk, gather, scatter ...) that onnxscript's
torchlib translates, and onnxruntime computes the same matchings and merges as eager.

They are the references of the op modules with two changes: no in-place writes (the graph stays
functional, so a table of decompositions can use them too: ``fpet_kernels.integrations.onnx``), and
ToMe's ranking through ``topk`` instead of PyTorch's stable ``sort`` (which the exporter does not
translate): ONNX ``TopK`` puts the lower index first among equal values, the spec's tie rule
(a stable descending sort). The merge arithmetic is the references' own.

The ToMe and FPET ops' formulations live in their family modules, as their ``library.Op`` records'
``export`` (``tome.tome_match_export`` ...); this file keeps the others' until they move too.

Each function has its op's schema (``torch.ops.fpet.<name>``, without ``backend``) and returns what
the op returns (tuples of tensors, no ``Matching``).
"""
import torch
from torch import Tensor

from . import attention, fpet, pyra, tome
from .shapes import compute_dtype, size_dtype


def pyra_merge(x: Tensor, metric: Tensor, r: int, a: Tensor, b: Tensor, ln_weight: Tensor, ln_bias: Tensor, size,
               class_token: bool, distill_token: bool, eps: float):
    """``pyra.pyra_merge_reference``: (x', size', src_idx, dst_idx, unm_idx, token_map)."""
    src, dst, unm, tmap = tome.tome_match_export(metric, r, class_token, distill_token)
    r = src.shape[1]
    cdt = compute_dtype(x, size, a, b, ln_weight, ln_bias)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    if r == 0:
        return x, s.to(size_dtype(x, size)), src, dst, unm, tmap
    bsz, _, c = x.shape
    z = x.to(cdt) * s
    s_rows, _, _, wc, wt = pyra._modulation(z, src, dst, a, b, ln_weight, ln_bias, eps)
    s_mod = s_rows + s_rows * wc * wt
    unm_rows = z[:, 0::2].gather(1, unm[..., None].expand(bsz, unm.shape[1], c))
    b_rows = z[:, 1::2].scatter_add(1, dst[..., None].expand(bsz, r, c), s_mod)
    num = tome.assemble(unm_rows, b_rows, distill_token)
    den = tome.merge_by_indices(s, src, dst, unm, "sum", distill_token)
    return (num / den).to(x.dtype), den.to(size_dtype(x, size)), src, dst, unm, tmap


def attention_inputs(qkv: Tensor, size, num_heads: int, scale: float, pad_v: bool):
    return tuple(attention.attention_inputs_reference(qkv, size, num_heads, scale, pad_v))


# op name -> formulation, for a decomposition table (``fpet_kernels.integrations.onnx.decompositions``);
# the ToMe and FPET ops' formulations are their records' (``tome.py``, ``fpet.py``)
FORMULATIONS = {**{op.name: op.formulation() for op in (tome.TOME_MATCH, tome.TOME_MERGE, tome.MERGE_WAVG, tome.UNMERGE,
                                                         tome.MERGE_SUM, fpet.FPET_MERGE)},
                "pyra_merge": pyra_merge, "attention_inputs": attention_inputs}
