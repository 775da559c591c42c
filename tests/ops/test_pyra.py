"""PYRA modulated merge (pyra_merge): every backend against the reference and float64, b = 0 equals
plain ToMe, r capping, float64 gradcheck in every differentiable input, determinism, edge cases."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import fpet_kernels as fk
from helpers import assert_thread_invariant, forward_cases, DTYPE_TOLS, HALF_DTYPES, assert_close, assert_half_criterion, gen, gen_size, leaf, r_value

B = 2
D = 64
SHAPES = [
    pytest.param(197, 768, id="N197-C768"),
    pytest.param(577, 384, id="N577-C384"),
    pytest.param(50, 64, id="N50-C64"),
    pytest.param(51, 64, id="N51-C64"),
    pytest.param(65, 384, id="N65-C384"),
]
R_KINDS = ["0", "1", "16", "cap", "over"]
FLAGS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="cls"),
         pytest.param(True, True, id="cls+dist")]


def params(r, c, dtype=torch.float32, seed=0, b_scale=0.1):
    """PYRA's learned tensors: a [r, 1], b [1, C], LayerNorm weight and bias [C]."""
    a = gen(r, 1, dtype=dtype, seed=seed)
    b = b_scale * gen(1, c, dtype=dtype, seed=seed + 1)
    lw = 1 + 0.2 * gen(c, dtype=dtype, seed=seed + 2)
    lb = 0.1 * gen(c, dtype=dtype, seed=seed + 3)
    return a, b, lw, lb


def _data(n, c, dtype=torch.float32, seed=0):
    return (gen(B, n, c, dtype=dtype, seed=seed), gen(B, n, D, dtype=dtype, seed=seed + 1),
            gen_size(B, n, seed=seed + 2))


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("n,c,r_kind,cls,dist,dtype,atol,rtol", forward_cases(SHAPES, R_KINDS, FLAGS))
def test_pyra_merge_matches_reference(backend, n, c, r_kind, cls, dist, dtype, atol, rtol):
    x, metric, size = _data(n, c, dtype, seed=n)
    size = size if n % 2 else None
    r_req, r = r_value(r_kind, n, cls, dist)
    a, b, lw, lb = params(r_req, c, dtype, seed=r_req)
    out, out_size, m = fk.pyra_merge(x, metric, r_req, a, b, lw, lb, size, cls, dist, backend=backend,
                                     return_matching=True)
    ref_out, ref_size = fk.reference.pyra_merge(x, metric, r_req, a, b, lw, lb, size, cls, dist)
    assert out.shape == (B, n - r, c) and out.dtype == dtype
    assert out_size.shape == (B, n - r, 1) and out_size.dtype == torch.float32
    ref_m = fk.reference.tome_match(metric, r_req, cls, dist)
    for name, g, e in zip(fk.Matching._fields, m, ref_m):
        assert torch.equal(g, e), name
    assert torch.equal(out_size, ref_size)
    assert_close(out, ref_out, atol, rtol, "out")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,c,r,cls", [(197, 768, 16, True), (577, 384, 100, True)])
def test_pyra_half_precision_criterion(backend, dtype, n, c, r, cls):
    x, metric, size = _data(n, c, dtype, seed=3)
    a, b, lw, lb = params(r, c, dtype, seed=4, b_scale=0.5)
    out, out_size = fk.pyra_merge(x, metric, r, a, b, lw, lb, size, cls, backend=backend)
    ref_out, _ = fk.reference.pyra_merge(x, metric, r, a, b, lw, lb, size, cls)
    # float64 truth on the same matching (the half metric is matched in float32 by both)
    truth, truth_size = fk.reference.pyra_merge(x.double(), metric, r, *(t.double() for t in (a, b, lw, lb)),
                                                size.double(), cls)
    assert_half_criterion(out, ref_out, truth, dtype, "pyra_merge")
    assert torch.equal(out_size.double(), truth_size)


@pytest.mark.parametrize("cls,dist", FLAGS)
@pytest.mark.parametrize("n,c", SHAPES[:3])
def test_b_zero_equals_tome(backend, n, c, cls, dist):
    """b = 0 (PYRA's initial value) gives wt = 0: the result is plain ToMe (spec 3)."""
    x, metric, size = _data(n, c, seed=5)
    a, b, lw, lb = params(16, c, seed=6)
    out, out_size = fk.pyra_merge(x, metric, 16, a, torch.zeros_like(b), lw, lb, size, cls, dist, backend=backend)
    t_out, t_size, _ = fk.tome_merge(x, metric, 16, size, cls, dist, backend=backend)
    torch.testing.assert_close(out, t_out, atol=1e-6, rtol=1e-6)
    assert torch.equal(out_size, t_size)
    # and b != 0 does modulate
    out_b, _ = fk.pyra_merge(x, metric, 16, a, b, lw, lb, size, cls, dist, backend=backend)
    assert (out_b - t_out).abs().max() > 1e-3


def test_r_capped_uses_first_rows_of_a(backend):
    """r above the cap: the first (highest-ranked) rows of a are used; the others get no gradient."""
    n, c = 21, 16
    x, metric, size = _data(n, c, seed=7)
    cap = (n - 1) // 2
    a, b, lw, lb = params(cap + 5, c, seed=8)
    out, out_size = fk.pyra_merge(x, metric, cap + 5, a, b, lw, lb, size, True, backend=backend)
    exp, exp_size = fk.pyra_merge(x, metric, cap, a[:cap], b, lw, lb, size, True, backend=backend)
    assert torch.equal(out, exp) and torch.equal(out_size, exp_size)
    al = leaf(a)
    fk.pyra_merge(x, metric, cap + 5, al, b, lw, lb, size, True, backend=backend)[0].sum().backward()
    assert torch.equal(al.grad[cap:], torch.zeros(5, 1)) and al.grad[:cap].abs().max() > 0


# ----------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("n,r,cls,dist,fast", [
    pytest.param(9, 3, True, False, False, id="N9-r3-cls-full"),
    pytest.param(13, 4, False, False, True, id="N13-r4-plain"),
    pytest.param(13, 4, True, True, True, id="N13-r4-cls+dist"),
    pytest.param(12, 6, False, False, True, id="N12-r6-plain-all-merged"),
    pytest.param(12, 5, True, False, True, id="N12-r5-cls-cap"),
    pytest.param(9, 1, False, True, True, id="N9-r1-dist"),
])
def test_pyra_gradcheck(n, r, cls, dist, fast):
    """float64 gradcheck in x, a, b, ln_weight, ln_bias and size (reference backend); the full
    Jacobian for one case, gradcheck's fast mode (random projections) for the others."""
    c = 4
    x = gen(B, n, c, dtype=torch.float64, seed=9).requires_grad_()
    metric = gen(B, n, 4, dtype=torch.float64, seed=10)
    size = (1 + gen(B, n, 1, dtype=torch.float64, seed=11, low=0, high=3)).requires_grad_()
    a, b, lw, lb = (t.requires_grad_() for t in params(r, c, torch.float64, seed=12, b_scale=0.7))

    def f(x, a, b, lw, lb, s):
        return fk.pyra_merge(x, metric, r, a, b, lw, lb, s, cls, dist, backend="reference")

    assert gradcheck(f, (x, a, b, lw, lb, size), fast_mode=fast)
    assert gradcheck(lambda x, a, b: fk.pyra_merge(x, metric, r, a, b, lw, lb, None, cls, dist,
                                                   backend="reference")[0], (x, a, b), fast_mode=True)


def test_pyra_gradient_equals_autograd_of_reference():
    """The registered closed-form backward equals autograd through fk.reference's PyTorch ops."""
    n, c, r = 197, 64, 16
    x, metric, size = (t.double() for t in _data(n, c, seed=13))
    ps = params(r, c, torch.float64, seed=14, b_scale=0.5)
    g = gen(B, n - r, c, dtype=torch.float64, seed=15)
    res = []
    for fn in (lambda *t: fk.pyra_merge(*t, backend="reference"), fk.reference.pyra_merge):
        ins = [leaf(t) for t in (x, *ps, size)]
        xl, al, bl, wl, bbl, sl = ins
        out, out_size = fn(xl, metric, r, al, bl, wl, bbl, sl, True)
        ((out * g).sum() + out_size.pow(2).sum()).backward()
        res.append([t.grad for t in ins])
    for name, u, v in zip(("x", "a", "b", "ln_weight", "ln_bias", "size"), *res):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("cls,dist", FLAGS)
def test_kernel_gradients_equal_reference(kernel_backend, cls, dist):
    n, c, r = 197, 384, 16
    x, metric, size = _data(n, c, seed=16)
    ps = params(r, c, seed=17, b_scale=0.5)
    g = gen(B, n - r, c, seed=18)
    res = []
    for be in (kernel_backend, "reference"):
        ins = [leaf(t) for t in (x, *ps, size)]
        xl, al, bl, wl, bbl, sl = ins
        out, out_size = fk.pyra_merge(xl, metric, r, al, bl, wl, bbl, sl, cls, dist, backend=be)
        ((out * g).sum() + out_size.sum()).backward()
        res.append([t.grad for t in ins])
    for name, u, v in zip(("x", "a", "b", "ln_weight", "ln_bias", "size"), *res):
        torch.testing.assert_close(u, v, atol=1e-5 * max(v.abs().max().item(), 1), rtol=1e-4,
                                   msg=lambda m: f"grad {name}: {m}")


# ----------------------------------------------------------------------------------- determinism & edges
def test_determinism(backend):
    n, c, r = 197, 384, 40
    x, metric, size = _data(n, c, seed=19)
    ps = params(r, c, seed=20, b_scale=0.5)
    g = gen(B, n - r, c, seed=21)

    def run():
        ins = [leaf(t) for t in (x, *ps, size)]
        out, out_size = fk.pyra_merge(ins[0], metric, r, *ins[1:5], ins[5], True, backend=backend)
        ((out * g).sum() + out_size.sum()).backward()
        return [out, out_size] + [t.grad for t in ins]

    for u, v in zip(run(), run()):
        assert torch.equal(u, v)


def test_batch_of_one(backend):
    n, c = 197, 64
    x, metric, size = _data(n, c, seed=22)
    ps = params(16, c, seed=23)
    o1, s1 = fk.pyra_merge(x[:1], metric[:1], 16, *ps, size[:1], True, backend=backend)
    o2, s2 = fk.pyra_merge(x, metric, 16, *ps, size, True, backend=backend)
    torch.testing.assert_close(o1, o2[:1], atol=1e-6, rtol=1e-6)
    assert torch.equal(s1, s2[:1])
    o1, _ = fk.pyra_merge(x[:1], metric[:1], 16, *ps, None, False, backend=backend)
    o2, _ = fk.pyra_merge(x, metric, 16, *ps, None, False, backend=backend)
    torch.testing.assert_close(o1, o2[:1], atol=1e-6, rtol=1e-6)


def test_r0_with_size(backend):
    """r == 0 is the identity on x and returns the sizes (as float32)."""
    x, metric, size = _data(51, 64, seed=24)
    ps = params(0, 64, seed=25)
    out, out_size = fk.pyra_merge(x, metric, 0, *ps, size, True, backend=backend)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)
    assert torch.equal(out_size, size)


def test_empty_batch(backend):
    n, c = 197, 64
    x, metric, size = torch.zeros(0, n, c), torch.zeros(0, n, D), torch.ones(0, n, 1)
    ps = params(16, c, seed=26)
    out, out_size = fk.pyra_merge(x, metric, 16, *ps, size, True, backend=backend)
    assert out.shape == (0, n - 16, c) and out_size.shape == (0, n - 16, 1)
    al = leaf(ps[0])
    xl = leaf(x)
    fk.pyra_merge(xl, metric, 16, al, *ps[1:], None, True, backend=backend)[0].sum().backward()
    assert xl.grad.shape == x.shape and torch.equal(al.grad, torch.zeros(16, 1))


def test_non_contiguous_inputs(backend):
    n, c = 197, 64
    x_t = gen(n, B, c, seed=27).transpose(0, 1)
    m_t = gen(B, D, n, seed=28).transpose(1, 2)
    s_t = gen_size(B, 2 * n, seed=29).view(B, n, 2)[..., :1]
    a, b, lw, lb = params(16, c, seed=30)
    a_t = torch.stack([a, a], -1)[..., 0]  # [16, 1] view with strides (2, 1)
    b_t = gen(c, 1, seed=31).t()  # [1, C] transposed view
    lw_t = torch.stack([lw, lw], -1)[:, 0]  # stride 2
    got = fk.pyra_merge(x_t, m_t, 16, a_t, b_t, lw_t, lb, s_t, True, backend=backend)
    exp = fk.pyra_merge(x_t.contiguous(), m_t.contiguous(), 16, a_t.contiguous(), b_t.contiguous(),
                        lw_t.contiguous(), lb, s_t.contiguous(), True, backend=backend)
    for u, v in zip(got, exp):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-6)


def test_zero_norm_metric_rows(backend):
    n, c = 197, 64
    x, metric, size = _data(n, c, seed=32)
    metric[:, 0] = 0
    metric[:, 10:50] = 0
    ps = [leaf(t) for t in params(40, c, seed=33, b_scale=0.5)]
    xl = leaf(x)
    out, out_size = fk.pyra_merge(xl, metric, 40, *ps, size, True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(out_size).all()
    out.sum().backward()
    assert torch.isfinite(xl.grad).all() and all(torch.isfinite(p.grad).all() for p in ps)


@pytest.mark.parametrize("bsz", [1, 3])
def test_kernel_results_do_not_depend_on_thread_count(kernel_backend, bsz):
    """csrc/README.md: fixed summation order, so 1 or 2 threads give bit-identical results."""
    n, c, r = 197, 384, 40
    x, metric, size = gen(bsz, n, c, seed=34), gen(bsz, n, D, seed=35), gen_size(bsz, n, seed=36)
    ps = params(r, c, seed=37, b_scale=0.5)
    g = gen(bsz, n - r, c, seed=38)

    def run():
        ins = [leaf(t) for t in (x, *ps, size)]
        out, out_size = fk.pyra_merge(ins[0], metric, r, *ins[1:5], ins[5], True, backend=kernel_backend)
        ((out * g).sum() + out_size.sum()).backward()
        return [out, out_size] + [t.grad for t in ins]

    assert_thread_invariant(run)
