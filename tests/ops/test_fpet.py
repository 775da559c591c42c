"""FPET differentiable checkerboard merge (fpet_merge, bipartite_diff_matching): every backend against
the reference and an independent float64 computation, the straight-through gradients against autograd
of the dense formulation, determinism and edge cases."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import fpet_kernels as fk
import spec_oracle as so
from helpers import (assert_thread_invariant, DTYPE_TOLS, HALF_DTYPES, assert_close, assert_half_criterion, gen, gen_size, leaf,
                     wavg_by_map)

B = 2
D = 64

CASES = [  # (N, class_token, distill_token, grid, C)
    pytest.param(197, True, False, None, 768, id="N197-cls-C768"),
    pytest.param(577, True, False, None, 384, id="N577-cls-C384"),
    pytest.param(50, True, False, None, 64, id="N50-cls-7x7"),
    pytest.param(51, True, True, None, 384, id="N51-cls+dist-7x7"),
    pytest.param(65, True, False, None, 64, id="N65-cls-8x8"),
    pytest.param(64, False, False, None, 64, id="N64-8x8"),
    pytest.param(25, True, False, (4, 6), 64, id="N25-cls-4x6"),
    pytest.param(25, True, False, None, 384, id="N25-cls-None=6x4"),
    pytest.param(36, True, False, (5, 7), 768, id="N36-cls-5x7"),
    pytest.param(37, True, True, (5, 7), 64, id="N37-cls+dist-5x7"),
    pytest.param(35, False, False, None, 64, id="N35-None=7x5"),
    pytest.param(196, False, False, (14, 14), 64, id="N196-14x14-no-prefix"),
]


def _data(n, c, dtype=torch.float32, seed=0, metric_dtype=None):
    x = gen(B, n, c, dtype=dtype, seed=seed)
    metric = gen(B, n, D, dtype=metric_dtype or dtype, seed=seed + 1)
    size = gen_size(B, n, seed=seed + 2)
    return x, metric, size


def _grid(n, cls, dist, grid):
    p = int(cls) + int(dist)
    return (p,) + so.fpet_grid(n, p, grid)


def expected_token_map(metric, p, h, w):
    """Independent float64 matching: per A token its best B index if strictly best, else -1."""
    a_pos, b_pos = so.checkerboard(p, h, w)
    m = metric.double()
    mn = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = mn[:, a_pos] @ mn[:, b_pos].transpose(1, 2)
    s[..., :p] = -torch.inf
    top = s.topk(2, dim=-1)
    match = torch.where(top.values[..., 0] > top.values[..., 1], top.indices[..., 0], -1)
    tmap = torch.empty(metric.shape[:2], dtype=torch.int64)
    tmap[:, a_pos] = match
    tmap[:, b_pos] = torch.arange(len(b_pos))
    return tmap


# ----------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("n,cls,dist,grid,c", CASES)
def test_fpet_merge_matches_reference(backend, n, cls, dist, grid, c, dtype, atol, rtol):
    x, metric, size = _data(n, c, dtype, seed=n)
    p, h, w = _grid(n, cls, dist, grid)
    nb = len(so.checkerboard(p, h, w)[1])
    for sz in (None, size):
        out, out_size, tmap = fk.fpet_merge(x, metric, sz, cls, dist, grid, backend=backend, return_token_map=True)
        ref_out, ref_size = fk.reference.fpet_merge(x, metric, sz, cls, dist, grid)
        assert out.shape == (B, nb, c) and out.dtype == dtype
        assert out_size.shape == (B, nb, 1) and out_size.dtype == torch.float32
        assert tmap.shape == (B, n) and tmap.dtype == torch.int64
        assert torch.equal(tmap, expected_token_map(metric, p, h, w))
        assert torch.equal(out_size, ref_size)
        assert_close(out, ref_out, atol, rtol, "out")
        o2, s2 = fk.fpet_merge(x, metric, sz, cls, dist, grid, backend=backend)
        assert torch.equal(o2, out) and torch.equal(s2, out_size)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,cls,dist,grid,c", [CASES[0], CASES[1], CASES[8]])
def test_fpet_merge_half_precision_criterion(backend, dtype, n, cls, dist, grid, c):
    x, metric, size = _data(n, c, dtype, seed=3)
    out, out_size, tmap = fk.fpet_merge(x, metric, size, cls, dist, grid, backend=backend, return_token_map=True)
    ref_out, ref_size = fk.reference.fpet_merge(x, metric, size, cls, dist, grid)
    truth, truth_size = wavg_by_map(x, size, tmap, out.shape[1])
    assert_half_criterion(out, ref_out, truth, dtype, "fpet_merge")
    assert torch.equal(out_size.double(), truth_size)


def test_fpet_mixed_dtypes(backend):
    n, c = 197, 384
    for xd, md in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)):
        x, metric, size = _data(n, c, xd, seed=4, metric_dtype=md)
        out, out_size, tmap = fk.fpet_merge(x, metric, size, True, backend=backend, return_token_map=True)
        ref_out, ref_size = fk.reference.fpet_merge(x, metric, size, True)
        assert out.dtype == xd and out_size.dtype == torch.float32
        assert torch.equal(tmap, expected_token_map(metric, 1, 14, 14))
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xd]
        assert_close(out, ref_out, tol, tol, f"{xd}/{md}")


def test_grid_none_and_explicit_grid_differ():
    """N - p = 24: grid=None is (6, 4); (4, 6) is another split with other results."""
    x, metric, _ = _data(25, 16, seed=5)
    a, _, ta = fk.fpet_merge(x, metric, None, True, False, None, backend="reference", return_token_map=True)
    b, _, tb = fk.fpet_merge(x, metric, None, True, False, (4, 6), backend="reference", return_token_map=True)
    c, _, tc = fk.fpet_merge(x, metric, None, True, False, (6, 4), backend="reference", return_token_map=True)
    assert torch.equal(a, c) and torch.equal(ta, tc)
    assert not torch.equal(ta, tb)


# ----------------------------------------------------------------------------------- closures
@pytest.mark.parametrize("n,cls,dist,grid,c", [CASES[0], CASES[3], CASES[6]])
def test_closure_merge_wavg_equals_fused(backend, n, cls, dist, grid, c):
    """merge_wavg(bipartite_diff_matching(metric), x, size) runs the fused op; the generic formula
    merge(x*s, "sum") / merge(s, "sum") through the dense straight-through matrix gives the same
    values and the same gradients in x and metric."""
    x, metric, size = _data(n, c, seed=6)
    nb = len(so.checkerboard(*_grid(n, cls, dist, grid))[1])
    g = gen(B, nb, c, seed=7)
    results = []
    for path in ("fused", "closure", "generic"):
        xl, ml = leaf(x), leaf(metric)
        if path == "fused":
            out, out_size = fk.fpet_merge(xl, ml, size, cls, dist, grid, backend=backend)
        else:
            merge = fk.bipartite_diff_matching(ml, cls, dist, grid, backend=backend)
            fn = merge if path == "closure" else (lambda t, mode="mean", merge=merge: merge(t, mode=mode))
            out, out_size = fk.merge_wavg(fn, xl, size)
        ((out * g).sum() + out_size.pow(2).sum()).backward()
        results.append((out, out_size, xl.grad, ml.grad))
    for path, res in zip(("closure", "generic"), results[1:]):
        for name, a, b in zip(("out", "size", "grad x", "grad metric"), res, results[0]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{path} {name}: {m}")


def test_source_tracking(backend):
    """merge_source with the FPET closure (dense, amax) and compose_token_map (compact) agree, with
    dropped tokens (ties) having an all-zero source column and map entry -1, also after a ToMe merge."""
    n = 197
    x, metric, size = _data(n, 32, seed=8)
    metric[:, 1:30:2] = 0  # zero rows tie on every column: those A tokens match nothing
    merge = fk.bipartite_diff_matching(metric, True, backend=backend)
    source = fk.merge_source(merge, x)
    _, _, tmap = fk.fpet_merge(x, metric, None, True, backend=backend, return_token_map=True)
    assert torch.equal(merge.token_map, tmap)
    assert (tmap == -1).any()
    assert source.shape == (B, 99, n)
    dropped = source.sum(1) == 0
    assert torch.equal(dropped, tmap == -1)
    assert torch.equal(torch.where(dropped, -1, source.argmax(1)), tmap)
    # then a ToMe merge: compose the compact map and the dense source
    x1, s1 = fk.merge_wavg(merge, x)
    metric2 = gen(B, 99, 16, seed=9)
    merge2, _ = fk.bipartite_soft_matching(metric2, 20, True, backend=backend)
    source2 = fk.merge_source(merge2, x1, source)
    tmap2 = fk.compose_token_map(tmap, merge2.matching)
    dropped2 = source2.sum(1) == 0
    assert torch.equal(dropped2, tmap2 == -1)
    assert torch.equal(torch.where(dropped2, -1, source2.argmax(1)), tmap2)
    x2, s2 = fk.merge_wavg(merge2, x1, s1)
    assert torch.equal(s2.squeeze(-1), source2.sum(-1))
    truth, _ = wavg_by_map(x, None, tmap2, 79)
    torch.testing.assert_close(x2, truth.float(), atol=1e-5, rtol=1e-5)
    # unmerge back to the original resolution: dropped tokens get zeros
    full = fk.unmerge(x2, tmap2, backend=backend)
    assert torch.equal(full[tmap2 == -1], torch.zeros(int((tmap2 == -1).sum()), 32))
    keep = tmap2 >= 0
    assert torch.equal(full[keep], x2.gather(1, tmap2.clamp_min(0)[..., None].expand(B, n, 32))[keep])


# ----------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("n,cls,dist,grid,fast", [(17, True, False, None, False), (25, True, False, (4, 6), True),
                                                  (16, False, False, None, True), (37, True, True, (5, 7), True)])
def test_fpet_gradcheck_x_size(n, cls, dist, grid, fast):
    """float64 gradcheck in x and size (the metric enters through a piecewise-constant forward); the
    full Jacobian for one case, gradcheck's fast mode for the larger ones."""
    x = gen(B, n, 4, dtype=torch.float64, seed=10).requires_grad_()
    metric = gen(B, n, 4, dtype=torch.float64, seed=11)
    size = (1 + gen(B, n, 1, dtype=torch.float64, seed=12, low=0, high=3)).requires_grad_()
    assert gradcheck(lambda x, s: fk.fpet_merge(x, metric, s, cls, dist, grid, backend="reference"), (x, size),
                     fast_mode=fast)
    assert gradcheck(lambda x: fk.fpet_merge(x, metric, None, cls, dist, grid, backend="reference")[0], (x,),
                     fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,cls,dist,grid,c", [CASES[0], CASES[3], CASES[6], CASES[10]])
def test_straight_through_gradients_equal_dense_autograd(backend, dtype, n, cls, dist, grid, c):
    """Gradients in x, metric and size (through merged values and merged sizes) equal autograd of
    the dense M = soft + (hard - soft).detach() formulation of spec 2.4, computed in float64."""
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("compiled kernels take float32/float16/bfloat16")
    if dtype == torch.float32 and backend == "reference":
        pytest.skip("the reference is checked in float64")
    x, metric, size = (t.to(dtype) for t in _data(n, c, seed=13))
    p, h, w = _grid(n, cls, dist, grid)
    nb = len(so.checkerboard(p, h, w)[1])
    g = gen(B, nb, c, seed=14)
    gs = gen(B, nb, 1, seed=15)
    xl, ml, sl = leaf(x), leaf(metric), leaf(size)
    out, out_size = fk.fpet_merge(xl, ml, sl, cls, dist, grid, backend=backend)
    ((out * g.to(dtype)).sum() + (out_size * gs.to(out_size.dtype)).sum()).backward()
    xd, md, sd = leaf(x.double()), leaf(metric.double()), leaf(size.double())
    d_out, d_size = so.fpet_dense_ste(xd, md, sd, p, h, w)
    ((d_out * g.double()).sum() + (d_size * gs.double()).sum()).backward()
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(out.double(), d_out, **{k: v * 10 for k, v in tol.items()})
    assert ml.grad.abs().max() > 0  # the straight-through path does carry a gradient to the metric
    for name, got, exp in (("x", xl.grad, xd.grad), ("metric", ml.grad, md.grad), ("size", sl.grad, sd.grad)):
        scale = exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=tol["atol"] * max(scale, 1), rtol=tol["rtol"],
                                   msg=lambda m: f"grad {name}: {m}")


def test_straight_through_gradient_with_ties_and_zero_rows(backend):
    """Zero metric rows and tied rows: finite gradients, equal to the dense autograd (float32 vs float64)."""
    n, c = 65, 32
    x, metric, size = _data(n, c, seed=16)
    metric[:, 3:20:3] = 0
    metric[:, 40] = metric[:, 42]
    xl, ml = leaf(x), leaf(metric)
    out, out_size = fk.fpet_merge(xl, ml, size, True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(out_size).all()
    out.pow(2).sum().backward()
    assert torch.isfinite(xl.grad).all() and torch.isfinite(ml.grad).all()
    xd, md = leaf(x.double()), leaf(metric.double())
    d_out, _ = so.fpet_dense_ste(xd, md, size.double(), 1, 8, 8)
    d_out.pow(2).sum().backward()
    torch.testing.assert_close(xl.grad.double(), xd.grad, atol=1e-5, rtol=1e-4)
    nz = metric.norm(dim=-1) > 0  # a zero row's gradient is 0 (docs/semantics.md); autograd's divides by eps
    assert torch.equal(ml.grad[~nz], torch.zeros_like(ml.grad[~nz]))
    torch.testing.assert_close(ml.grad.double()[nz], md.grad[nz], atol=1e-5 * md.grad[nz].abs().max().item(),
                               rtol=1e-3)


def test_kernel_gradients_equal_reference(kernel_backend):
    n, c = 197, 384
    x, metric, size = _data(n, c, seed=17)
    g = gen(B, 99, c, seed=18)
    grads = []
    for be in (kernel_backend, "reference"):
        xl, ml, sl = leaf(x), leaf(metric), leaf(size)
        out, out_size = fk.fpet_merge(xl, ml, sl, True, backend=be)
        ((out * g).sum() + out_size.sum()).backward()
        grads.append((xl.grad, ml.grad, sl.grad))
    for name, k, r in zip(("x", "metric", "size"), *grads):
        torch.testing.assert_close(k, r, atol=1e-5 * max(r.abs().max().item(), 1), rtol=1e-4,
                                   msg=lambda m: f"grad {name}: {m}")


def test_backward_honours_needs_input_grad(backend):
    x, metric, size = _data(197, 64, seed=19)
    xl = leaf(x)
    out, _ = fk.fpet_merge(xl, metric, size, True, backend=backend)
    out.sum().backward()
    assert xl.grad is not None and metric.grad is None and size.grad is None
    ml = leaf(metric)
    out, _ = fk.fpet_merge(x, ml, None, True, backend=backend)
    out.sum().backward()
    assert ml.grad is not None and torch.isfinite(ml.grad).all()


# ----------------------------------------------------------------------------------- determinism & edge cases
def test_determinism(backend):
    n, c = 197, 384
    x, metric, size = _data(n, c, seed=20)
    x = torch.cat([x, x[:1]])
    metric = torch.cat([metric, metric[:1]])
    size = torch.cat([size, size[:1]])
    g = gen(2, 99, c, seed=21)
    g = torch.cat([g, g[:1]])

    def run():
        xl, ml, sl = leaf(x), leaf(metric), leaf(size)
        out, out_size, tmap = fk.fpet_merge(xl, ml, sl, True, backend=backend, return_token_map=True)
        ((out * g).sum() + out_size.sum()).backward()
        return out, out_size, tmap, xl.grad, ml.grad, sl.grad

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for u in a:  # image 2 is a copy of image 0: the same result
        if backend == "reference":
            # The reference is composed of torch ops whose CPU BLAS may take another path for another
            # batch position (alignment, blocking), so the metric gradient may differ in the last
            # bit between two copies of one image (seen on the CI runner, torch 2.14.1). Run-to-run equality
            # above stays exact; the kernels below are held to bit equality across positions.
            torch.testing.assert_close(u[0], u[2], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(u[0], u[2])


def test_batch_of_one(backend):
    x, metric, size = _data(197, 64, seed=22)
    o1, s1, t1 = fk.fpet_merge(x[:1], metric[:1], size[:1], True, backend=backend, return_token_map=True)
    o2, s2, t2 = fk.fpet_merge(x, metric, size, True, backend=backend, return_token_map=True)
    torch.testing.assert_close(o1, o2[:1], atol=1e-6, rtol=1e-6)
    assert torch.equal(s1, s2[:1]) and torch.equal(t1, t2[:1])


def test_empty_batch(backend):
    x, metric, size = torch.zeros(0, 197, 64), torch.zeros(0, 197, D), torch.ones(0, 197, 1)
    out, out_size, tmap = fk.fpet_merge(x, metric, size, True, backend=backend, return_token_map=True)
    assert out.shape == (0, 99, 64) and out_size.shape == (0, 99, 1) and tmap.shape == (0, 197)
    xl = leaf(x)
    fk.fpet_merge(xl, metric, None, True, backend=backend)[0].sum().backward()
    assert xl.grad.shape == x.shape
    merge = fk.bipartite_diff_matching(metric, True, backend=backend)
    assert merge(x).shape == (0, 99, 64) and fk.merge_wavg(merge, x)[0].shape == (0, 99, 64)


def test_non_contiguous_inputs(backend):
    n, c = 197, 64
    x_t = gen(n, B, c, seed=23).transpose(0, 1)
    m_t = gen(B, D, n, seed=24).transpose(1, 2)
    s_t = gen_size(B, 2 * n, seed=25).view(B, n, 2)[..., :1]
    got = fk.fpet_merge(x_t, m_t, s_t, True, backend=backend, return_token_map=True)
    exp = fk.fpet_merge(x_t.contiguous(), m_t.contiguous(), s_t.contiguous(), True, backend=backend,
                        return_token_map=True)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    xl, ml = leaf(x_t), leaf(m_t)
    assert not (xl.is_contiguous() or ml.is_contiguous())
    fk.fpet_merge(xl, ml, s_t, True, backend=backend)[0].sum().backward()
    xc, mc = leaf(x_t.contiguous()), leaf(m_t.contiguous())
    fk.fpet_merge(xc, mc, s_t.contiguous(), True, backend=backend)[0].sum().backward()
    torch.testing.assert_close(ml.grad, mc.grad, atol=1e-6, rtol=1e-5)  # equal up to rounding: strides differ
    torch.testing.assert_close(xl.grad, xc.grad, atol=1e-6, rtol=1e-5)


def test_zero_metric_returns_x_b(backend):
    """All-zero metric: every row ties, every A token is dropped, the output is x_B in B order."""
    n, c = 65, 32
    x, _, size = _data(n, c, seed=26)
    metric = torch.zeros(B, n, D)
    out, out_size, tmap = fk.fpet_merge(x, metric, size, True, backend=backend, return_token_map=True)
    _, b_pos = so.checkerboard(1, 8, 8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x[:, b_pos], atol=1e-6, rtol=1e-6)
    assert torch.equal(out_size, size[:, b_pos])
    assert (tmap[:, so.checkerboard(1, 8, 8)[0]] == -1).all()


@pytest.mark.parametrize("bsz", [1, 3])
def test_kernel_results_do_not_depend_on_thread_count(kernel_backend, bsz):
    """csrc/README.md: fixed summation order, so 1 or 2 threads give bit-identical results."""
    n, c = 197, 384
    x, metric, size = gen(bsz, n, c, seed=27), gen(bsz, n, D, seed=28), gen_size(bsz, n, seed=29)
    g = gen(bsz, 99, c, seed=30)

    def run():
        xl, ml, sl = leaf(x), leaf(metric), leaf(size)
        out, out_size, tmap = fk.fpet_merge(xl, ml, sl, True, backend=kernel_backend, return_token_map=True)
        ((out * g).sum() + out_size.sum()).backward()
        return out, out_size, tmap, xl.grad, ml.grad, sl.grad

    assert_thread_invariant(run)
