"""ToMe ops (tome_match, tome_merge, merge_wavg, unmerge, merge_sum, compose_token_map, merge_source,
parse_r) at ViT shapes: every backend against the reference, gradients, determinism, edge cases."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import fpet_kernels as fk
import spec_oracle as so
from helpers import (assert_thread_invariant, forward_cases, DTYPE_TOLS, HALF_DTYPES, TOKEN_FLAGS, assert_close, assert_half_criterion, gen, gen_size,
                     leaf, r_value, wavg_by_map)

SHAPES = [  # (N, C): ViT-B/16 at 224, ViT-S/16 at 384, ViT-Ti-ish 7x7 + cls, and odd counts
    pytest.param(197, 768, id="N197-C768"),
    pytest.param(577, 384, id="N577-C384"),
    pytest.param(50, 64, id="N50-C64"),
    pytest.param(51, 64, id="N51-C64"),
    pytest.param(65, 384, id="N65-C384"),
]
R_KINDS = ["0", "1", "16", "cap", "over"]
D = 64  # metric width (head dim)
B = 2


def _data(n, c, dtype=torch.float32, seed=0, with_size=True, metric_dtype=None):
    x = gen(B, n, c, dtype=dtype, seed=seed)
    metric = gen(B, n, D, dtype=metric_dtype or dtype, seed=seed + 1)
    size = gen_size(B, n, seed=seed + 2) if with_size else None
    return x, metric, size


def _assert_matching_equal(got, exp, what=""):
    for name, g, e in zip(fk.Matching._fields, got, exp):
        assert g.dtype == torch.int64, f"{what} {name} dtype {g.dtype}"
        assert torch.equal(g, e), f"{what} {name} differs"


# ----------------------------------------------------------------------------------- forward vs reference


@pytest.mark.parametrize("n,c,r_kind,cls,dist,dtype,atol,rtol", forward_cases(SHAPES, R_KINDS, TOKEN_FLAGS))
def test_tome_merge_matches_reference(backend, n, c, r_kind, cls, dist, dtype, atol, rtol):
    x, metric, size = _data(n, c, dtype, seed=n + c, with_size=(n % 2 == 1))
    r_req, r = r_value(r_kind, n, cls, dist)
    out, out_size, m = fk.tome_merge(x, metric, r_req, size, cls, dist, backend=backend)
    ref_out, ref_size, ref_m = fk.reference.tome_merge(x, metric, r_req, size, cls, dist)
    assert out.shape == (B, n - r, c) and out.dtype == dtype
    assert out_size.shape == (B, n - r, 1) and out_size.dtype == torch.float32
    assert m.src_idx.shape == (B, r) and m.unm_idx.shape == (B, (n + 1) // 2 - r) and m.token_map.shape == (B, n)
    _assert_matching_equal(m, ref_m, "tome_merge")
    assert torch.equal(out_size, ref_size)  # sums of small integers: exact
    assert_close(out, ref_out, atol, rtol, "out")
    _assert_matching_equal(fk.tome_match(metric, r_req, cls, dist, backend=backend), ref_m, "tome_match")


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS[:3])
@pytest.mark.parametrize("n,c", SHAPES[:3])
def test_tome_merge_mixed_dtypes(backend, n, c, cls, dist):
    """metric may have another dtype than x (spec section 5); size may be half."""
    for xd, md, sd in ((torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float16, torch.bfloat16),
                       (torch.float16, torch.bfloat16, torch.float16)):
        x, metric, _ = _data(n, c, xd, seed=3, metric_dtype=md)
        size = gen_size(B, n, sd)
        out, out_size, m = fk.tome_merge(x, metric, 16, size, cls, dist, backend=backend)
        ref_out, ref_size, ref_m = fk.reference.tome_merge(x, metric, 16, size, cls, dist)
        assert out.dtype == xd and out_size.dtype == torch.float32
        _assert_matching_equal(m, ref_m)
        assert torch.equal(out_size, ref_size)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xd]
        assert_close(out, ref_out, tol, tol, f"{xd}/{md}/{sd}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,c,r,cls", [(197, 768, 16, True), (577, 1024, 288, True), (50, 384, 25, False)])
def test_tome_merge_half_precision_criterion(backend, dtype, n, c, r, cls):
    x, metric, _ = _data(n, c, dtype, seed=9)
    size = gen_size(B, n, torch.float32)
    out, out_size, m = fk.tome_merge(x, metric, r, size, cls, backend=backend)
    ref_out, ref_size, ref_m = fk.reference.tome_merge(x, metric, r, size, cls)
    _assert_matching_equal(m, ref_m)
    truth, truth_size = wavg_by_map(x, size, m.token_map, out.shape[1])
    assert_half_criterion(out, ref_out, truth, dtype, "tome_merge")
    assert torch.equal(out_size.double(), truth_size)


def test_sizes_accumulate_in_float32(backend):
    """bf16 cannot count past 256; merged sizes are float32 whatever x's dtype (spec 1.9)."""
    n = 577
    x, metric, _ = _data(n, 64, torch.bfloat16, seed=4)
    size = torch.randint(100, 300, (B, n, 1)).float()
    for _ in range(1):
        out, out_size, m = fk.tome_merge(x, metric, 288, size, True, backend=backend)
        assert out_size.dtype == torch.float32
        _, truth_size = wavg_by_map(x, size, m.token_map, n - 288)
        assert out_size.max() > 256
        assert torch.equal(out_size.double(), truth_size)
        merge, _ = fk.bipartite_soft_matching(metric, 288, True, backend=backend)
        _, s2 = fk.merge_wavg(merge, x, size)
        assert s2.dtype == torch.float32 and torch.equal(s2, out_size)


def test_float64_is_computed_in_float64():
    x, metric, size = _data(65, 32, torch.float64, seed=5)
    out, out_size, _ = fk.tome_merge(x, metric, 16, size, True, backend="reference")
    assert out.dtype == torch.float64 and out_size.dtype == torch.float64
    ref_out, ref_size, m = fk.reference.tome_merge(x, metric, 16, size, True)
    truth, truth_size = wavg_by_map(x, size, m.token_map, 65 - 16)
    torch.testing.assert_close(out, truth, atol=1e-13, rtol=1e-13)


# ----------------------------------------------------------------------------------- closures & merge_wavg
@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n,c", SHAPES[:3])
def test_merge_wavg_closure_equals_fused(backend, n, c, cls, dist):
    x, metric, size = _data(n, c, seed=6)
    merge, unmerge = fk.bipartite_soft_matching(metric, 16, cls, dist, backend=backend)
    fused_out, fused_size, m = fk.tome_merge(x, metric, 16, size, cls, dist, backend=backend)
    _assert_matching_equal(merge.matching, m)
    out, out_size = fk.merge_wavg(merge, x, size)
    torch.testing.assert_close(out, fused_out, atol=1e-6, rtol=1e-6)
    assert torch.equal(out_size, fused_size)
    # any other callable goes through the generic formula merge(x*s, "sum") / merge(s, "sum")
    generic = lambda t, mode="mean": merge(t, mode=mode)  # noqa: E731
    g_out, g_size = fk.merge_wavg(generic, x, size)
    torch.testing.assert_close(g_out, fused_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_size, fused_size, atol=0, rtol=0)
    # gradients of x agree too
    xs = [leaf(x) for _ in range(3)]
    g = gen(*fused_out.shape, seed=7)
    fk.tome_merge(xs[0], metric, 16, size, cls, dist, backend=backend)[0].backward(g)
    fk.merge_wavg(merge, xs[1], size)[0].backward(g)
    fk.merge_wavg(generic, xs[2], size)[0].backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xs[2].grad, xs[0].grad, atol=1e-6, rtol=1e-6)


def test_merge_wavg_without_size_and_r0(backend):
    x, metric, _ = _data(197, 64, seed=8)
    for r in (0, 16):
        merge, unmerge = fk.bipartite_soft_matching(metric, r, True, backend=backend)
        out, size = fk.merge_wavg(merge, x)
        ref_out, ref_size, _ = fk.reference.tome_merge(x, metric, r, None, True)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
        assert size.dtype == torch.float32 and torch.equal(size, ref_size)
    merge, unmerge = fk.bipartite_soft_matching(metric, 0, True, backend=backend)
    assert torch.equal(merge(x), x) and torch.equal(unmerge(x), x)  # spec 1.1: r <= 0 is the identity


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
def test_merge_modes_at_vit_shape(backend, cls, dist):
    """sum / mean / amax of the closure against an explicit per-destination computation."""
    n, c = 197, 48
    x, metric, _ = _data(n, c, seed=10)
    merge, _ = fk.bipartite_soft_matching(metric, 40, cls, dist, backend=backend)
    m = merge.matching
    outs = {mode: merge(x, mode=mode) for mode in ("sum", "mean", "amax")}
    n_out = n - 40
    for b in range(B):
        groups = [[] for _ in range(n_out)]
        for pos in range(n):
            groups[m.token_map[b, pos]].append(pos)
        for row, members in enumerate(groups):
            rows = x[b, members]
            torch.testing.assert_close(outs["sum"][b, row], rows.sum(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(outs["mean"][b, row], rows.mean(0), atol=1e-5, rtol=1e-5)
            assert torch.equal(outs["amax"][b, row], rows.amax(0))


# ----------------------------------------------------------------------------------- unmerge & source tracking
@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n,c", SHAPES)
def test_unmerge_puts_merged_rows_back(backend, n, c, cls, dist):
    """Spec 1.8: odd positions get their B rows, unmerged A positions their rows, sources a copy of
    the row of the B token they merged into."""
    x, metric, size = _data(n, c, seed=11, with_size=False)
    r_req, r = r_value("16", n, cls, dist)
    y, _, m = fk.tome_merge(x, metric, r_req, size, cls, dist, backend=backend)
    full = fk.unmerge(y, m, backend=backend)
    assert full.shape == x.shape and full.dtype == x.dtype
    na, nb = (n + 1) // 2, n // 2
    layout = {lab: row for row, lab in enumerate(so.tome_layout(na, nb, r, dist))}
    for b in range(B):
        for j in range(nb):
            assert torch.equal(full[b, 2 * j + 1], y[b, layout[("b", j)]])
        for k, i in enumerate(m.unm_idx[b].tolist()):
            assert torch.equal(full[b, 2 * i], y[b, layout[("u", k)]])
            assert torch.equal(full[b, 2 * i], x[b, 2 * i])  # an unmerged token is untouched
        for k, i in enumerate(m.src_idx[b].tolist()):
            assert torch.equal(full[b, 2 * i], y[b, layout[("b", m.dst_idx[b, k].item())]])
    # the closure's unmerge and a bare token map give the same
    _, unmerge = fk.bipartite_soft_matching(metric, r_req, cls, dist, backend=backend)
    assert torch.equal(unmerge(y), full)
    assert torch.equal(fk.unmerge(y, m.token_map, backend=backend), full)


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS[:3])
def test_compose_token_map_equals_dense_source(backend, cls, dist):
    """compose_token_map over 3 successive merges equals the argmax over the dense merge_source rows,
    and unmerging with the composed map gives every original token the row that holds it."""
    n = 197
    x = gen(B, n, 32, seed=12)
    cur, tmap, source, size = x, None, None, None
    for step, r in enumerate((16, 30, 8)):
        metric = gen(B, cur.shape[1], 16, seed=100 + step)
        merge, _ = fk.bipartite_soft_matching(metric, r, cls, dist, backend=backend)
        source = fk.merge_source(merge, cur, source)
        tmap = fk.compose_token_map(tmap, merge.matching)
        cur, size = fk.merge_wavg(merge, cur, size)
    n_out = n - 16 - 30 - 8
    assert source.shape == (B, n_out, n) and tmap.shape == (B, n)
    assert torch.equal(source.sum(1), torch.ones(B, n))  # every original token is held by exactly one row
    assert torch.equal(source.argmax(1), tmap)
    assert torch.equal(size.squeeze(-1), source.sum(-1))  # sizes count the original tokens held
    assert torch.equal(fk.unmerge(cur, tmap, backend=backend), cur.gather(1, tmap[..., None].expand(B, n, 32)))
    # the size-weighted merges compose: each final row is the mean of the original tokens it holds
    truth, _ = wavg_by_map(x, None, tmap, n_out)
    torch.testing.assert_close(cur, truth.float(), atol=1e-5, rtol=1e-5)


def test_compose_token_map_keeps_dropped_tokens():
    """A map entry -1 (a token FPET dropped) stays -1 through later merges."""
    prev = torch.tensor([[0, -1, 1, 2, -1, 3]])
    step = torch.tensor([[1, 0, 1, 2]])
    assert fk.compose_token_map(prev, step).tolist() == [[1, -1, 0, 1, -1, 2]]
    assert torch.equal(fk.compose_token_map(None, step), step)


# ----------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("n,r,cls,dist,fast", [
    pytest.param(13, 4, True, False, False, id="N13-r4-cls-full"),
    pytest.param(13, 4, True, True, True, id="N13-r4-cls+dist"),
    pytest.param(13, 6, False, True, True, id="N13-r6-dist-cap"),
    pytest.param(16, 8, False, False, True, id="N16-r8-plain-all-merged"),
    pytest.param(16, 3, False, False, True, id="N16-r3-plain"),
    pytest.param(9, 1, True, False, True, id="N9-r1-cls"),
])
def test_tome_merge_gradcheck(n, r, cls, dist, fast):
    """float64 gradcheck in x and size (full Jacobian for one case, fast mode for the others)."""
    x = gen(B, n, 5, dtype=torch.float64, seed=13).requires_grad_()
    metric = gen(B, n, 4, dtype=torch.float64, seed=14)
    size = (1 + gen(B, n, 1, dtype=torch.float64, seed=15, low=0, high=3)).requires_grad_()
    f = lambda x, s: fk.tome_merge(x, metric, r, s, cls, dist, backend="reference")[:2]  # noqa: E731
    assert gradcheck(f, (x, size), fast_mode=fast)
    assert gradcheck(lambda x: fk.tome_merge(x, metric, r, None, cls, dist, backend="reference")[0], (x,),
                     fast_mode=True)


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS[:3])
def test_merge_wavg_unmerge_merge_sum_gradcheck(cls, dist):
    n, r = 15, 5
    x = gen(B, n, 6, dtype=torch.float64, seed=16).requires_grad_()
    metric = gen(B, n, 4, dtype=torch.float64, seed=17)
    size = (1 + gen(B, n, 1, dtype=torch.float64, seed=18, low=0, high=3)).requires_grad_()
    merge, unmerge = fk.bipartite_soft_matching(metric, r, cls, dist, backend="reference")
    assert gradcheck(lambda x, s: fk.merge_wavg(merge, x, s), (x, size))
    y = gen(B, n - r, 6, dtype=torch.float64, seed=19).requires_grad_()
    assert gradcheck(lambda y: fk.unmerge(y, merge.matching, backend="reference"), (y,))
    tmap = merge.matching.token_map
    assert gradcheck(lambda x: fk.reference.merge_sum(x, tmap, n - r), (x,))
    # a map with dropped tokens (-1) and an output row nobody maps to
    tmap2 = torch.tensor([[0, 1, -1, 1, 2, 0, -1, 3, 3, 0, 1, 2, -1, 3, 0]] * B)
    assert gradcheck(lambda x, s: fk.reference.merge_wavg_reference(x, s, tmap2, 5), (x, size))
    assert gradcheck(lambda y: fk.reference.unmerge(y, tmap2), (y[:, :5].detach().requires_grad_(),))


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n,c", SHAPES[:3])
def test_kernel_gradients_equal_reference(kernel_backend, n, c, cls, dist):
    x, metric, size = _data(n, c, seed=20)
    g = gen(B, n - 16, c, seed=21)
    gs = gen(B, n - 16, 1, seed=22)
    grads = []
    for be in (kernel_backend, "reference"):
        xl, sl = leaf(x), leaf(size)
        out, out_size, _ = fk.tome_merge(xl, metric, 16, sl, cls, dist, backend=be)
        ((out * g).sum() + (out_size * gs).sum()).backward()
        y = leaf(out.detach())
        merge, _ = fk.bipartite_soft_matching(metric, 16, cls, dist, backend=be)
        fk.unmerge(y, merge.matching, backend=be).pow(2).sum().backward()
        grads.append((xl.grad, sl.grad, y.grad))
    for name, k, r in zip(("x", "size", "y (unmerge)"), *grads):
        torch.testing.assert_close(k, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


# ----------------------------------------------------------------------------------- determinism
def test_determinism(backend):
    """Two calls give bit-identical results, forward and backward (spec section 5)."""
    n, c = 197, 384
    x = gen(3, n, c, seed=23)
    metric = gen(3, n, D, seed=24)
    size = gen_size(3, n, seed=25)
    g = gen(3, n - 40, c, seed=26)

    def run():
        xl, sl = leaf(x), leaf(size)
        out, out_size, m = fk.tome_merge(xl, metric, 40, sl, True, backend=backend)
        ((out * g).sum() + out_size.sum()).backward()
        merge, _ = fk.bipartite_soft_matching(metric, 40, True, backend=backend)
        x2 = leaf(x)
        w_out, w_size = fk.merge_wavg(merge, x2, size)
        (w_out * g).sum().backward()
        y = leaf(out.detach())
        full = fk.unmerge(y, m, backend=backend)
        full.pow(2).sum().backward()
        return (out, out_size, *m, xl.grad, sl.grad, w_out, w_size, x2.grad, full, y.grad,
                *fk.tome_match(metric, 40, True, backend=backend))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- edge cases
def test_batch_of_one(backend):
    """B == 1 (inference): every op runs and agrees with the same image inside a batch."""
    x, metric, size = _data(197, 64, seed=27)
    for cls, dist in ((False, False), (True, False), (True, True)):
        out1, s1, m1 = fk.tome_merge(x[:1], metric[:1], 16, size[:1], cls, dist, backend=backend)
        out2, s2, m2 = fk.tome_merge(x, metric, 16, size, cls, dist, backend=backend)
        torch.testing.assert_close(out1, out2[:1], atol=1e-6, rtol=1e-6)
        assert torch.equal(s1, s2[:1])
        _assert_matching_equal(m1, [t[:1] for t in m2])
        _assert_matching_equal(fk.tome_match(metric[:1], 16, cls, dist, backend=backend), m1)


def test_all_sources_merged_at_cap_even_n(backend):
    """Even N, no protected token, r at the cap: every A token is a source (unm_idx is [B, 0])."""
    x, metric, _ = _data(50, 64, seed=28, with_size=False)
    out, size, m = fk.tome_merge(x, metric, 25, None, backend=backend)
    assert out.shape == (B, 25, 64) and m.unm_idx.shape == (B, 0)
    assert torch.equal(size.sum(1), torch.full((B, 1), 50.0))
    _assert_matching_equal(fk.tome_match(metric, 25, backend=backend), m)


def test_r0_with_size_returns_sizes(backend):
    x, metric, size = _data(51, 64, seed=29)
    out, out_size, m = fk.tome_merge(x, metric, 0, size, True, backend=backend)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)
    assert torch.equal(out_size, size)
    assert torch.equal(m.token_map, torch.arange(51).expand(B, 51))
    assert torch.equal(m.unm_idx, torch.arange(26).expand(B, 26)) and m.src_idx.shape == (B, 0)


def test_empty_batch(backend):
    n, c = 197, 64
    x, metric, size = torch.zeros(0, n, c), torch.zeros(0, n, D), torch.ones(0, n, 1)
    out, out_size, m = fk.tome_merge(x, metric, 16, size, True, backend=backend)
    assert out.shape == (0, n - 16, c) and out_size.shape == (0, n - 16, 1)
    assert m.src_idx.shape == (0, 16) and m.dst_idx.shape == (0, 16) and m.unm_idx.shape == (0, 99 - 16)
    assert m.token_map.shape == (0, n)
    m2 = fk.tome_match(metric, 16, True, backend=backend)
    assert [t.shape for t in m2] == [t.shape for t in m]
    assert fk.unmerge(out, m, backend=backend).shape == (0, n, c)
    merge, unmerge = fk.bipartite_soft_matching(metric, 16, True, backend=backend)
    w_out, w_size = fk.merge_wavg(merge, x)
    assert w_out.shape == (0, n - 16, c) and w_size.shape == (0, n - 16, 1)
    assert merge(x).shape == (0, n - 16, c) and unmerge(merge(x)).shape == (0, n, c)


def test_non_contiguous_inputs(backend):
    n, c = 197, 64
    x_t = gen(n, B, c, seed=30).transpose(0, 1)  # [B, N, C] view, non-contiguous
    m_t = gen(B, D, n, seed=31).transpose(1, 2)
    s_t = gen_size(B, n * 2, seed=32).view(B, n, 2)[..., :1]
    assert not (x_t.is_contiguous() or m_t.is_contiguous() or s_t.is_contiguous())
    out, out_size, m = fk.tome_merge(x_t, m_t, 16, s_t, True, backend=backend)
    ref_out, ref_size, ref_m = fk.tome_merge(x_t.contiguous(), m_t.contiguous(), 16, s_t.contiguous(), True,
                                             backend=backend)
    _assert_matching_equal(m, ref_m)
    assert torch.equal(out, ref_out) and torch.equal(out_size, ref_size)
    y_t = gen(n - 16, B, c, seed=33).transpose(0, 1)
    assert torch.equal(fk.unmerge(y_t, m, backend=backend), fk.unmerge(y_t.contiguous(), m, backend=backend))
    merge, _ = fk.bipartite_soft_matching(metric=m_t, r=16, class_token=True, backend=backend)
    assert torch.equal(fk.merge_wavg(merge, x_t, s_t)[0], fk.merge_wavg(merge, x_t.contiguous(), s_t.contiguous())[0])


def test_zero_norm_metric_rows(backend):
    """Zero metric rows (the class token, some patches) are normalised with an epsilon: no NaN."""
    n, c = 197, 64
    x, metric, size = _data(n, c, seed=34)
    metric[:, 0] = 0
    metric[:, 5:40] = 0
    xl = leaf(x)
    out, out_size, m = fk.tome_merge(xl, metric, 40, size, True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(out_size).all()
    out.sum().backward()
    assert torch.isfinite(xl.grad).all()
    ref_out, _, ref_m = fk.reference.tome_merge(x, metric, 40, size, True)
    _assert_matching_equal(m, ref_m)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- parse_r
def _schedule(r, inflection, layers):
    """Spec: lo = int(r (1 - inflection)), hi = 2r - lo, layer l gets int(lo + (hi - lo) l / (L - 1))."""
    lo = int(r * (1 - inflection))
    hi = 2 * r - lo
    return [int(lo + (hi - lo) * l / (layers - 1)) for l in range(layers)]


def test_parse_r():
    assert fk.parse_r(12, 8) == [8] * 12
    assert fk.parse_r(4, 0) == [0] * 4
    assert fk.parse_r(5, [1, 2]) == [1, 2, 0, 0, 0]
    assert fk.parse_r(3, [4, 5, 6]) == [4, 5, 6]
    assert fk.parse_r(12, (8, 0.0)) == [8] * 12
    assert fk.parse_r(5, (8, 1.0)) == [0, 4, 8, 12, 16]
    assert fk.parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]
    for r, inflect, layers in ((8, 0.5, 12), (13, -0.3, 24), (16, 0.25, 7), (5, 1.0, 12)):
        assert fk.parse_r(layers, (r, inflect)) == _schedule(r, inflect, layers)


@pytest.mark.parametrize("layers,r,exc", [
    (12, -1, ValueError), (12, 2.5, TypeError), (12, "8", TypeError), (3, [1, 2, 3, 4], ValueError),
    (12, [1, -2], ValueError), (12, (8, 1.5), ValueError), (12, (8, -1.01), ValueError), (12, (8,), ValueError),
    (12, (8, 0.5, 1), ValueError), (-1, 8, ValueError), (12, (-8, 0.5), ValueError),
])
def test_parse_r_bad_inputs(layers, r, exc):
    with pytest.raises(exc):
        fk.parse_r(layers, r)


@pytest.mark.parametrize("bsz", [1, 3])
def test_kernel_results_do_not_depend_on_thread_count(kernel_backend, bsz):
    """csrc/README.md: fixed summation order, so 1 or 2 threads give bit-identical results."""
    n, c = 197, 384
    x, metric, size = gen(bsz, n, c, seed=35), gen(bsz, n, D, seed=36), gen_size(bsz, n, seed=37)
    g = gen(bsz, n - 40, c, seed=38)

    def run():
        xl = leaf(x)
        out, out_size, m = fk.tome_merge(xl, metric, 40, size, True, backend=kernel_backend)
        (out * g).sum().backward()
        merge, _ = fk.bipartite_soft_matching(metric, 40, True, backend=kernel_backend)
        w_out, w_size = fk.merge_wavg(merge, x, size)
        y = leaf(out.detach())
        full = fk.unmerge(y, m, backend=kernel_backend)
        full.pow(2).sum().backward()
        return (out, out_size, *m, xl.grad, w_out, w_size, full, y.grad)

    assert_thread_invariant(run)
