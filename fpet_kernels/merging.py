"""ToMe's generic helpers over any merge callable: ``merge_wavg`` and ``merge_source`` (spec 1.9, 1.10).

They accept the merges of ``bipartite_soft_matching`` (ToMe) and ``bipartite_diff_matching`` (FPET)
and run the fused op for them (``merge_wavg`` / ``fpet_merge`` through ``ops.library.dispatch``, as
the public op functions do); any other ``merge(x, mode)`` callable goes through the generic
formula, so ToMe-style code keeps working unchanged.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .ops import library
from .ops.fpet import FPET_MERGE, FPETMerge
from .ops.tome import MERGE_WAVG, ToMeMerge, compute_dtype, safe_div


def merge_wavg(merge, x: Tensor, size: Optional[Tensor] = None):
    """Size-weighted merge: ``x' = merge(x * size, "sum") / merge(size, "sum")``, ``size' = merge(size, "sum")``.

    Sizes are float32 (float64 for float64 inputs) whatever ``x.dtype``. Returns ``(x', size')``."""
    _checks.tokens("x", x)
    if size is not None:
        _checks.tokens("size", size, last=1)
        _checks.same_tokens("x", x, "size", size)
    if isinstance(merge, ToMeMerge):
        _checks.closure_input("x", x, merge.matching.token_map, merge.matching.token_map.shape[1])
        if merge.r == 0:
            s = torch.ones(*x.shape[:2], 1, dtype=compute_dtype(x, size), device=x.device) if size is None \
                else size.to(compute_dtype(x, size))
            return x, s
        # the reference checks the map (one host sync: the closure may hold a user-given matching)
        return library.dispatch(MERGE_WAVG, merge.backend, x.device, _checks.dtypes(x=x, size=size),
                                x, size, merge.matching.token_map, merge.n_out)
    if isinstance(merge, FPETMerge):  # the fused op on the closure's metric (same values, same gradients)
        _checks.closure_input("x", x, merge.metric, merge.n_in)
        out, out_size, _ = library.dispatch(FPET_MERGE, merge.backend, x.device,
                                            _checks.dtypes(x=x, metric=merge.metric, size=size),
                                            x, merge.metric, size, merge.num_prefix, merge.h, merge.w)
        return out, out_size
    if not callable(merge):
        raise TypeError(f"merge must be a merge callable (e.g. from bipartite_soft_matching), got "
                        f"{type(merge).__name__}")
    cdt = compute_dtype(x, size)
    s = torch.ones(*x.shape[:2], 1, dtype=cdt, device=x.device) if size is None else size.to(cdt)
    num = merge(x.to(cdt) * s, mode="sum")
    den = merge(s, mode="sum")
    return safe_div(num, den).to(x.dtype), den


def merge_source(merge, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
    """ToMe-compatible dense source tracking: ``source`` starts as the identity [B, N, N] and becomes
    ``merge(source, "amax")`` ([B, N', N0]). For O(N) memory use ``compose_token_map`` instead."""
    _checks.tokens("x", x)
    if source is None:
        n = x.shape[1]
        source = torch.eye(n, device=x.device, dtype=x.dtype)[None].expand(x.shape[0], n, n)
    else:
        _checks.tokens("source", source)
        if source.shape[:2] != x.shape[:2] or source.device != x.device:
            raise ValueError(f"source must be [B, N, N0] with x's B and N on x's device ({tuple(x.shape[:2])}, "
                             f"{x.device}), got {tuple(source.shape)} on {source.device}")
    return merge(source, mode="amax")
