"""fpet_kernels: fused token-merging ops (ToMe, FPET, PYRA) for fast parameter-efficient ViT tuning.

    import fpet_kernels as fk
    x, size, matching = fk.tome_merge(x, metric, r=16, class_token=True)
    x_full = fk.unmerge(x, matching)
    x, size = fk.fpet_merge(x, metric, class_token=True)

Every op is a registered ``torch.ops.fpet.*`` custom op (fake kernel, autograd) whose kernel is
picked per call: ``backend=`` argument, else ``$FPET_BACKEND``, else the fastest live backend.
``fk.backends()`` tells what is live; ``fpet_kernels.reference`` holds the pure-PyTorch spec.
Without the C++ extension the package still imports and runs the reference, with one warning
saying how to build it (``FPET_NO_EXTENSION=1``: pure Python on purpose, no warning).
"""
import warnings

from .ops._backend import backends
from .merging import merge_source, merge_wavg
from .ops.attention import attention_inputs, proportional_sdpa
from .ops.fpet import FPETMerge, bipartite_diff_matching, fpet_merge
from .ops.pyra import pyra_merge
from .ops.tome import (Matching, RowMatching, ToMeMerge, ToMeUnmerge, bipartite_soft_matching, compose_token_map,
                       parse_r, tome_match, tome_merge, unmerge)
from . import patch, reference  # noqa: E402

from ._version import __version__  # noqa: E402  (the one version string: fpet_kernels/_version.py)
from . import _version  # noqa: E402
from .ops import _backend  # noqa: E402

# The one word at import about a missing extension (FPET_NO_EXTENSION=1 silences it).
_missing = _version.missing_extension_message(_backend.extension_loaded(), _backend._EXT_ERROR)
if _missing:
    warnings.warn(_missing, RuntimeWarning, stacklevel=2)
del _missing

__all__ = [
    "backends", "bipartite_soft_matching", "bipartite_diff_matching", "merge_wavg", "merge_source", "parse_r",
    "tome_match", "tome_merge", "unmerge", "compose_token_map", "fpet_merge", "pyra_merge", "Matching", "RowMatching",
    "ToMeMerge", "ToMeUnmerge", "FPETMerge", "reference", "patch", "attention_inputs", "proportional_sdpa",
]
