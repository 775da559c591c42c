"""The pure-PyTorch reference implementations of the spec (the fallback backend and the test oracle).

Every function here is plain autograd-differentiable PyTorch; the registered ops must agree with it."""
from .ops.fpet import (checkerboard, diff_matching_reference as diff_matching,  # noqa: F401
                       fpet_merge_backward_reference as fpet_merge_backward, fpet_merge_reference, resolve_grid)
from .ops.pyra import (pyra_merge_backward_reference as pyra_merge_backward, pyra_merge_reference,  # noqa: F401
                       pyra_merge_rows_reference as pyra_merge_rows)
from .ops.tome import (cap_r as _cap_r, merge_by_indices, merge_sum_reference as merge_sum,  # noqa: F401
                       merge_wavg_reference, tome_match_reference as tome_match, tome_merge_reference,
                       tome_match_rows_reference as tome_match_rows, tome_merge_rows_reference as tome_merge_rows,
                       unmerge_reference as unmerge)


def tome_merge(x, metric, r, size=None, class_token=False, distill_token=False):
    return tome_merge_reference(x, metric, r, size, class_token, distill_token)


def fpet_merge(x, metric, size=None, class_token=False, distill_token=False, grid=None):
    p = int(class_token) + int(distill_token)
    h, w = resolve_grid(x.shape[1], p, grid)
    out, out_size, _ = fpet_merge_reference(x, metric, size, p, h, w)
    return out, out_size


def pyra_merge(x, metric, r, a, b, ln_weight, ln_bias, size=None, class_token=False, distill_token=False, eps=1e-5):
    r = _cap_r(r, x.shape[1], class_token, distill_token)
    out, out_size, _ = pyra_merge_reference(x, metric, r, a[:r], b, ln_weight, ln_bias, size, class_token,
                                            distill_token, eps)
    return out, out_size
