"""fpet_kernels: fused token-merging ops (ToMe, FPET, PYRA) for fast parameter-efficient ViT tuning.

    import fpet_kernels as fk
    x, size, matching = fk.tome_merge(x, metric, r=16, class_token=True)
    x_full = fk.unmerge(x, matching)
    x, size = fk.fpet_merge(x, metric, class_token=True)

Every op is a registered ``torch.ops.fpet.*`` custom op (fake kernel, autograd) whose kernel is
picked per call: ``backend=`` argument, else ``$FPET_BACKEND``, else the fastest live backend.
``fk.backends()`` tells what is live; ``fpet_kernels.reference`` holds the pure-PyTorch spec.
"""
from ._backend import backends
from .merging import merge_source, merge_wavg
from .ops.attention import attention_inputs, proportional_sdpa
from .ops.fpet import FPETMerge, bipartite_diff_matching, fpet_merge
from .ops.pyra import pyra_merge
from .ops.tome import (Matching, ToMeMerge, ToMeUnmerge, bipartite_soft_matching, compose_token_map, parse_r,
                       tome_match, tome_merge, unmerge)
from . import patch, reference  # noqa: E402

from ._version import __version__  # noqa: E402  (the one version string: fpet_kernels/_version.py)

__all__ = [
    "backends", "bipartite_soft_matching", "bipartite_diff_matching", "merge_wavg", "merge_source", "parse_r",
    "tome_match", "tome_merge", "unmerge", "compose_token_map", "fpet_merge", "pyra_merge", "Matching",
    "ToMeMerge", "ToMeUnmerge", "FPETMerge", "reference", "patch", "attention_inputs", "proportional_sdpa",
]
