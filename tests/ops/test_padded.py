"""Padded batches and threshold merging (issue 21; docs/semantics.md "Padded batches and threshold merging").

The contract is per-sequence equivalence: in a right-padded batch (padding = tokens of size 0) every
sequence's valid outputs (values, sizes, token map, matching indices, gradients) equal those of the same
sequence run alone through the ordinary (unpadded) reference, with its own cap on r; valid rows come
first, padding rows (x = 0, size = 0) after; padding tokens map to -1 and get zero gradients.

``BACKENDS`` lists the backends held to it for every family: the reference; ``TOME_BACKENDS`` those of
ToMe's per-row matching (``torch.ops.fpet.tome_match_rows`` + ``merge_wavg``): the reference, the C++
CPU kernels and Triton (in its interpreter on CPU tensors); its CUDA kernel runs here in the SIMT
emulator (tests/simt_ext.py) against the reference.
``FPET_BACKENDS``: FPET's registered per-row ops (``fpet_merge_rows``, ``fpet_merge_rows_backward``)
run on every backend: the reference, the C++ CPU kernels, Triton (its interpreter on CPU tensors) and
the CUDA kernels' source on the host emulator (``cuda-simt``: ``torch.ops.fpet_simt``, tests/simt_ext.py).
``PYRA_CASES``: PYRA's per-row op ``pyra_merge_rows`` on the reference, the C++ CPU kernel, Triton in the
interpreter and the CUDA kernels' source on the SIMT emulator (also tests/kernels/test_simt_pyra_rows.py).
"""
from __future__ import annotations

import contextlib

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fpet_kernels as fk
from fpet_kernels.ops import library, pyra
from fpet_kernels.ops import fpet as fpet_ops
from fpet_kernels.ops.attention import attention_inputs_reference
from fpet_kernels.ops.shapes import cap_r
from fpet_kernels.ops.tome import (_tome_match_rows_op_reference, merge_wavg_reference, normalize, static_rows,
                                   tome_match_rows_reference, tome_merge_rows_reference, unmerge_reference,
                                   valid_tokens)
from helpers import REQUIRE_EXTENSION, is_live, missing_message

BACKENDS = ["reference"]
DTYPES = [torch.float32, torch.float64]
# ToMe's per-row matching has kernels: a backend not live here is left out, unless CI requires it
# (FPET_REQUIRE_EXTENSION=1: then its tests fail, saying so). Kernels compute float32, float16, bfloat16.
TOME_BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if REQUIRE_EXTENSION or is_live(b)]
TOME_CASES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in TOME_BACKENDS
              for d in (DTYPES if b == "reference" else [torch.float32])]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


FPET_BACKENDS = ["reference", "cpu", "triton", "cuda-simt"]
FPET_KERNEL_BACKENDS = FPET_BACKENDS[1:]


def _fpet_backend(request, name):
    """A backend of FPET's per-row ops, skipped where it is not live (failing under FPET_REQUIRE_EXTENSION=1)."""
    if name == "cuda-simt":
        request.getfixturevalue("simt_ops")  # conftest.py: skips / fails when the emulator cannot be built
    elif name != "reference" and not is_live(name):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message(name)}", pytrace=False)
        pytest.skip(missing_message(name))
    return name


@pytest.fixture(params=FPET_BACKENDS)
def fpet_backend(request):
    return _fpet_backend(request, request.param)


@pytest.fixture(params=FPET_KERNEL_BACKENDS)
def fpet_kernel(request):
    return _fpet_backend(request, request.param)


class _SimtRows(torch.autograd.Function):
    """``fpet_merge_rows`` of the CUDA kernels' source on the host emulator, with its backward op."""

    @staticmethod
    def forward(ctx, x, metric, size, p, h, w):
        out, osz, tmap = torch.ops.fpet_simt.fpet_merge_rows(x, metric, size, p, h, w)
        ctx.args = (p, h, w)
        ctx.save_for_backward(x, metric, size, out, osz, tmap)
        ctx.mark_non_differentiable(tmap)
        return out, osz, tmap

    @staticmethod
    def backward(ctx, go, gs, _):
        x, metric, size, out, osz, tmap = ctx.saved_tensors
        gx, gm, gsz = torch.ops.fpet_simt.fpet_merge_rows_backward(go.contiguous(), gs, x, metric, size, out, osz,
                                                                   tmap, *ctx.args)
        return gx, gm, None if size is None else gsz.to(size.dtype), None, None, None


def _fpet_rows(backend, x, metric, size, p, grid):
    """(x', size', token_map) of a padded batch on ``backend`` (differentiable)."""
    if backend == "cuda-simt":
        return _SimtRows.apply(x, metric, size, p, *grid)
    return fk.fpet_merge(x, metric, size, num_prefix=p, grid=grid, backend=backend, return_token_map=True,
                         padded=True)


def _fpet_dtypes(backend):
    """The float64 reference; the kernels compute float32, float16 and bfloat16 (float32 here)."""
    return DTYPES if backend == "reference" else [torch.float32]




# PYRA's per-row op on every backend that runs on CPU tensors: the kernels compute float32
PYRA_CASES = [pytest.param("reference", torch.float32, id="reference-f32"),
              pytest.param("reference", torch.float64, id="reference-f64"),
              pytest.param("cpu", torch.float32, id="cpu-f32"), pytest.param("triton", torch.float32, id="triton-f32"),
              pytest.param("simt", torch.float32, id="cuda-simt-f32")]
KERNEL_TOL = dict(atol=1e-4, rtol=1e-4)


class _SimtPyraRows(torch.autograd.Function):
    """``torch.ops.fpet_simt.pyra_merge_rows`` (the CUDA kernels' source run on the host by the SIMT
    emulator, tests/simt_ext.py) with its closed-form backward op: what the 'simt' case runs in place of
    the C++ kernel of ``pyra_merge_rows``, so the public ``pyra_merge`` is checked on the CUDA kernels."""

    @staticmethod
    def forward(ctx, x, size, src, dst, tmap, a, b, lw, lb, n_out, eps):
        out, osz = torch.ops.fpet_simt.pyra_merge_rows(x, size, src, dst, tmap, a, b, lw, lb, n_out, eps)
        ctx.save_for_backward(x, size, out, osz, src, dst, tmap, a, b, lw, lb)
        ctx.eps = eps
        return out, osz

    @staticmethod
    def backward(ctx, go, gos):
        x, size, out, osz, src, dst, tmap, a, b, lw, lb = ctx.saved_tensors
        gx, ga, gb, gw, gbias, gs = torch.ops.fpet_simt.pyra_merge_rows_backward(
            go.contiguous(), gos, x, size, out, osz, src, dst, tmap, a, b, lw, lb, ctx.eps)
        return gx, gs if ctx.needs_input_grad[1] else None, None, None, None, ga, gb, gw, gbias, None, None


@contextlib.contextmanager
def _pyra_backend(backend):
    """The backend name to pass to ``pyra_merge``: 'simt' runs the C++ dispatch path ('cpu') with the
    emulated CUDA kernels in place of the CPU kernel (skipped, or failing under FPET_REQUIRE_EXTENSION=1,
    when the emulator cannot be built)."""
    if backend != "simt":
        yield _live(backend)
        return
    import simt_ext
    if not simt_ext.live():
        msg = simt_ext.load() or "torch.ops.fpet_simt has no kernels"
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)
        pytest.skip(msg)
    _live("cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(library.CPP, "pyra_merge_rows", _SimtPyraRows.apply, raising=False)
        yield "cpu"


def _close(got, exp, dtype, what, backend="reference"):
    tol = TOL[dtype] if backend == "reference" else KERNEL_TOL
    torch.testing.assert_close(got, exp, **tol, msg=lambda m: f"{what}: {m}")


def _live(backend):
    """``backend`` runs here: fails under FPET_REQUIRE_EXTENSION=1 when it does not, else skips."""
    if backend != "reference" and not is_live(backend):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message(backend)}", pytrace=False)
        pytest.skip(missing_message(backend))
    return backend


def _batch(seed, lens, n, c, d, dtype):
    """Right-padded batch: row b has lens[b] valid tokens (sizes in [0.5, 3)), then size-0 padding
    whose x and metric are garbage (large values, and a NaN metric) that must not leak anywhere."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(lens)
    x = torch.randn(bsz, n, c, generator=g, dtype=dtype)
    metric = torch.randn(bsz, n, d, generator=g, dtype=dtype)
    size = (torch.rand(bsz, n, 1, generator=g, dtype=dtype) * 2.5 + 0.5).round()  # small integers: exact sums
    for b, k in enumerate(lens):
        size[b, k:] = 0
        x[b, k:] = 1e6
        metric[b, k:] = torch.nan
    return x, metric, size


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grad(t):
    """``t.grad``, zeros where the ordinary op does not use ``t`` (e.g. sizes at r = 0: x itself)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def _valid_prefix(row_len, cls, dist):
    """A row alone can be run by the ordinary op (a distillation token needs two tokens)."""
    return row_len >= (2 if dist else 1)


rows = st.lists(st.integers(0, 23), min_size=1, max_size=4)
flags = st.sampled_from([(False, False), (True, False), (True, True), (False, True)])


# ----------------------------------------------------------------------------- ToMe
@pytest.mark.parametrize("backend,dtype", TOME_CASES)
@SETTINGS
@given(lens=rows, extra=st.integers(0, 4), r=st.integers(0, 14), fl=flags, seed=st.integers(0, 2 ** 16))
def test_tome_merge_per_sequence_equivalence(backend, dtype, lens, extra, r, fl, seed):
    cls, dist = fl
    n = max(lens) + extra
    if n < 2:
        n = 2
    x, metric, size = _batch(seed, lens, n, 6, 5, dtype)
    xl, sl = _leaves(x, size)
    out, osz, m = fk.tome_merge(xl, metric, r, sl, cls, dist, backend=backend, padded=True)
    assert out.shape == (len(lens), n - cap_r(r, n, cls, dist), 6) and isinstance(m, fk.RowMatching)
    g = torch.Generator().manual_seed(seed + 1)
    go, gs = torch.randn(out.shape, generator=g, dtype=dtype), torch.randn(osz.shape, generator=g, dtype=osz.dtype)
    ((out * go).sum() + (osz * gs).sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(xl.grad).all() and torch.isfinite(sl.grad).all()
    for b, k in enumerate(lens):
        assert torch.equal(m.token_map[b, k:], torch.full((n - k,), -1)), "padding maps to -1"
        assert (xl.grad[b, k:] == 0).all() and (sl.grad[b, k:] == 0).all(), "padding gets no gradient"
        if not _valid_prefix(k, cls, dist):
            continue
        xa, sa = _leaves(x[b:b + 1, :k], size[b:b + 1, :k])
        eo, es, em = fk.tome_merge(xa, metric[b:b + 1, :k], r, sa, cls, dist, backend="reference")
        kk = eo.shape[1]
        ((eo * go[b:b + 1, :kk]).sum() + (es * gs[b:b + 1, :kk]).sum()).backward()
        assert int(m.kept[b]) == kk
        _close(out[b, :kk], eo[0], dtype, "x'")
        assert torch.equal(osz[b, :kk], es[0].to(osz.dtype)), "sizes: sums of small integers, exact"
        assert (out[b, kk:] == 0).all() and (osz[b, kk:] == 0).all(), "padding rows hold 0"
        assert torch.equal(m.token_map[b, :k], em.token_map[0])
        rb = em.src_idx.shape[1]
        for got, exp, what in ((m.src_idx, em.src_idx, "src_idx"), (m.dst_idx, em.dst_idx, "dst_idx")):
            assert torch.equal(got[b, :rb], exp[0]) and (got[b, rb:] == -1).all(), what
        u = em.unm_idx.shape[1]
        assert torch.equal(m.unm_idx[b, :u], em.unm_idx[0]) and (m.unm_idx[b, u:] == -1).all(), "unm_idx"
        _close(xl.grad[b, :k], _grad(xa)[0], dtype, "grad x")
        _close(sl.grad[b, :k], _grad(sa)[0], dtype, "grad size")
        assert torch.equal(fk.tome_match(metric[b:b + 1], r, cls, dist, backend=backend, size=size[b:b + 1],
                                         padded=True).token_map[0], m.token_map[b]), "tome_match == tome_merge's"


@pytest.mark.parametrize("backend,dtype", TOME_CASES)
@SETTINGS
@given(lens=rows, r=st.integers(1, 14), fl=flags, seed=st.integers(0, 2 ** 16))
def test_merge_wavg_and_unmerge_along_the_padded_map(backend, dtype, lens, r, fl, seed):
    """The map ops along a padded map: merge_wavg reproduces tome_merge; unmerge gives every valid token
    its row (the row alone's) and padding tokens 0; the adjoint merge_sum drops padding."""
    cls, dist = fl
    n = max(max(lens), 2)
    x, metric, size = _batch(seed, lens, n, 4, 3, dtype)
    out, osz, m = fk.tome_merge(x, metric, r, size, cls, dist, backend=backend, padded=True)
    w_out, w_size = merge_wavg_reference(x, size, m.token_map, out.shape[1])
    _close(w_out, out, dtype, "merge_wavg")
    assert torch.equal(w_size, osz)
    y = torch.randn(out.shape, dtype=dtype)
    back = fk.unmerge(y, m, backend=backend)
    assert torch.equal(back, unmerge_reference(y, m.token_map))
    for b, k in enumerate(lens):
        assert (back[b, k:] == 0).all()
        if _valid_prefix(k, cls, dist):
            em = fk.tome_match(metric[b:b + 1, :k], r, cls, dist, backend="reference")
            kk = int(m.kept[b])
            assert torch.equal(back[b, :k], fk.unmerge(y[b:b + 1, :kk], em, backend="reference")[0])
    # the adjoint: padding (x = 1e6 there) reaches no row
    summed = fk.reference.merge_sum(x, m.token_map, out.shape[1])
    assert torch.equal(summed, fk.reference.merge_sum(torch.where(size > 0, x, 0), m.token_map, out.shape[1]))


# ----------------------------------------------------------------------------- PYRA
@pytest.mark.parametrize("backend,dtype", PYRA_CASES)
@SETTINGS
@given(lens=rows, r=st.integers(0, 10), fl=flags, seed=st.integers(0, 2 ** 16))
def test_pyra_merge_per_sequence_equivalence(backend, dtype, lens, r, fl, seed):
    """Row b modulates its r_b sources with a[:r_b] (rank order), as the row alone does: on every
    backend (the op pyra_merge_rows), against the ordinary reference op run on the row alone; gradients
    of x, size, a, b, ln_weight and ln_bias (the parameters' summed over rows)."""
    with _pyra_backend(backend) as be:
        _pyra_per_sequence(be, backend, dtype, lens, r, fl, seed)


def _pyra_per_sequence(be, backend, dtype, lens, r, fl, seed):
    cls, dist = fl
    n, c = max(max(lens), 2), 6
    x, metric, size = _batch(seed, lens, n, c, 5, dtype)
    g = torch.Generator().manual_seed(seed + 2)
    a = torch.randn(r, 1, generator=g, dtype=dtype)
    bb = torch.randn(1, c, generator=g, dtype=dtype)
    lw, lb = 1 + 0.1 * torch.randn(c, generator=g, dtype=dtype), 0.1 * torch.randn(c, generator=g, dtype=dtype)
    xl, sl, al, bl, wl, bil = _leaves(x, size, a, bb, lw, lb)
    out, osz, m = fk.pyra_merge(xl, metric, r, al, bl, wl, bil, sl, cls, dist, backend=be,
                                return_matching=True, padded=True)
    go = torch.randn(out.shape, generator=g, dtype=dtype)
    (out * go).sum().backward()
    for t in (al, bl, wl, bil):  # no source in the whole batch: a and b take no part (the ordinary op at r = 0 too)
        t.grad = torch.zeros_like(t) if t.grad is None else t.grad
    assert torch.isfinite(xl.grad).all() and torch.isfinite(al.grad).all() and torch.isfinite(bl.grad).all()
    ga, gb, gw, gbias = torch.zeros_like(a), torch.zeros_like(bb), torch.zeros_like(lw), torch.zeros_like(lb)
    for b, k in enumerate(lens):
        assert (xl.grad[b, k:] == 0).all() and (sl.grad[b, k:] == 0).all()
        if not _valid_prefix(k, cls, dist):
            continue
        rb = cap_r(r, k, cls, dist)
        xa, sa, aa, ba, wa, bia = _leaves(x[b:b + 1, :k], size[b:b + 1, :k], a[:rb], bb, lw, lb)
        eo, es = fk.pyra_merge(xa, metric[b:b + 1, :k], rb, aa, ba, wa, bia, sa, cls, dist, backend="reference")
        kk = eo.shape[1]
        (eo * go[b:b + 1, :kk]).sum().backward()
        for t in (aa, ba, wa, bia):
            t.grad = torch.zeros_like(t) if t.grad is None else t.grad
        _close(out[b, :kk], eo[0], dtype, "x'", backend)
        assert torch.equal(osz[b, :kk], es[0].to(osz.dtype)), "sizes: sums of small integers, exact"
        assert (out[b, kk:] == 0).all() and (osz[b, kk:] == 0).all()
        _close(xl.grad[b, :k], _grad(xa)[0], dtype, "grad x", backend)
        _close(sl.grad[b, :k], _grad(sa)[0], dtype, "grad size", backend)
        ga[:rb] += aa.grad
        gb += ba.grad
        gw += wa.grad
        gbias += bia.grad
    _close(al.grad, ga, dtype, "grad a (summed over rows)", backend)
    _close(bl.grad, gb, dtype, "grad b (summed over rows)", backend)
    _close(wl.grad, gw, dtype, "grad ln_weight (summed over rows)", backend)
    _close(bil.grad, gbias, dtype, "grad ln_bias (summed over rows)", backend)


# ----------------------------------------------------------------------------- FPET on sequences
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@settings(SETTINGS, max_examples=8)
@given(lens=st.lists(st.integers(0, 23), min_size=1, max_size=4), cls=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fpet_merge_per_sequence_equivalence(fpet_backend, dtype, lens, cls, seed):
    """FPET on a sequence: grid (1, n - p), A = even grid positions, B = the prefix then the odd ones.
    Rows with at least 4 grid tokens equal the row alone (values, sizes, map, gradients in x, metric
    and size); shorter rows follow the short-row rule (test_fpet_short_rows). Every backend of
    ``fpet_merge_rows`` against the ordinary reference run on the row alone."""
    backend = fpet_backend
    if dtype not in _fpet_dtypes(backend):
        pytest.skip("the kernels compute float32, float16 and bfloat16")
    p = int(cls)
    n = max(max(lens), p + 4)
    x, metric, size = _batch(seed, lens, n, 5, 4, dtype)
    xl, ml, sl = _leaves(x, metric, size)
    out, osz, tmap = _fpet_rows(backend, xl, ml, sl, p, (1, n - p))
    assert out.shape[1] == p + (n - p) // 2
    g = torch.Generator().manual_seed(seed + 3)
    go, gs = torch.randn(out.shape, generator=g, dtype=dtype), torch.randn(osz.shape, generator=g, dtype=osz.dtype)
    ((out * go).sum() + (osz * gs).sum()).backward()
    for t, what in ((out, "x'"), (xl.grad, "grad x"), (ml.grad, "grad metric"), (sl.grad, "grad size")):
        assert torch.isfinite(t).all(), what
    for b, k in enumerate(lens):
        assert (tmap[b, k:] == -1).all()
        for t in (xl.grad, ml.grad, sl.grad):
            assert (t[b, k:] == 0).all()
        if k - p < 4:
            continue
        xa, ma, sa = _leaves(x[b:b + 1, :k], metric[b:b + 1, :k], size[b:b + 1, :k])
        eo, es, et = fk.fpet_merge(xa, ma, sa, class_token=cls, grid=(1, k - p), backend="reference",
                                   return_token_map=True)
        kk = eo.shape[1]
        ((eo * go[b:b + 1, :kk]).sum() + (es * gs[b:b + 1, :kk]).sum()).backward()
        _close(out[b, :kk], eo[0], dtype, "x'")
        assert torch.equal(osz[b, :kk], es[0].to(osz.dtype))
        assert (out[b, kk:] == 0).all() and (osz[b, kk:] == 0).all()
        assert torch.equal(tmap[b, :k], et[0])
        _close(xl.grad[b, :k], _grad(xa)[0], dtype, "grad x")
        _close(ml.grad[b, :k], _grad(ma)[0], dtype, "grad metric")
        _close(sl.grad[b, :k], _grad(sa)[0], dtype, "grad size")


@pytest.mark.parametrize("cls", [False, True])
def test_fpet_short_rows(fpet_backend, cls):
    """Rows too short to merge as a sequence alone (fewer than 4 grid tokens): one valid destination
    cell takes every A token; no destination cell (one grid token) keeps that token as row p; a
    prefix-only or empty row keeps its prefix / nothing. No NaN, no gradient into padding."""
    backend = fpet_backend
    p = int(cls)
    n = p + 8
    lens = [p + 3, p + 2, p + 1, p, 0]
    x, metric, size = _batch(5, lens, n, 4, 3, _fpet_dtypes(backend)[-1])
    x[2, p + 1:] = math.inf  # padding that is never read: the lone token's row stays exact
    xl, ml, sl = _leaves(x, metric, size)
    out, osz, tmap = _fpet_rows(backend, xl, ml, sl, p, (1, n - p))
    (out.sum() + osz.sum()).backward()
    for t in (out, osz, xl.grad, ml.grad, sl.grad):
        assert torch.isfinite(t).all()
    pre = list(range(p))
    assert tmap[0, :p + 3].tolist() == pre + [p, p, p]  # g0, g2 (A) merge into g1 (B), row p
    assert tmap[1, :p + 2].tolist() == pre + [p, p]
    assert tmap[2, :p + 1].tolist() == pre + [p]  # the lone grid token keeps row p
    assert tmap[3, :p].tolist() == pre and (tmap[4] == -1).all()
    sz = size[..., 0]
    assert osz[0, p, 0] == sz[0, p:p + 3].sum() and osz[2, p, 0] == sz[2, p]
    torch.testing.assert_close(out[2, p], x[2, p])
    assert (out[4] == 0).all() and (osz[4] == 0).all()
    for b, k in enumerate(lens):
        assert (osz[b, p + 1:] == 0).all() and (xl.grad[b, k:] == 0).all() and (sl.grad[b, k:] == 0).all()


def _fpet_case(case, dtype=torch.float32):
    """(x, metric, size, p, grid) of a padded batch: sequences (grid (1, W)), a 2-D grid whose rows are
    padded at the end, a batch without padding, a long sequence (several tiles in every kernel)."""
    if case == "seq":
        p, n = 1, 12
        x, metric, size = _batch(11, [12, 9, 5, 3, 2, 1, 0], n, 6, 5, dtype)
        return x, metric, size, p, (1, n - p)
    if case == "seq-p0":
        n = 11
        x, metric, size = _batch(12, [11, 8, 4, 2, 1, 0], n, 5, 3, dtype)
        return x, metric, size, 0, (1, n)
    if case == "grid":
        p, h, w = 1, 4, 5
        x, metric, size = _batch(13, [21, 15, 8, 2], p + h * w, 7, 4, dtype)
        return x, metric, size, p, (h, w)
    if case == "no-padding":
        x, metric, size = _batch(14, [10, 10], 10, 4, 3, dtype)
        return x, metric, size, 0, (1, 10)
    if case == "no-size":
        x, metric, _ = _batch(15, [9, 9], 9, 4, 3, dtype)
        return x, metric, None, 1, (1, 8)
    if case == "long":
        p, n = 1, 151
        x, metric, size = _batch(16, [151, 140, 77, 33, 4], n, 40, 24, dtype)
        return x, metric, size, p, (1, n - p)
    raise ValueError(case)


FPET_CASES = ["seq", "seq-p0", "grid", "no-padding", "no-size", "long"]


def _fpet_run(backend, x, metric, size, p, grid, seed=21):
    """Outputs and gradients (x, metric, size) of one padded call; the upstream gradients are fixed by seed."""
    xl, ml = _leaves(x, metric)
    sl = None if size is None else _leaves(size)[0]
    out, osz, tmap = _fpet_rows(backend, xl, ml, sl, p, grid)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.dtype)
    gs = torch.randn(osz.shape, generator=g).to(osz.dtype)
    ((out.float() * go.float()).sum() + (osz * gs).sum()).backward()
    return out, osz, tmap, _grad(xl), _grad(ml), None if sl is None else _grad(sl)


@pytest.mark.parametrize("case", FPET_CASES)
def test_fpet_rows_kernels_match_the_reference(fpet_kernel, case):
    """Every kernel of fpet_merge_rows / fpet_merge_rows_backward against the reference: token map
    exactly, sizes exactly (sums of small integers), values and gradients in x, metric and size."""
    x, metric, size, p, grid = _fpet_case(case)
    got = _fpet_run(fpet_kernel, x, metric, size, p, grid)
    exp = _fpet_run("reference", x, metric, size, p, grid)
    assert torch.equal(got[2], exp[2]), "token_map"
    assert torch.equal(got[1], exp[1]), "sizes"
    tol = dict(atol=2e-5, rtol=2e-5)
    for what, a, b in zip(("x'", "grad x", "grad metric", "grad size"), got[:1] + got[3:], exp[:1] + exp[3:]):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a, b, **tol, msg=lambda m, w=what: f"{fpet_kernel} {case} {w}: {m}")
    if size is not None:
        valid = valid_tokens(size, x)
        assert (got[2][~valid] == -1).all()
        for g in got[3:]:
            assert (g[~valid] == 0).all(), "padding gets no gradient"


@pytest.mark.parametrize("case", ["seq", "grid", "long"])
def test_fpet_rows_cuda_kernels_under_every_thread_order(simt, case):
    """The CUDA kernels of fpet_merge_rows(_backward) on the emulator in every configuration (thread
    order forwards / reversed, 256 / 64 threads, 1 / 4 multiprocessors): a race or a missing barrier
    shows as a difference; the same values as the default configuration, exactly."""
    x, metric, size, p, grid = _fpet_case(case)
    got = _fpet_run("cuda-simt", x, metric, size, p, grid)
    simt.configure(0, 256, 4)
    exp = _fpet_run("cuda-simt", x, metric, size, p, grid)
    for what, a, b in zip(("x'", "size'", "token_map", "grad x", "grad metric", "grad size"), got, exp):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_fpet_rows_half_inputs(fpet_kernel, dtype):
    """float16 / bfloat16 inputs (as fpet_merge takes them): the reference on the same inputs."""
    x, metric, size, p, grid = _fpet_case("seq", dtype)
    x[size[..., 0] == 0] = 100.0  # 1e6 does not fit float16
    got = _fpet_run(fpet_kernel, x, metric, size, p, grid)
    exp = _fpet_run("reference", x, metric, size, p, grid)
    assert torch.equal(got[2], exp[2]) and torch.equal(got[1], exp[1])
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1.6e-2, rtol=1.6e-2)
    for what, a, b in zip(("x'", "grad x", "grad metric", "grad size"), got[:1] + got[3:], exp[:1] + exp[3:]):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, w=what: f"{w}: {m}")


def test_fpet_rows_non_contiguous_inputs(fpet_kernel):
    """Strided views (x from a transposed buffer, metric a channel slice, size a column view) give the
    values of their contiguous copies."""
    x, metric, size, p, grid = _fpet_case("seq")
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    ms = torch.cat([metric, torch.randn_like(metric)], -1)[..., :metric.shape[-1]]
    ss = torch.cat([size, size], -1)[..., :1]
    assert not (xs.is_contiguous() or ms.is_contiguous() or ss.is_contiguous())
    got = _fpet_run(fpet_kernel, xs, ms, ss, p, grid)
    exp = _fpet_run(fpet_kernel, x, metric, size, p, grid)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)


def _ordinary(backend, x, metric, size, p, grid):
    """The ordinary op (fpet_merge) on the same backend, with gradients."""
    xl, ml = _leaves(x, metric)
    sl = None if size is None else _leaves(size)[0]
    if backend == "cuda-simt":
        out, osz, tmap = torch.ops.fpet_simt.fpet_merge(xl, ml, sl, p, *grid)
        g = torch.Generator().manual_seed(21)
        go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
        gx, gm, gsz = torch.ops.fpet_simt.fpet_merge_backward(go, gs, xl, ml, sl, out, osz, tmap, p, *grid)
        return out, osz, tmap, gx, gm, gsz
    out, osz, tmap = fk.fpet_merge(xl, ml, sl, num_prefix=p, grid=grid, backend=backend, return_token_map=True)
    g = torch.Generator().manual_seed(21)
    go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
    ((out * go).sum() + (osz * gs).sum()).backward()
    return out, osz, tmap, _grad(xl), _grad(ml), None if sl is None else _grad(sl)


@pytest.mark.parametrize("case", ["no-padding", "no-size"])
def test_fpet_rows_without_padding_is_fpet_merge_bit_for_bit(fpet_backend, case):
    """No size-0 token: fpet_merge_rows is fpet_merge on the same backend, bit for bit (the same
    arithmetic in the same order: the padded flag only masks)."""
    x, metric, size, p, grid = _fpet_case(case)
    got = _fpet_run(fpet_backend, x, metric, size, p, grid)
    exp = _ordinary(fpet_backend, x, metric, size, p, grid)
    names = ("x'", "size'", "token_map", "grad x", "grad metric", "grad size")
    for what, a, b in zip(names[:5] if size is None else names, got, exp):  # no size: no size gradient
        assert torch.equal(a, b.to(a.dtype)), what


def _dense_straight_through(x, metric, size, p, h, w):
    """FPET of a padded batch as dense autograd: ``x' = (z_B + M^T z_A) / (s_B + M^T s_A)`` with the
    straight-through ``M = soft + (hard - soft).detach()`` over the masked scores (docs/semantics.md),
    the hard part the reference's token map (short-row rule included)."""
    valid = valid_tokens(size, x)
    tmap = fpet_ops.fpet_token_map(metric, p, h, w, valid)
    # a padding token's metric (NaN in these batches) takes no part: 0 * NaN in the matmul's backward
    # would spread NaN to every valid token's gradient
    metric = torch.where(valid.unsqueeze(-1), metric, 0)
    scores, a_idx, b_idx = fpet_ops._scores(metric, p, h, w, valid)
    v1, i1, v2, i2 = fpet_ops.top2(scores.detach())
    live = fpet_ops.valid_scores(scores.detach())
    clean = torch.where(live, scores, 0)
    t = (torch.where(v1 > -math.inf, clean.gather(-1, i1.unsqueeze(-1))[..., 0], -math.inf)
         + torch.where(v2 > -math.inf, clean.gather(-1, i2.unsqueeze(-1))[..., 0], -math.inf)) / 2
    soft = torch.where(live, torch.sigmoid(clean - t.unsqueeze(-1)), 0)
    match = tmap[:, a_idx]
    hard = torch.zeros_like(soft).scatter(-1, match.clamp_min(0).unsqueeze(-1), 1.0) * (match >= 0).unsqueeze(-1)
    m = soft + (hard - soft).detach()
    s = torch.where(valid, size[..., 0], 0).unsqueeze(-1)
    z = torch.where(valid.unsqueeze(-1), x * s, 0)
    self_b = (tmap[:, b_idx] >= 0).unsqueeze(-1).to(x.dtype)  # a padding B token is not its own row
    num = z[:, b_idx] * self_b + m.transpose(1, 2) @ z[:, a_idx]
    den = s[:, b_idx] * self_b + m.transpose(1, 2) @ s[:, a_idx]
    return num / torch.where(den != 0, den, 1) * (den != 0), den


@pytest.mark.parametrize("case", ["seq", "seq-p0", "grid"])
def test_fpet_rows_backward_reference_is_the_autograd_of_the_straight_through_merge(case):
    """fpet_merge_rows_backward_reference (the closed form the kernels implement) equals plain autograd
    of the dense straight-through formulation of a padded batch, in x, metric and size."""
    x, metric, size, p, (h, w) = _fpet_case(case, torch.float64)
    x = torch.where(valid_tokens(size, x).unsqueeze(-1), x, 0)  # the dense form multiplies padding by 0
    xl, ml, sl = _leaves(x, metric, size)
    out, den = _dense_straight_through(xl, ml, sl, p, h, w)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(den.shape, generator=g, dtype=torch.float64)
    ((out * go).sum() + (den * gs).sum()).backward()
    r_out, r_size, r_map = fpet_ops.fpet_merge_reference(x, metric, size, p, h, w, padded=True)
    _close(r_out, out.detach(), torch.float64, "x'")
    assert torch.equal(r_size, den.detach())
    gx, gm, gsz = fpet_ops.fpet_merge_rows_backward_reference(go, gs, x, metric, size, r_out, r_size, r_map, p, h, w)
    _close(gx, xl.grad, torch.float64, "grad x")
    _close(gm, ml.grad, torch.float64, "grad metric")
    _close(gsz, sl.grad, torch.float64, "grad size")
    assert (gm[~valid_tokens(size, x)] == 0).all()


def _raw_rows(backend):
    """The raw registered ops of one backend: (forward, backward)."""
    if backend == "cuda-simt":
        return torch.ops.fpet_simt.fpet_merge_rows, torch.ops.fpet_simt.fpet_merge_rows_backward
    if backend == "triton":
        return torch.ops.fpet.fpet_merge_rows_triton, torch.ops.fpet.fpet_merge_rows_backward_triton
    return torch.ops.fpet.fpet_merge_rows, torch.ops.fpet.fpet_merge_rows_backward


def test_fpet_rows_bad_arguments_name_them(fpet_kernel):
    """The registered entry points check what they index with (no memory corruption): a grid that
    does not match N, a metric or size of the wrong shape, a token map out of range or of the wrong
    shape in the backward; each error names the argument."""
    fwd, bwd = _raw_rows(fpet_kernel)
    x, metric, size, p, grid = _fpet_case("seq")
    with pytest.raises((RuntimeError, ValueError), match=r"grid|H \* W"):  # C++: "grid", Triton: names H * W
        fwd(x, metric, size, p, 1, grid[1] - 1)
    with pytest.raises((RuntimeError, ValueError), match="metric"):
        fwd(x, metric[:, :-1], size, p, *grid)
    with pytest.raises((RuntimeError, ValueError), match="size"):
        fwd(x, metric, size[:, :-1], p, *grid)
    out, osz, tmap = fwd(x, metric, size, p, *grid)
    go = torch.ones_like(out)
    for bad in (tmap.clone().fill_(out.shape[1] + 7), tmap.clone().fill_(-5)):
        with pytest.raises((RuntimeError, ValueError, IndexError), match="token_map"):
            bwd(go, None, x, metric, size, out, osz, bad, p, *grid)
    with pytest.raises((RuntimeError, ValueError), match="token_map"):
        bwd(go, None, x, metric, size, out, osz, tmap[:, :-1], p, *grid)
    with pytest.raises((RuntimeError, ValueError), match="grad_out"):
        bwd(go[:, :-1], None, x, metric, size, out, osz, tmap, p, *grid)


def test_fpet_rows_opcheck(fpet_kernel):
    """torch.library.opcheck of the registered per-row op (schema, fake kernel, autograd registration)."""
    if fpet_kernel == "cuda-simt":
        pytest.skip("the emulator's ops register implementations only (no autograd, no fake kernels)")
    from torch.library import opcheck
    op = _raw_rows(fpet_kernel)[0]
    x, metric, size, p, grid = _fpet_case("seq-p0")
    x = torch.where(size > 0, x, 0.0).requires_grad_(True)
    metric = torch.nan_to_num(metric, nan=1.0)
    size = size.clone().requires_grad_(True)
    opcheck(op, (x, metric, size, p, *grid))
    opcheck(op, (x, metric, None, p, *grid))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_fpet_rows_torch_compile_fullgraph(compile_backend):
    """fpet_merge(padded=True) on the C++ kernels compiles without a graph break (the fake kernel, the
    registered autograd); values and gradients equal the eager call."""
    if not is_live("cpu"):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message('cpu')}", pytrace=False)
        pytest.skip(missing_message("cpu"))
    x, metric, size, p, grid = _fpet_case("seq")

    def f(x, metric, size):
        out, osz = fk.fpet_merge(x, metric, size, num_prefix=p, grid=grid, backend="cpu", padded=True)
        return (out * out).sum() + osz.sum()

    torch._dynamo.reset()
    leaves = [_leaves(x, metric, size), _leaves(x, metric, size)]
    got = torch.compile(f, fullgraph=True, backend=compile_backend)(*leaves[0])
    exp = f(*leaves[1])
    got.backward()
    exp.backward()
    torch.testing.assert_close(got, exp)
    for a, b in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(a.grad, b.grad)


def test_fpet_rows_records():
    """fpet_merge_rows / fpet_merge_rows_backward are op records with kernels on every backend, with the
    schemas of the ordinary fpet_merge and its backward."""
    rec, bwd = library.OPS["fpet_merge_rows"], library.OPS["fpet_merge_rows_backward"]
    assert rec.cpp and rec.cuda and rec.triton is not None and rec.backward is not None and rec.public
    assert rec.calls == ("fpet_merge_rows_backward",) and rec.schema == library.OPS["fpet_merge"].schema
    assert bwd.cpp and bwd.cuda and bwd.triton is not None and not bwd.public
    assert bwd.schema == library.OPS["fpet_merge_backward"].schema


# ----------------------------------------------------------------------------- edge rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,dist", [(False, False), (True, False), (True, True)])
def test_fully_padded_and_one_token_rows(backend, cls, dist):
    """A fully padded row: every output row 0 with size 0, map -1, zero gradients; a one-token row
    keeps its token (ToMe and PYRA merge nothing). Proportional attention over a fully padded row:
    every key has log 0 = -inf; SDPA returns 0 there (no NaN), and nothing else changes."""
    n, c, r = 9, 4, 3
    lens = [n, 0, 1, 5]
    x, metric, size = _batch(7, lens, n, c, 3, torch.float64)
    xl, sl = _leaves(x, size)
    out, osz, m = fk.tome_merge(xl, metric, r, sl, cls, dist, backend=backend, padded=True)
    (out.sum() + osz.sum()).backward()
    for t in (out, osz, xl.grad, sl.grad):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (osz[1] == 0).all() and (m.token_map[1] == -1).all()
    assert (xl.grad[1] == 0).all() and (sl.grad[1] == 0).all() and int(m.kept[1]) == 0
    assert (m.src_idx[1] == -1).all() and (m.unm_idx[1] == -1).all()
    assert int(m.kept[2]) == 1 and m.token_map[2].tolist() == [0] + [-1] * (n - 1)
    torch.testing.assert_close(out[2, 0], x[2, 0])
    assert osz[2, 0, 0] == size[2, 0, 0] and (osz[2, 1:] == 0).all()
    a, bb = torch.randn(r, 1, dtype=torch.float64), torch.randn(1, c, dtype=torch.float64)
    lw, lb = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    po, ps = fk.pyra_merge(x, metric, r, a, bb, lw, lb, size, cls, dist, backend=backend, padded=True)
    assert torch.isfinite(po).all() and (po[1] == 0).all() and (ps[1] == 0).all()
    torch.testing.assert_close(po[2, 0], x[2, 0])
    # proportional attention: keys of size 0 get log 0 = -inf; a fully padded row attends to nothing
    heads, hd = 2, 8
    qkv = torch.randn(len(lens), n, 3 * heads * hd, dtype=torch.float32, requires_grad=True)
    q, k, v, _ = attention_inputs_reference(qkv, size.float(), heads, hd ** -0.5, False)
    att = F.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)
    att.sum().backward()
    assert torch.isfinite(att).all() and torch.isfinite(qkv.grad).all()
    assert (att[1] == 0).all(), "a fully padded row: SDPA returns 0"
    row = 3  # a partly padded row: exactly the attention over its valid tokens alone
    q3, k3, v3, _ = attention_inputs_reference(qkv[row:row + 1, :5].detach(), size[row:row + 1, :5].float(), heads,
                                               hd ** -0.5, False)
    torch.testing.assert_close(att[row:row + 1, :, :5], F.scaled_dot_product_attention(q3, k3, v3, scale=hd ** -0.5))


def test_padded_without_padding_is_the_ordinary_op():
    """padded=True on a batch with no size-0 token: the ordinary op's matching and (up to the order of
    the float sums) its values; padded=False keeps the ordinary path itself (bit for bit)."""
    torch.manual_seed(3)
    x, metric, size = torch.randn(3, 17, 6), torch.randn(3, 17, 5), torch.rand(3, 17, 1) + 0.5
    for cls, dist in [(False, False), (True, False), (True, True), (False, True)]:
        for r in (0, 1, 5, 8, 20):
            out, osz, m = fk.tome_merge(x, metric, r, size, cls, dist, backend="reference", padded=True)
            eo, es, em = fk.tome_merge(x, metric, r, size, cls, dist, backend="reference")
            torch.testing.assert_close(out, eo)
            torch.testing.assert_close(osz, es)
            for name in ("src_idx", "dst_idx", "token_map"):
                assert torch.equal(getattr(m, name), getattr(em, name)), name
            u = em.unm_idx.shape[1]  # RowMatching.unm_idx has Na columns, -1 after each row's own
            assert torch.equal(m.unm_idx[:, :u], em.unm_idx) and (m.unm_idx[:, u:] == -1).all()
            assert (m.kept == 17 - em.src_idx.shape[1]).all()
            po, ps = fk.tome_merge(x, metric, r, size, cls, dist, backend="reference", padded=False)[:2]
            assert torch.equal(po, eo) and torch.equal(ps, es)


# ----------------------------------------------------------------------------- threshold merging
def _best_scores(metric, cls, dist, dtype=torch.float64):
    """Each A token's best score over the B tokens (protected ones -inf), from the spec (in ``dtype``:
    the precision the op compares in)."""
    m = normalize(metric.to(dtype))
    s = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
    if cls:
        s[:, 0] = -math.inf
    if dist:
        s[:, :, 0] = -math.inf
    return s.max(-1).values


@pytest.mark.parametrize("backend,dtype", TOME_CASES)
@SETTINGS
@given(lens=rows, thr=st.floats(-1, 1), r=st.one_of(st.none(), st.integers(0, 12)), fl=flags,
       seed=st.integers(0, 2 ** 16))
def test_threshold_rows_equal_the_row_alone_with_its_count(backend, dtype, lens, thr, r, fl, seed):
    """Each row merges every A token whose best score is >= threshold (at most r and its cap): the row
    alone with r_b = that count; the batch keeps its longest row (the others padded)."""
    cls, dist = fl
    n = max(max(lens), 2)
    x, metric, size = _batch(seed, lens, n, 4, 3, dtype)
    xl, sl = _leaves(x, size)
    out, osz, m = fk.tome_merge(xl, metric, r, sl, cls, dist, backend=backend, padded=True, threshold=thr)
    assert out.shape[1] == int(m.kept.max())
    out.sum().backward()
    for b, k in enumerate(lens):
        if not _valid_prefix(k, cls, dist):
            assert int(m.kept[b]) == k
            continue
        cap = cap_r(n if r is None else r, k, cls, dist)
        rb = min(cap, int((_best_scores(metric[b:b + 1, :k], cls, dist, dtype) >= thr).sum())) if k > 1 else 0
        xa, sa = _leaves(x[b:b + 1, :k], size[b:b + 1, :k])
        eo, es, em = fk.tome_merge(xa, metric[b:b + 1, :k], rb, sa, cls, dist, backend="reference")
        eo.sum().backward()
        kk = eo.shape[1]
        assert int(m.kept[b]) == kk and int((m.src_idx[b] >= 0).sum()) == rb
        _close(out[b, :kk], eo[0], dtype, "x'")
        assert torch.equal(osz[b, :kk], es[0]) and (osz[b, kk:] == 0).all() and (out[b, kk:] == 0).all()
        assert torch.equal(m.token_map[b, :k], em.token_map[0])
        _close(xl.grad[b, :k], _grad(xa)[0], dtype, "grad x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_merges_nothing_or_everything(backend):
    torch.manual_seed(4)
    n, r = 12, 4
    x, metric, size = torch.randn(3, n, 5), torch.randn(3, n, 4), torch.ones(3, n, 1)
    metric[1] = metric[1, :1]  # row 1: all tokens alike (every score 1)
    # threshold 1: only row 1 merges (r of them, its cap); the others keep every token, in input order
    out, osz, m = fk.tome_merge(x, metric, r, size, True, backend=backend, threshold=1.0)
    assert m.kept.tolist() == [n, n - r, n] and out.shape == (3, n, 5)
    for b in (0, 2):
        assert torch.equal(m.token_map[b], torch.arange(n)) and torch.equal(out[b], x[b])
    assert (out[1, n - r:] == 0).all() and (osz[1, n - r:] == 0).all()
    # threshold -1: every row merges its cap (r=None) or r
    out, osz, m = fk.tome_merge(x, metric, None, size, True, backend=backend, threshold=-1.0)
    cap = cap_r(n, n, True, False)
    assert m.kept.tolist() == [n - cap] * 3 and out.shape == (3, n - cap, 5)
    e = fk.tome_merge(x, metric, cap, size, True, backend="reference")
    torch.testing.assert_close(out, e[0])
    assert torch.equal(m.token_map, e[2].token_map)
    out2 = fk.tome_merge(x, metric, 2, size, True, backend=backend, threshold=-1.0)[0]
    torch.testing.assert_close(out2, fk.tome_merge(x, metric, 2, size, True, backend="reference")[0])
    # PYRA: threshold caps at r (a's rows), per row a[:r_b]
    c = 5
    a, bb, lw, lb = torch.randn(r, 1), torch.randn(1, c), torch.ones(c), torch.zeros(c)
    po, ps, pm = fk.pyra_merge(x, metric, r, a, bb, lw, lb, size, True, backend=backend, threshold=1.0,
                               return_matching=True)
    assert pm.kept.tolist() == [n, n - r, n] and torch.equal(po[0], x[0])
    e1 = fk.pyra_merge(x[1:2], metric[1:2], r, a, bb, lw, lb, size[1:2], True, backend="reference")
    torch.testing.assert_close(po[1, :n - r], e1[0][0])


# ----------------------------------------------------------------------------- bad arguments
BAD_THRESHOLDS = [(float("nan"), ValueError), (1.5, ValueError), (-1.01, ValueError), (float("inf"), ValueError),
                  ("0.5", TypeError), (True, TypeError)]


@pytest.mark.parametrize("thr,err", BAD_THRESHOLDS)
def test_bad_threshold_names_it(thr, err):
    x, metric, size = torch.randn(2, 9, 4), torch.randn(2, 9, 3), torch.ones(2, 9, 1)
    a, bb, lw, lb = torch.randn(2, 1), torch.randn(1, 4), torch.ones(4), torch.zeros(4)
    for call in (lambda: fk.tome_merge(x, metric, 2, size, backend="reference", threshold=thr),
                 lambda: fk.tome_match(metric, 2, backend="reference", threshold=thr),
                 lambda: fk.pyra_merge(x, metric, 2, a, bb, lw, lb, size, backend="reference", threshold=thr)):
        with pytest.raises(err, match="threshold"):
            call()


def test_r_and_threshold_both_missing_or_bad():
    x, metric, size = torch.randn(2, 9, 4), torch.randn(2, 9, 3), torch.ones(2, 9, 1)
    a, bb, lw, lb = torch.randn(2, 1), torch.randn(1, 4), torch.ones(4), torch.zeros(4)
    with pytest.raises(TypeError, match="r must be a Python int.*threshold"):
        fk.tome_merge(x, metric, None, size, backend="reference")
    with pytest.raises(TypeError, match="r must be a Python int.*threshold"):
        fk.tome_match(metric, None, backend="reference", padded=True)
    with pytest.raises(ValueError, match="threshold needs r"):
        fk.pyra_merge(x, metric, None, a, bb, lw, lb, size, backend="reference", threshold=0.5)
    with pytest.raises(ValueError, match="r must be >= 0"):
        fk.tome_merge(x, metric, -1, size, backend="reference", threshold=0.5)
    with pytest.raises(TypeError, match="padded must be a bool"):
        fk.tome_merge(x, metric, 2, size, backend="reference", padded=1)
    with pytest.raises(TypeError, match="padded must be a bool"):
        fk.fpet_merge(x, metric, size, grid=(1, 9), backend="reference", padded="yes")
    with pytest.raises(ValueError, match="size"):
        fk.tome_match(metric, 2, backend="reference", size=torch.ones(2, 8, 1), padded=True)


def test_padding_not_at_the_right_end():
    """Padding elsewhere follows position parity with size-0 tokens left out; a row that then keeps more
    tokens than the static output has rows is an error naming size (right-pad the batch)."""
    n = 5
    x, metric = torch.randn(1, n, 3), torch.randn(1, n, 3)
    size = torch.tensor([[[1.0], [1.0], [1.0], [0.0], [1.0]]])  # the only non-protected B token is padding
    with pytest.raises(ValueError, match="size: a row keeps 4 valid tokens"):
        fk.tome_merge(x, metric, 2, size, False, True, backend="reference", padded=True)
    size = torch.tensor([[[1.0], [0.0], [1.0], [1.0], [1.0]]])  # B = {3}: A tokens 0, 2, 4 compete for it
    out, osz, m = fk.tome_merge(x, metric, 1, size, backend="reference", padded=True)
    assert int(m.kept[0]) == 3 and m.token_map[0, 1] == -1 and osz[0, :, 0].tolist() == [1.0, 1.0, 2.0, 0.0]


def test_the_automatic_backend_choice():
    """The automatic choice runs the per-row ops' kernels (the C++ kernels on CPU when built) and gives
    what the reference gives."""
    x, metric, size = torch.randn(2, 9, 4), torch.randn(2, 9, 3), torch.ones(2, 9, 1)
    size[1, 4:] = 0
    got = fk.tome_merge(x, metric, 2, size, padded=True)
    exp = fk.tome_merge(x, metric, 2, size, backend="reference", padded=True)
    torch.testing.assert_close(got[0], exp[0])
    assert torch.equal(got[2].token_map, exp[2].token_map)
    assert int(got[2].kept[1]) == 4 - 2
    out, osz = fk.fpet_merge(x, metric, size, grid=(1, 9), padded=True)
    assert torch.equal(osz[1, 2:], torch.zeros(2, 1))


def test_the_per_row_formulation_is_ops_of_its_own():
    """Each family's per-row formulation is a registered op with kernels on every backend: ToMe's
    per-row matching ``tome_match_rows`` (``tome_merge`` per row = it + ``merge_wavg``), PYRA's
    ``pyra_merge_rows`` and FPET's ``fpet_merge_rows`` (with their closed-form backward ops)."""
    assert library.OPS["pyra_merge_rows"].public and not library.OPS["pyra_merge_rows_backward"].public
    assert library.OPS["fpet_merge_rows"].public and not library.OPS["fpet_merge_rows_backward"].public
    for name in ("pyra_merge_rows", "pyra_merge_rows_backward", "fpet_merge_rows", "fpet_merge_rows_backward"):
        rec = library.OPS[name]
        assert rec.cpp and rec.cuda and rec.triton is not None, name
    rec = library.OPS["tome_match_rows"]
    assert rec.cpp and rec.cuda and rec.triton is not None and rec.backward is None and rec.public


# ----------------------------------------------------------------------------- ToMe's per-row matching op
# torch.ops.fpet.tome_match_rows (C++ CPU), .tome_match_rows_triton (Triton), and the CUDA kernel's source
# in the SIMT emulator (torch.ops.fpet_simt.tome_match_rows), each against tome_match_rows_reference:
# indices equal (float32 scores on every side).
def _kernel_op(name):
    if not is_live(name):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: backend {name!r} is not live", pytrace=False)
        pytest.skip(f"backend {name!r} is not live")
    return torch.ops.fpet.tome_match_rows if name == "cpu" else torch.ops.fpet.tome_match_rows_triton


def _rows_cases():
    """(metric, r, class_token, distill_token, size, threshold): right-padded rows with every edge (fully
    padded, one token, two tokens, full), NaN metric in the padding, threshold rows that merge nothing
    or everything, no padding (size None), sizes of another dtype, padding elsewhere than at the right."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for n, lens in ((13, [13, 0, 1, 2, 7]), (8, [8, 3, 0]), (2, [2, 1]), (1, [1, 0]), (40, [40, 33, 5])):
        metric = torch.randn(len(lens), n, 6, generator=g)
        size = (torch.rand(len(lens), n, 1, generator=g) * 3 + 0.5).round()
        for b, k in enumerate(lens):
            size[b, k:] = 0
            metric[b, k:] = torch.nan
        for cls, dist in ((False, False), (True, False), (True, True), (False, True)):
            for r, thr in ((0, None), (1, None), (3, None), (100, None), (None, -1.0), (None, 0.2), (2, 0.0),
                           (None, 1.0), (5, 0.999)):
                cases.append((metric, r, cls, dist, size, thr))
    metric = torch.randn(3, 12, 4, generator=g)
    metric[1] = metric[1, :1]  # one row of identical tokens: every score 1 (the threshold merges everything)
    for thr in (-1.0, 0.5, 0.999):
        cases.append((metric, 4, True, False, None, thr))
        cases.append((metric, None, False, False, torch.ones(3, 12, 1, dtype=torch.bfloat16), thr))
    size = torch.ones(2, 9, 1)
    size[0, 3] = 0  # padding inside a row (defined by position parity; not per-sequence equivalent)
    size[1, ::3] = 0
    cases.append((torch.randn(2, 9, 5, generator=g), 2, True, False, size, None))
    cases.append((torch.randn(2, 9, 5, generator=g), None, False, True, size, 0.1))
    metric = torch.randn(2, 14, 4, generator=g)
    metric[0, 4, 1] = torch.nan  # a NaN score ranks first (and reaches any threshold)
    metric[1, 7, 0] = torch.nan  # a NaN destination column: the best of every row
    for r, thr in ((3, None), (None, 0.5), (6, 1.0)):
        cases.append((metric, r, True, False, torch.ones(2, 14, 1), thr))
    return cases


def _check_rows_op(op, metric, r, cls, dist, size, thr):
    got = op(metric, r, cls, dist, size, thr)
    exp = _tome_match_rows_op_reference(metric, r, cls, dist, size, thr)
    names = ("src_idx", "dst_idx", "unm_idx", "token_map", "kept")
    for name, gt, e in zip(names, got, exp):
        assert gt.dtype == torch.int64 and gt.shape == e.shape, (name, gt.shape, e.shape)
        assert torch.equal(gt, e), f"{name} differs (r={r}, cls={cls}, dist={dist}, thr={thr}):\n{gt}\n{e}"


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_tome_match_rows_kernels_equal_the_reference(name):
    op = _kernel_op(name)
    cases = _rows_cases()
    for case in (cases if name == "cpu" else cases[::4] + cases[-11:]):  # the interpreter: a sample
        _check_rows_op(op, *case)


def test_tome_match_rows_cuda_kernel_equals_the_reference(simt):
    """The CUDA kernel's source, run in the emulator (4 thread orders / block sizes)."""
    for case in _rows_cases():
        _check_rows_op(simt.tome_match_rows, *case)


def test_tome_match_rows_cuda_kernel_large_rows(simt_ops):
    """N = 1025, D = 96: several staging panels; rows padded at many lengths."""
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(3, 1025, 96, generator=g)
    size = torch.ones(3, 1025, 1)
    size[1, 700:] = 0
    size[2, 3:] = 0
    for r, thr in ((300, None), (None, 0.3)):
        _check_rows_op(simt_ops.tome_match_rows, metric, r, True, False, size, thr)


@pytest.mark.parametrize("name", ["cpu", "triton", "simt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_tome_match_rows_half_and_non_contiguous_inputs(request, name, dtype):
    op = (request.getfixturevalue("simt_ops").tome_match_rows if name == "simt" else _kernel_op(name))
    g = torch.Generator().manual_seed(2)
    metric = torch.randn(3, 6, 17, generator=g).to(dtype).transpose(1, 2)  # [3, 17, 6], non-contiguous
    size = torch.ones(3, 1, 17).to(dtype).transpose(1, 2)
    size[1, 9:] = 0
    size[2, 1:] = 0
    for r, thr in ((4, None), (None, 0.1), (8, -1.0)):
        _check_rows_op(op, metric, r, True, False, size, thr)


@pytest.mark.parametrize("name", ["cpu", "triton", "simt"])
def test_tome_match_rows_bad_arguments_name_them(request, name):
    """The op entry points check what their kernels index with (shapes, devices, dtypes, r, threshold)
    and name the argument; nothing reaches a kernel that could read or write out of bounds."""
    op = (request.getfixturevalue("simt_ops").tome_match_rows if name == "simt" else _kernel_op(name))
    metric, size = torch.randn(2, 9, 3), torch.ones(2, 9, 1)
    bad = [((metric, 2, False, False, torch.ones(2, 8, 1), None), "size"),
           ((metric, 2, False, False, torch.ones(2, 9), None), "size"),
           ((metric, 2, False, False, torch.ones(2, 9, 1, dtype=torch.int64), None), "size"),
           ((metric[0], 2, False, False, None, None), "metric"),
           ((metric.long(), 2, False, False, None, None), "metric"),
           ((metric, -1, False, False, size, None), "r"),
           ((metric, None, False, False, size, 1.5), "threshold"),
           ((metric, None, False, False, size, float("nan")), "threshold")]
    for args, what in bad:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=what):
            op(*args)


def test_tome_match_rows_fake_kernel_shapes():
    """The fake kernel (torch.compile / export) gives the kernels' output shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    metric, size = torch.randn(2, 11, 3), torch.ones(2, 11, 1)
    for r, thr, cls, dist in ((3, None, True, False), (None, 0.5, False, True), (100, 0.5, True, True)):
        exp = _tome_match_rows_op_reference(metric, r, cls, dist, size, thr)
        with FakeTensorMode() as mode:
            fm, fs = mode.from_tensor(metric), mode.from_tensor(size)
            got = torch.ops.fpet.tome_match_rows(fm, r, cls, dist, fs, thr)
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in exp]
        assert all(t.dtype == torch.int64 for t in got)


@pytest.mark.parametrize("backend", TOME_BACKENDS)
@pytest.mark.parametrize("threshold", [None, 0.0])
def test_tome_merge_rows_backward_equals_autograd_of_the_rows_reference(backend, threshold):
    """The per-row merge's gradient (merge_wavg's closed-form backward along the per-row map) equals
    plain autograd of ``tome_merge_rows_reference``, in x and in size; padding gets none."""
    lens = [11, 0, 1, 6]
    x, metric, size = _batch(21, lens, 11, 5, 4, torch.float32)
    xl, sl = _leaves(x, size)
    out, osz, m = fk.tome_merge(xl, metric, 3, sl, True, False, backend=backend, padded=True, threshold=threshold)
    xr, sr = _leaves(x, size)
    eo, es, em = tome_merge_rows_reference(xr, metric, 3, sr, True, False, padded=True, threshold=threshold)
    eo, es = eo[:, :out.shape[1]], es[:, :out.shape[1]]
    assert torch.equal(m.token_map, em.token_map) and torch.equal(m.kept, em.kept)
    _close(out, eo, torch.float32, "x'")
    g = torch.Generator().manual_seed(3)
    go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
    ((out * go).sum() + (osz * gs).sum()).backward()
    ((eo * go).sum() + (es * gs).sum()).backward()
    _close(xl.grad, xr.grad, torch.float32, "grad x")
    _close(sl.grad, sr.grad, torch.float32, "grad size")
    assert (xl.grad[1] == 0).all() and (xl.grad[2, 1:] == 0).all() and (sl.grad[1] == 0).all()


@pytest.mark.parametrize("backend", TOME_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_tome_merge_rows_half_precision(backend, dtype):
    """Half-precision inputs: the kernels' values and gradients against the reference on the same inputs."""
    lens = [13, 4, 0]
    x, metric, size = _batch(8, lens, 13, 8, 6, torch.float32)
    x, metric = x.to(dtype), metric.to(dtype)
    xl = x.detach().clone().requires_grad_(True)
    out, osz, m = fk.tome_merge(xl, metric, 4, size, True, False, backend=backend, padded=True)
    xr = x.detach().clone().requires_grad_(True)
    eo, es, em = fk.tome_merge(xr, metric, 4, size, True, False, backend="reference", padded=True)
    assert out.dtype == dtype and torch.equal(m.token_map, em.token_map)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), eo.float(), **tol)
    torch.testing.assert_close(osz, es)
    out.float().sum().backward()
    eo.float().sum().backward()
    torch.testing.assert_close(xl.grad.float(), xr.grad.float(), **tol)


@pytest.mark.parametrize("backend", TOME_BACKENDS)
@pytest.mark.parametrize("cls,dist", [(False, False), (True, False), (True, True)])
def test_tome_fully_padded_one_token_rows_and_thresholds_on_every_backend(backend, cls, dist):
    """A fully padded row (all 0, map -1, kept 0), a one-token row (its token), and a threshold that
    merges nothing in one row and everything (the cap) in another, on each backend."""
    n, c = 12, 4
    x, metric, size = _batch(7, [n, 0, 1, 5], n, c, 3, torch.float32)
    xl = x.detach().clone().requires_grad_(True)
    out, osz, m = fk.tome_merge(xl, metric, 3, size, cls, dist, backend=backend, padded=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xl.grad).all()
    assert (out[1] == 0).all() and (osz[1] == 0).all() and (m.token_map[1] == -1).all() and int(m.kept[1]) == 0
    assert (xl.grad[1] == 0).all() and (m.src_idx[1] == -1).all() and (m.unm_idx[1] == -1).all()
    assert int(m.kept[2]) == 1 and m.token_map[2].tolist() == [0] + [-1] * (n - 1)
    torch.testing.assert_close(out[2, 0], x[2, 0])
    # threshold: row 1 alike (every score 1) merges its cap, the others (random) nothing at 0.999
    metric = torch.randn(3, n, 4)
    metric[1] = metric[1, :1]
    x = torch.randn(3, n, c)
    out, osz, m = fk.tome_merge(x, metric, None, None, cls, dist, backend=backend, threshold=0.999)
    cap = cap_r(n, n, cls, dist)
    assert m.kept.tolist() == [n, n - cap, n] and out.shape == (3, n, c)
    for b in (0, 2):
        assert torch.equal(m.token_map[b], torch.arange(n)) and torch.equal(out[b], x[b])
    e = fk.tome_merge(x[1:2], metric[1:2], cap, None, cls, dist, backend="reference")
    torch.testing.assert_close(out[1:2, :n - cap], e[0])
    assert (out[1, n - cap:] == 0).all() and (osz[1, n - cap:] == 0).all()
    assert torch.equal(m.token_map[1], e[2].token_map[0])


def test_tome_match_rows_triton_over_several_tiles(monkeypatch):
    """Triton with 16-row tiles: every loop of the kernel (counts, scores, B ranks, A ranks, tails,
    identity map) runs over several tiles, carrying its running counts from tile to tile."""
    _kernel_op("triton")
    from fpet_kernels.ops import tome_match_rows_triton
    monkeypatch.setattr(tome_match_rows_triton, "BLOCK", 16)
    g = torch.Generator().manual_seed(9)
    metric = torch.randn(4, 70, 5, generator=g)
    size = torch.ones(4, 70, 1)
    for b, k in enumerate([70, 37, 16, 1]):
        size[b, k:] = 0
    for r, thr, cls, dist in ((None, -1.0, True, False), (9, None, False, True), (None, 0.3, True, True),
                              (40, 0.2, False, False)):
        _check_rows_op(torch.ops.fpet.tome_match_rows_triton, metric, r, cls, dist, size, thr)
    _check_rows_op(torch.ops.fpet.tome_match_rows_triton, metric, 0, True, False, size, None)


@pytest.mark.parametrize("name", ["cpu", "simt"])
@SETTINGS
@given(lens=rows, extra=st.integers(0, 3), r=st.one_of(st.none(), st.integers(0, 14)),
       thr=st.one_of(st.none(), st.floats(-1, 1)), fl=flags, seed=st.integers(0, 2 ** 16))
def test_tome_match_rows_kernels_hypothesis(request, name, lens, extra, r, thr, fl, seed):
    """Random right-padded batches: the C++ CPU kernel and the CUDA kernel (emulated) equal the
    reference (which the tests above hold to per-sequence equivalence)."""
    op = (request.getfixturevalue("simt_ops").tome_match_rows if name == "simt" else _kernel_op(name))
    if r is None and thr is None:
        thr = 0.0
    cls, dist = fl
    _, metric, size = _batch(seed, lens, max(max(lens), 2) + extra, 1, 5, torch.float32)
    _check_rows_op(op, metric, r, cls, dist, size, thr)


# ----------------------------------------------------------------------------- PYRA's per-row op, every kernel
ROWS_KERNELS = ["cpu", "triton", "simt"]


def _rows_op(backend, name):
    """``pyra_merge_rows`` (or its backward) of a kernel backend: the C++ CPU kernel, Triton, or the CUDA
    kernels on the SIMT emulator (skipped, or failing under FPET_REQUIRE_EXTENSION=1, where absent)."""
    if backend == "simt":
        import simt_ext
        if not simt_ext.live():
            msg = simt_ext.load() or "torch.ops.fpet_simt has no kernels"
            if REQUIRE_EXTENSION:
                pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)
            pytest.skip(msg)
        return getattr(torch.ops.fpet_simt, name)
    _live(backend)
    return getattr(torch.ops.fpet, name + ("_triton" if backend == "triton" else ""))


def _edge_rows(dtype, threshold):
    """A batch with a full row, a fully padded row, a one-token row, a partly padded row and a row whose
    tokens are all alike (every score 1), and its per-row matching: pyra_merge_rows's arguments."""
    lens, n, c, r = [13, 0, 1, 7, 13], 13, 10, 4
    x, metric, size = _batch(21, lens, n, c, 4, torch.float32)
    x = torch.where(size > 0, x, 1e3)  # garbage that stays finite in float16 (0 * inf would be NaN)
    metric[4] = metric[4, :1]
    src, dst, _, tmap, kept = tome_match_rows_reference(metric, r, True, False, valid_tokens(size, x), threshold)
    n_out = static_rows(n, r, threshold, True, False)
    g = torch.Generator().manual_seed(22)
    rr = src.shape[1]
    params = (torch.randn(rr, 1, generator=g), 0.5 * torch.randn(1, c, generator=g),
              1 + 0.2 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g))
    return (x.to(dtype), size.to(dtype), src, dst, tmap, *params, n_out, 1e-5), lens, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("threshold", [None, 1.0, -1.0], ids=["r", "thr-nothing", "thr-everything"])
@pytest.mark.parametrize("backend", ROWS_KERNELS)
def test_pyra_merge_rows_kernels_against_the_reference(backend, threshold, dtype):
    """Each kernel of the op and of its closed-form backward against the reference (float64), on fully
    padded, one-token and partly padded rows, threshold rows merging nothing or everything, half dtypes
    and non-contiguous inputs: values, the six gradients, zeros for padding."""
    fwd, bwd = _rows_op(backend, "pyra_merge_rows"), _rows_op(backend, "pyra_merge_rows_backward")
    args, lens, kept = _edge_rows(dtype, threshold)
    x, size, src, dst, tmap, a, bb, lw, lb, n_out, eps = args
    if threshold == 1.0:
        assert kept.tolist() == [13, 0, 1, 7, 13 - 4], "only the alike row merges (r of them)"
    if threshold == -1.0:
        assert kept.tolist() == [13 - 4, 0, 1, 7 - 3, 13 - 4]
    xn = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    out, osz = fwd(xn, size, src, dst, tmap, a, bb, lw, lb, n_out, eps)
    wide = [t.double().requires_grad_(True) for t in (x, size, a, bb, lw, lb)]
    ro, rs = pyra.pyra_merge_rows_op_reference(wide[0], wide[1], src, dst, tmap, *wide[2:], n_out, eps)
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}[dtype]
    assert out.dtype == dtype and osz.dtype == torch.float32
    torch.testing.assert_close(out.double(), ro.detach(), **tol)
    assert torch.equal(osz.double(), rs.detach()), "sizes: sums of small integers, exact"
    for b, k in enumerate(lens):
        assert (out[b, int(kept[b]):] == 0).all() and (osz[b, int(kept[b]):] == 0).all()
    assert (out[1] == 0).all() and torch.equal(out[2, 0], x[2, 0])
    if threshold == 1.0:
        for b in (0, 3):
            torch.testing.assert_close(out[b, :lens[b]], x[b, :lens[b]], atol=1e-3, rtol=1e-3)
    g = torch.Generator().manual_seed(23)
    go, gos = torch.randn(out.shape, generator=g).to(dtype), torch.randn(osz.shape, generator=g)
    got = bwd(go.transpose(1, 2).contiguous().transpose(1, 2), gos, xn, size, out, osz, src, dst, tmap, a, bb, lw, lb,
              eps)
    exp = torch.autograd.grad((ro * go.double()).sum() + (rs * gos.double()).sum(), wide, allow_unused=True)
    names = ("x", "a", "b", "ln_weight", "ln_bias", "size")
    order = (0, 2, 3, 4, 5, 1)  # the backward's output order against wide's
    closed = pyra.pyra_merge_rows_backward_reference(go.double(), gos.double(), *[w.detach() for w in wide[:2]],
                                                     ro.detach(), rs.detach(), src, dst, tmap,
                                                     *[w.detach() for w in wide[2:]], eps)
    for name, u, i, cf in zip(names, got, order, closed):
        e = exp[i] if exp[i] is not None else torch.zeros_like(wide[i])
        torch.testing.assert_close(cf, e.view(cf.shape), atol=1e-9, rtol=1e-9, msg=lambda m: f"closed form {name}: {m}")
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(u.double(), e.view(u.shape), atol=tol["atol"] * scale, rtol=tol["rtol"],
                                   msg=lambda m: f"{backend} grad {name}: {m}")
    for b, k in enumerate(lens):
        assert (got[0][b, k:] == 0).all() and (got[5][b, k:] == 0).all(), "padding: zero gradients"


@pytest.mark.parametrize("backend", ROWS_KERNELS)
def test_pyra_merge_rows_kernels_refuse_bad_arguments(backend):
    """Direct calls of the op (torch.ops.fpet.*): bad indices and shapes are errors naming the argument,
    raised before any kernel reads or writes (nothing out of bounds)."""
    fwd, bwd = _rows_op(backend, "pyra_merge_rows"), _rows_op(backend, "pyra_merge_rows_backward")
    args, _, _ = _edge_rows(torch.float32, None)
    x, size, src, dst, tmap, a, bb, lw, lb, n_out, eps = args
    na, nb = 7, 6
    bad = [(2, src.clone().fill_(na), "src_idx"), (2, src.clone().fill_(-2), "src_idx"),
           (3, torch.where(src >= 0, nb, dst), "dst_idx"), (4, torch.full_like(tmap, n_out), "token_map"),
           (4, torch.full_like(tmap, -2), "token_map"), (4, tmap.int(), "token_map"), (4, tmap[:, :-1], "token_map"),
           (1, size[:, :-1], "size"), (5, a[:-1], "a"), (6, bb[:, :-1], "b"), (7, lw[:-1], "ln_weight"),
           (8, lb[:-1], "ln_bias"), (2, torch.zeros(5, na + 1, dtype=torch.int64), "src_idx"),
           (9, x.shape[1] + 1, "n_out"), (10, 0.0, "eps")]
    for pos, value, name in bad:
        call = list(args)
        call[pos] = value
        with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
            fwd(*call)
            pytest.fail(f"bad {name} (argument {pos}) was accepted")
    out, osz = fwd(*args)
    go = torch.randn_like(out)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="out"):
        bwd(go, None, x, size, out[:, :-1], osz, src, dst, tmap, a, bb, lw, lb, eps)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="grad_out_size"):
        bwd(go, osz[:, :-1], x, size, out, osz, src, dst, tmap, a, bb, lw, lb, eps)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="token_map"):
        bwd(go, None, x, size, out, osz, src, dst, torch.full_like(tmap, out.shape[1]), a, bb, lw, lb, eps)
