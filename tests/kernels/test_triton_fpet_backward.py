"""Triton FPET straight-through backward (fpet_kernels/ops/fpet_triton_backward.py) against
``fpet_merge_backward_reference``. Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), so the shapes are small; a 12 x 12 grid with 32-wide
tiles makes Na, Nb and C span several tiles."""
from __future__ import annotations

import os

import pytest
import torch

from fpet_kernels.ops import triton_common
from fpet_kernels.ops.fpet import checkerboard, fpet_merge_backward_reference, fpet_merge_reference

if not triton_common.HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from fpet_kernels.ops.fpet_triton_backward import fpet_merge_backward  # noqa: E402

DEVICE = "cpu" if triton_common.interpreting() else "cuda"
# tolerance relative to each row's largest reference value (grad_metric of a zero-norm row is ~1e12)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _case(p, h, w, dtype=torch.float32, mdtype=None, c=64, d=32, bsz=2, with_size=True, with_gsize=True,
          seed=0, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    n = p + h * w
    mdtype = mdtype or dtype
    x = torch.randn(bsz, n, c, generator=g).to(DEVICE, dtype)
    metric = torch.randn(bsz, n, d, generator=g)
    for b, t in zero_rows:
        metric[b, t] = 0
    metric = metric.to(DEVICE, mdtype)
    size = (0.5 + 2 * torch.rand(bsz, n, 1, generator=g)).to(DEVICE) if with_size else None
    out, out_size, tmap = fpet_merge_reference(x, metric, size, p, h, w)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grad_size = torch.randn(out_size.shape, generator=g).to(DEVICE) if with_gsize else None
    return (grad_out, grad_size, x, metric, size, out, out_size, tmap, p, h, w)


def _assert_rows_close(got, ref, tol, what):
    """|got - ref| <= tol * (|ref| + the row's largest |ref|); [.., 1] tensors (grad_size, whose
    entries cancel to ~0 for B tokens): the largest |ref| of the image."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    got, ref = got.double(), ref.double()
    scale = ref.abs().amax(-1, keepdim=True)
    if ref.shape[-1] == 1 and ref.dim() == 3:
        scale = scale.amax(1, keepdim=True)
    err = (got - ref).abs()
    bad = err > tol * (ref.abs() + scale) + 1e-30
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, max err/row scale "
                           f"{(err / scale.clamp_min(1e-30)).max().item():.3g}")


def _check(args, dtype=torch.float32, **blocks):
    ref = fpet_merge_backward_reference(*args)
    got = fpet_merge_backward(*args, **blocks)
    tol = max(TOL[args[2].dtype], TOL[args[3].dtype])
    for name, gv, rv in zip(("grad_x", "grad_metric", "grad_size"), got, ref):
        assert torch.isfinite(gv).all(), name
        _assert_rows_close(gv, rv.to(gv.dtype) if name == "grad_size" else rv, tol, name)
    assert got[2].dtype == torch.float32
    return got


@pytest.mark.parametrize("p,h,w,with_size,with_gsize", [
    (0, 6, 6, True, True),
    (1, 8, 8, True, False),
    (2, 5, 7, False, True),
    (1, 7, 5, False, False),
    (2, 6, 6, True, True),
])
def test_float32_matches_reference(p, h, w, with_size, with_gsize):
    _check(_case(p, h, w, with_size=with_size, with_gsize=with_gsize, seed=p + h))


@pytest.mark.parametrize("dtype,mdtype", [
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
])
def test_half_matches_reference(dtype, mdtype):
    _check(_case(1, 6, 6, dtype=dtype, mdtype=mdtype, seed=3))


def test_multiple_tiles_odd_channels():
    # 12 x 12: Na = 72, Nb = 73 -> three 32-wide tiles each; C = 80 and D = 24 are masked tails
    args = _case(1, 12, 12, c=80, d=24, bsz=1, seed=5)
    _check(args, block_i=32, block_j=32, block_c=32)


@pytest.mark.parametrize("d", [512, 768])
def test_large_metric_dim(d):
    """D = 512 / 768: 8 / 12 metric chunks of 64 in the norms, scores and gradient rows."""
    _check(_case(1, 4, 4, c=32, d=d, bsz=1, seed=17))


def test_metric_chunks_with_a_tail():
    # block_d = 16 with D = 40: three chunks, the last masked; two images, several A/B blocks
    _check(_case(1, 9, 8, c=48, d=40, seed=19), block_i=32, block_j=32, block_d=16)


def test_zero_norm_b_row():
    # a B token with a zero metric row: its scores are 0 (never a top pick here), grad = dn / 1e-12
    _, b_idx = checkerboard(1, 6, 6)
    _check(_case(1, 6, 6, zero_rows=[(0, int(b_idx[4])), (1, int(b_idx[-1]))], seed=7))


def test_zero_norm_a_row():
    # a zero A row ties on every column: no match, top-2 = the two lowest non-prefix columns (the
    # kernel's documented tie rule; torch.topk picks other tied columns, so that row is checked here).
    # Nb = 33 with 32-wide tiles: the tied zeros of the second tile must not displace the first's.
    p, h, w = 1, 8, 8
    a_idx, b_idx = checkerboard(p, h, w)
    t = int(a_idx[3])
    args = _case(p, h, w, zero_rows=[(0, t)], seed=11)
    grad_out, grad_size, x, metric, size, out, out_size, tmap, *_ = args
    assert tmap[0, t] == -1
    ref = fpet_merge_backward_reference(*args)
    got = fpet_merge_backward(*args, block_i=32, block_j=32)
    keep = torch.ones(metric.shape[:2], dtype=torch.bool)
    keep[0, t] = False
    _assert_rows_close(got[0], ref[0], TOL[torch.float32], "grad_x")
    _assert_rows_close(got[2], ref[2], TOL[torch.float32], "grad_size")
    _assert_rows_close(got[1][keep], ref[1][keep], TOL[torch.float32], "grad_metric, other rows")
    # the zero row: its metric gradient is 0 (docs/semantics.md), in the reference too
    assert torch.equal(got[1][0, t], torch.zeros_like(got[1][0, t]))
    assert torch.equal(ref[1][0, t], torch.zeros_like(ref[1][0, t]))


def test_deterministic():
    args = _case(2, 12, 12, c=64, d=32, bsz=1, seed=13)
    first = fpet_merge_backward(*args, block_i=32, block_j=32)
    second = fpet_merge_backward(*args, block_i=32, block_j=32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    args = list(_case(1, 6, 6, bsz=1))
    for k in (0, 1, 2, 3, 4, 5, 6, 7):
        if args[k] is not None:
            args[k] = args[k][:0]
    gx, gm, gs = fpet_merge_backward(*args)
    assert gx.shape == (0, 37, 64) and gm.shape == (0, 37, 32) and gs.shape == (0, 37, 1)
