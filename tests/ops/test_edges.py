"""The numerical edges and fuzz findings of issue 10, one test each, on every backend that runs here
(docs/semantics.md, "Edge cases: the rules").

Backends: "reference", "cpu" (the C++ kernels), "triton" (the interpreter on CPU tensors) and
"cuda" (the CUDA kernels run on the host by the SIMT emulator, ``torch.ops.fpet_simt``). Ops are
called through the public API (``fk.<op>(..., backend=...)``) where that backend has one, and through
the kernel entry functions themselves (the C++ kernels, the Triton entry functions, the emulated CUDA
launchers) for the argument checks: they must hold whoever calls the kernel.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.ops import fpet as fpet_ops
from fpet_kernels.ops import tome as tome_ops

from fpet_kernels.ops import library
from helpers import REQUIRE_EXTENSION, is_live, map_ops, missing_message
from simt_ext import live as simt_live

INF, NAN = float("inf"), float("nan")
ALL = ("reference", "cpu", "triton", "cuda")
KERNELS = ("cpu", "triton", "cuda")


def _live(be: str) -> bool:
    if be == "reference":
        return True
    if be == "cuda":
        return simt_live()
    if be == "triton":
        return fk.backends()["live"]["triton"]
    return is_live(be)


def _need(be: str) -> str:
    if not _live(be):
        msg = missing_message(be) if be != "triton" else "triton interpreter not available"
        if REQUIRE_EXTENSION and be in ("cpu", "cuda"):
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)
        pytest.skip(msg)
    return be


@pytest.fixture(params=ALL)
def be(request):
    return _need(request.param)


@pytest.fixture(params=KERNELS)
def kbe(request):
    return _need(request.param)


def kernel(backend: str, name: str):
    """The kernel of a compiled backend as a registered op (raw schema of csrc/README.md)."""
    if backend == "cuda":
        return getattr(torch.ops.fpet_simt, name)
    # the registered ops: torch.ops.fpet.<name> (C++ kernels) or torch.ops.fpet.<name>_triton
    return getattr(library.family(backend), name)


BAD = (RuntimeError, ValueError, TypeError)


# ----------------------------------------------------------------------------- per-backend op calls
def tome_merge(be, x, metric, r, size=None, cls=False, dist=False):
    """(out, out_size, token_map, src_idx)."""
    if be == "cuda":
        r = tome_ops.cap_r(r, x.shape[1], cls, dist)
        out, osz, src, _, _, tmap = torch.ops.fpet_simt.tome_merge(x, metric, r, size, cls, dist)
        return out, osz, tmap, src
    out, osz, m = fk.tome_merge(x, metric, r, size, cls, dist, backend=be)
    return out, osz, m.token_map, m.src_idx


def fpet_merge(be, x, metric, size=None, p=0, grid=None):
    """(out, out_size, token_map)."""
    if be == "cuda":
        h, w = fpet_ops.resolve_grid(x.shape[1], p, grid)
        return torch.ops.fpet_simt.fpet_merge(x, metric, size, p, h, w)
    return fk.fpet_merge(x, metric, size, grid=grid, num_prefix=p, backend=be, return_token_map=True)


def fpet_grads(be, x, metric, size, p, h, w, seed=0):
    """(grad_x, grad_metric, grad_size) of sum(out * g) + sum(out_size * gs)."""
    g = torch.Generator().manual_seed(seed)
    if be == "cuda":
        out, osz, tmap = torch.ops.fpet_simt.fpet_merge(x, metric, size, p, h, w)
        go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
        return torch.ops.fpet_simt.fpet_merge_backward(go, gs, x, metric, size, out, osz, tmap, p, h, w)
    xs, ms, ss = (t.detach().clone().requires_grad_() for t in (x, metric, size))
    out, osz = fk.fpet_merge(xs, ms, ss, grid=(h, w), num_prefix=p, backend=be)
    go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
    ((out.float() * go).sum() + (osz * gs).sum()).backward()
    return xs.grad, ms.grad, ss.grad


def merge_wavg(be, x, size, tmap, n_out):
    if be == "reference":
        return map_ops("reference").merge_wavg(x, size, tmap, n_out)
    return kernel(be, "merge_wavg")(x, size, tmap, n_out)


def merge_sum(be, x, tmap, n_out):
    if be == "reference":
        return map_ops("reference").merge_sum(x, tmap, n_out)
    return kernel(be, "merge_sum")(x, tmap, n_out)


def unmerge(be, y, tmap):
    if be == "reference":
        return map_ops("reference").unmerge(y, tmap)
    return kernel(be, "unmerge")(y, tmap)


def pyra_merge(be, x, metric, r, a, b, lnw, lnb, size=None, cls=False, dist=False, eps=1e-5):
    if be == "cuda":
        r = tome_ops.cap_r(r, x.shape[1], cls, dist)
        return torch.ops.fpet_simt.pyra_merge(x, metric, r, a[:r], b, lnw, lnb, size, cls, dist, eps)[:2]
    return fk.pyra_merge(x, metric, r, a, b, lnw, lnb, size, cls, dist, eps=eps, backend=be)


# ----------------------------------------------------------------------------- heap safety
@pytest.mark.parametrize("p,h,w,what", [(-1, 4, 4, "num_prefix"), (1, -4, -4, "H"), (20, 4, 4, "num_prefix"),
                                        (17, 0, 0, "H"), (2, 4, 4, "N"),
                                        (1, 8, 4, "grid|num_prefix")])
def test_fpet_kernels_reject_bad_layouts(kbe, p, h, w, what):
    """The fuzz reproducer: fpet_merge with num_prefix = -1, H = W = -4 or num_prefix > N wrote out of
    bounds in Triton. Every kernel entry rejects the layout, naming the argument."""
    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    with pytest.raises(BAD, match=what):
        kernel(kbe, "fpet_merge")(x, metric, None, p, h, w)
    out, osz, tmap = kernel(kbe, "fpet_merge")(x, metric, None, 1, 4, 4)
    with pytest.raises(BAD, match=what):
        kernel(kbe, "fpet_merge_backward")(out, None, x, metric, None, out, osz, tmap, p, h, w)


def test_fpet_registered_op_rejects_bad_layout(kbe):
    """The reproducer through the public op (the Triton backend was the one that wrote out of bounds)."""
    if kbe == "cuda":
        pytest.skip("the emulated CUDA kernels are not a backend of the public op")
    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    with pytest.raises(BAD, match="num_prefix|H"):
        library.family(kbe).fpet_merge(x, metric, None, -1, 4, 4)
    with pytest.raises(BAD, match="num_prefix|grid|H"):
        library.family(kbe).fpet_merge(x, metric, None, 20, 4, 4)


def test_r_above_the_cap_is_rejected_by_every_kernel(kbe):
    x, metric = torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    for r, cls, dist in ((5, False, False), (5, True, False), (-1, False, False), (1, False, True)):
        n = 9 if (r, dist) != (1, True) else 3
        xx, mm = x[:, :n], metric[:, :n]
        with pytest.raises(BAD, match="r must be"):
            kernel(kbe, "tome_merge")(xx, mm, r, None, cls, dist)
        with pytest.raises(BAD, match="r must be"):
            kernel(kbe, "tome_match")(mm, r, cls, dist)


@pytest.mark.parametrize("case", ["size_shape", "size_device_dtype", "a_shape", "b_shape", "lnw_shape", "eps_nan",
                                  "eps_zero", "map_shape", "map_dtype", "n_out", "x_dtype", "metric_batch"])
def test_kernel_entries_check_their_arguments(kbe, case):
    """Wrong shapes / dtypes of size, the PYRA parameters, the maps, n_out < 0: rejected by the kernel
    itself, naming the argument, before anything is launched."""
    b, n, c, r = 2, 9, 8, 2
    x, metric, size = torch.randn(b, n, c), torch.randn(b, n, 4), torch.ones(b, n, 1)
    a, bb, lnw, lnb = torch.randn(r, 1), torch.randn(1, c), torch.ones(c), torch.zeros(c)
    tmap = torch.arange(n).repeat(b, 1) // 2
    calls = {
        "size_shape": (lambda: kernel(kbe, "tome_merge")(x, metric, r, size[:, :5], False, False), "size"),
        "size_device_dtype": (lambda: kernel(kbe, "merge_wavg")(x, size.long(), tmap, 5), "size"),
        "a_shape": (lambda: kernel(kbe, "pyra_merge")(x, metric, r, a[:1], bb, lnw, lnb, None, False, False, 1e-5),
                    "a"),
        "b_shape": (lambda: kernel(kbe, "pyra_merge")(x, metric, r, a, bb[:, :3], lnw, lnb, None, False, False, 1e-5),
                    "b"),
        "lnw_shape": (lambda: kernel(kbe, "pyra_merge")(x, metric, r, a, bb, lnw[:3], lnb, None, False, False, 1e-5),
                      "ln_weight"),
        "eps_nan": (lambda: kernel(kbe, "pyra_merge")(x, metric, r, a, bb, lnw, lnb, None, False, False, NAN), "eps"),
        "eps_zero": (lambda: kernel(kbe, "pyra_merge")(x, metric, r, a, bb, lnw, lnb, None, False, False, 0.0), "eps"),
        "map_shape": (lambda: kernel(kbe, "merge_sum")(x, tmap[:, :4], 5), "token_map"),
        "map_dtype": (lambda: kernel(kbe, "merge_sum")(x, tmap.int(), 5), "token_map"),
        "n_out": (lambda: kernel(kbe, "merge_sum")(x, tmap, -1), "n_out"),
        "x_dtype": (lambda: kernel(kbe, "merge_sum")(x.int(), tmap, 5), "x"),
        "metric_batch": (lambda: kernel(kbe, "tome_merge")(x, metric[:1], r, None, False, False), "metric"),
    }
    call, what = calls[case]
    with pytest.raises(BAD, match=what):
        call()


@pytest.mark.parametrize("entry", [5, 1000, -2, -(2 ** 40)])
def test_out_of_range_token_maps_raise(be, entry):
    """Every backend raises on a token-map entry outside [-1, n_out), naming token_map (the CUDA
    kernels used to skip such entries silently)."""
    b, n, c, n_out = 2, 9, 4, 5
    x, size = torch.randn(b, n, c), torch.ones(b, n, 1)
    tmap = torch.arange(n).repeat(b, 1) // 2
    tmap[1, 3] = entry
    y = torch.randn(b, n_out, c)
    calls = [lambda: merge_sum(be, x, tmap, n_out), lambda: merge_wavg(be, x, size, tmap, n_out),
             lambda: unmerge(be, y, tmap)]
    if be != "reference":
        calls.append(lambda: kernel(be, "merge_wavg_backward")(y, size, torch.ones(b, n_out, 1), tmap))
    for call in calls:
        with pytest.raises(BAD, match="token_map"):
            call()


# ----------------------------------------------------------------------------- FPET numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fpet_zero_norm_metric_rows_have_finite_gradients(be, dtype):
    """A metric row of zero norm: the gradient there is 0 (not dn / 1e-12, inf in float16), and every
    metric gradient is finite, in half precision too."""
    torch.manual_seed(1)
    p, h, w = 1, 4, 4
    x = torch.randn(2, 17, 8).to(dtype)
    metric = torch.randn(2, 17, 8).to(dtype)
    metric[0, 5] = 0  # an A cell
    metric[1, 6] = 0  # a B cell
    size = torch.ones(2, 17, 1)
    gx, gm, gs = fpet_grads(be, x, metric, size, p, h, w)
    assert torch.isfinite(gm.float()).all() and torch.isfinite(gx.float()).all()
    assert torch.equal(gm[0, 5].float(), torch.zeros(8)) and torch.equal(gm[1, 6].float(), torch.zeros(8))
    ref = fpet_grads("reference", x.float(), metric.float(), size, p, h, w)
    torch.testing.assert_close(gm.float(), ref[1], atol=0.05, rtol=0.05)


def _near_tie_metric():
    """A 2 x 3 grid (A = cells (0,0), (0,2), (1,1); B = (1,0), (0,1), (1,2)) where A cell (0,0) scores
    exactly 1 against B 0 and 1 - 2^-23 against B 1: top1 - top2 = 1.2e-7, where
    sigmoid((top1 - top2) / 2) rounds to exactly 0.5 in float32."""
    t = 2.0 ** -11
    rows = {0: (1, 0, 0), 3: (1, 0, 0), 1: (1, t, 0), 5: (0, 0, 1), 2: (0, 0, 1), 4: (0, 1, 0)}
    return torch.tensor([[rows[k] for k in range(6)]], dtype=torch.float32)


def test_fpet_hard_match_is_top1_greater_than_top2(be):
    metric = _near_tie_metric()
    x = torch.randn(1, 6, 4)
    s = fpet_ops.normalize(metric)
    assert s[0, 0] @ s[0, 3] > s[0, 0] @ s[0, 1]  # the two top scores differ (by one float32 step)
    _, osz, tmap = fpet_merge(be, x, metric, grid=(2, 3))
    assert tmap[0, 0].item() == 0, "A cell (0,0) must merge into its best B cell: top1 > top2"
    assert osz.sum().item() == 6  # no token vanished
    # exact tie: no match, the token is dropped with its size
    metric2 = metric.clone()
    metric2[0, 1] = metric2[0, 3]
    _, osz2, tmap2 = fpet_merge(be, x, metric2, grid=(2, 3))
    assert tmap2[0, 0].item() == -1 and osz2.sum().item() == 6 - (tmap2 == -1).sum().item()


def test_fpet_gradients_at_exact_ties_follow_the_lowest_index(be):
    """Duplicated B rows tie exactly: "the two top entries" are the lowest-index ones in the
    reference's backward too (it used topk), so every backend has the reference's gradients."""
    torch.manual_seed(2)
    p, h, w = 0, 4, 4
    metric = torch.randn(2, 16, 6)
    a_idx, b_idx = fpet_ops.checkerboard(p, h, w)
    metric[:, b_idx[3]] = metric[:, b_idx[1]]
    metric[:, b_idx[5]] = metric[:, b_idx[1]]
    metric[:, a_idx[2]] = metric[:, b_idx[1]] * 2  # its best column ties three ways
    x, size = torch.randn(2, 16, 5), torch.rand(2, 16, 1) + 0.5
    got = fpet_grads(be, x, metric, size, p, h, w)
    ref = fpet_grads("reference", x, metric, size, p, h, w)
    for g, r, name in zip(got, ref, ("x", "metric", "size")):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_fpet_nan_metric_rule(be):
    """FPET with NaN in the metric: NaN scores are skipped; every backend equals the reference."""
    torch.manual_seed(3)
    x, metric = torch.randn(2, 17, 6), torch.randn(2, 17, 4)
    metric[0, 1] = NAN   # an A token (cell (0, 0)): matches nothing, dropped
    metric[1, 2] = NAN   # a B token: receives nothing
    metric[1, 9, 1] = INF
    out, osz, tmap = fpet_merge(be, x, metric, p=1)
    rout, rosz, rtmap = fpet_merge("reference", x, metric, p=1)
    assert torch.equal(tmap, rtmap)
    torch.testing.assert_close(out, rout, atol=1e-6, rtol=1e-6)
    assert torch.equal(osz, rosz) and torch.isfinite(out).all()
    assert tmap[0, 1].item() == -1
    gx, gm, gs = fpet_grads(be, x, metric, torch.ones(2, 17, 1), 1, 4, 4)
    _, rgm, _ = fpet_grads("reference", x, metric, torch.ones(2, 17, 1), 1, 4, 4)
    assert torch.isfinite(gm).all()
    torch.testing.assert_close(gm, rgm, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- non-finite tokens
def test_a_non_finite_token_reaches_only_its_own_row_merge_maps(be):
    b, n, c, n_out = 2, 12, 5, 6
    x = torch.randn(b, n, c)
    tmap = torch.tensor([[0, 1, 0, -1, 2, 2, 3, 4, -1, 5, 5, 1]] * b)
    x[0, 3] = INF    # dropped: reaches nothing
    x[1, 8, 2] = NAN  # dropped
    x[0, 6] = -INF   # row 3 only
    clean = torch.where(torch.isfinite(x), x, 0)
    for got, ref in ((merge_sum(be, x, tmap, n_out), merge_sum("reference", clean, tmap, n_out)),
                     (merge_wavg(be, x, None, tmap, n_out)[0], merge_wavg("reference", clean, None, tmap, n_out)[0])):
        bad = ~torch.isfinite(got).all(-1)
        expect = torch.zeros(b, n_out, dtype=torch.bool)
        expect[0, 3] = True
        assert torch.equal(bad, expect)
        torch.testing.assert_close(got[~expect], ref[~expect], atol=1e-6, rtol=1e-6)


def test_a_non_finite_token_reaches_only_its_own_row_tome_and_fpet(be):
    torch.manual_seed(4)
    x, metric = torch.randn(2, 17, 6), torch.randn(2, 17, 4)
    x[1, 4] = INF
    out, _, tmap, _ = tome_merge(be, x, metric, 6, None, True)
    bad = ~torch.isfinite(out).all(-1)
    assert bad.sum() == 1 and bad[1, tmap[1, 4]]
    # FPET: an A token dropped on an exact tie holding inf makes no output non-finite
    metric = torch.randn(1, 17, 4)
    a_idx, b_idx = fpet_ops.checkerboard(1, 4, 4)
    metric[0, b_idx[2]] = metric[0, b_idx[4]]
    metric[0, a_idx[0]] = metric[0, b_idx[2]]
    x = torch.randn(1, 17, 6)
    x[0, a_idx[0]] = INF
    out, osz, tmap = fpet_merge(be, x, metric, p=1)
    assert tmap[0, a_idx[0]].item() == -1 and torch.isfinite(out).all()


def test_class_token_is_never_merged_with_a_nan_metric(be):
    """All-NaN metric (float16 keys that overflowed): the class token stays (Triton merged it)."""
    x = torch.randn(1, 9, 3)
    metric = torch.full((1, 9, 3), NAN)
    _, _, tmap, src = tome_merge(be, x, metric, 4, None, True)
    rtmap = tome_merge("reference", x, metric, 4, None, True)[2]
    assert 0 not in src.tolist()[0] and tmap[0, 0].item() == 0
    assert torch.equal(tmap, rtmap)


def test_pyra_masked_lanes_with_non_finite_channel_weights(be):
    """A non-finite wc (here NaN from inf - inf) reaches only the destinations that receive sources."""
    torch.manual_seed(5)
    x, metric = torch.randn(2, 11, 8), torch.randn(2, 11, 4)
    r = 2
    a, b = torch.tensor([[1.0], [-1.0]]), torch.randn(1, 8)
    lnw, lnb = torch.ones(8), torch.full((8,), INF)
    out, osz = pyra_merge(be, x, metric, r, a, b, lnw, lnb, None, True)
    tmap = tome_merge("reference", x, metric, r, None, True)[2]
    nb = 11 // 2
    for i in range(2):
        dst_rows = set(tmap[i, 0::2][tmap[i, 0::2] >= (11 + 1) // 2 - r].tolist())
        for row in range(11 - r):
            if row not in dst_rows:
                assert torch.isfinite(out[i, row]).all(), (be, i, row)
    assert nb > 0
    with pytest.raises(BAD, match="eps"):
        pyra_merge(be, x, metric, r, a, b, lnw, torch.zeros(8), None, True, eps=NAN)


# ----------------------------------------------------------------------------- sizes and r
def test_r0_is_the_identity_bit_for_bit(be):
    x = torch.randn(2, 9, 5) * 1.7
    metric, size = torch.randn(2, 9, 4), torch.full((2, 9, 1), 3.0)
    size[0, 2] = 0.0
    out, osz, tmap, _ = tome_merge(be, x, metric, 0, size, True)
    assert torch.equal(out, x) and torch.equal(osz, size) and torch.equal(tmap, torch.arange(9).repeat(2, 1))
    a, b, lnw, lnb = torch.zeros(0, 1), torch.randn(1, 5), torch.ones(5), torch.zeros(5)
    out, osz = pyra_merge(be, x, metric, 0, a, b, lnw, lnb, size, True)
    assert torch.equal(out, x) and torch.equal(osz, size)
    if be != "cuda":
        assert fk.tome_merge(x, metric, 0, size, True, backend=be)[0] is x  # x itself


def test_merged_rows_whose_sizes_sum_to_zero_are_zero(be):
    b, n, c, n_out = 1, 6, 3, 3
    x = torch.randn(b, n, c)
    size = torch.tensor([[[1.0], [-1.0], [2.0], [0.0], [1.0], [1.0]]])
    tmap = torch.tensor([[0, 0, 1, 2, 1, -1]])
    out, osz = merge_wavg(be, x, size, tmap, n_out)
    assert torch.equal(out[0, 0], torch.zeros(c)) and torch.equal(out[0, 2], torch.zeros(c))
    assert osz[0, :, 0].tolist() == [0.0, 3.0, 0.0]
    # tome_merge / fpet_merge with zero sizes: zero rows, never NaN
    torch.manual_seed(6)
    x, metric = torch.randn(2, 17, 4), torch.randn(2, 17, 4)
    size = torch.zeros(2, 17, 1)
    for got in (tome_merge(be, x, metric, 4, size, True)[:2], fpet_merge(be, x, metric, size, p=1)[:2]):
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[1], torch.zeros_like(got[1]))


def test_merge_wavg_with_zero_channels_writes_sizes(be):
    tmap = torch.tensor([[0, 1, 0, -1, 1, 2]])
    size = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]])
    out, osz = merge_wavg(be, torch.randn(1, 6, 0), size, tmap, 3)
    assert out.shape == (1, 3, 0) and osz[0, :, 0].tolist() == [4.0, 7.0, 6.0]


def test_distillation_token_is_never_a_destination(be):
    """N = 3 with a distillation token: its only B token is protected, so r is capped at 0 and
    token 0 is not merged into the distillation token."""
    x, metric = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out, osz, tmap, src = tome_merge(be, x, metric, 1, None, False, True)
    assert src.shape[1] == 0 and out.shape == (2, 3, 4) and torch.equal(out, x)
    assert fk.ops.tome.cap_r(1, 3, False, True) == 0 and fk.ops.tome.cap_r(2, 5, False, True) == 2


# ----------------------------------------------------------------------------- misuse and messages
def test_misuse_is_rejected_with_clear_messages():
    torch.manual_seed(7)
    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    merge, unmerge_fn = fk.bipartite_soft_matching(metric, 4, True)
    with pytest.raises(ValueError, match="batch size"):
        fk.merge_wavg(merge, x[:1])
    with pytest.raises(ValueError, match="batch size"):
        merge(x[:1])
    with pytest.raises(ValueError, match="tokens"):
        unmerge_fn(torch.randn(2, 17, 8))  # the merged tensor has 13 tokens
    fmerge = fk.bipartite_diff_matching(metric[:1], True)
    with pytest.raises(ValueError, match="batch size"):
        fmerge(x)
    with pytest.raises(ValueError, match="batch size"):
        fk.merge_wavg(fmerge, x)
    m = fk.tome_match(metric, 4, True)
    with pytest.raises(ValueError, match="batch"):
        fk.compose_token_map(torch.zeros(1, 17, dtype=torch.long), m)
    bad = torch.zeros(2, 17, dtype=torch.long)
    bad[0, 3] = -2
    with pytest.raises(ValueError, match="token_map"):
        fk.compose_token_map(bad, m)
    with pytest.raises(ValueError, match="backend"):
        fk.tome_merge(x, metric, 4, backend="bogus")
    with pytest.raises(ValueError, match="backend"):
        fk.bipartite_diff_matching(metric, True, backend="bogus")
    with pytest.raises(ValueError, match="source"):
        fk.merge_source(merge, x, source=torch.randn(2, 5, 17))
    with pytest.raises(ValueError, match="eps"):
        fk.pyra_merge(x, metric, 2, torch.zeros(2, 1), torch.zeros(1, 8), torch.ones(8), torch.zeros(8), eps=NAN)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float64_on_a_kernel_backend_names_the_tensor(backend):
    _need(backend)
    x, metric = torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    with pytest.raises(TypeError, match="metric is torch.float64"):
        fk.tome_merge(x, metric.double(), 2, backend=backend)
    with pytest.raises(TypeError, match="size is torch.float64"):
        fk.fpet_merge(x, metric, torch.ones(2, 9, 1, dtype=torch.float64), True, backend=backend)


def test_r_is_capped_before_any_kernel():
    x, metric = torch.randn(2, 9, 8), torch.randn(2, 9, 4)
    for be in ("reference",) + tuple(b for b in ("cpu", "triton") if _live(b)):
        out, _, m = fk.tome_merge(x, metric, 100, None, True, backend=be)
        assert out.shape[1] == 9 - 4 and m.src_idx.shape[1] == 4
    assert math.isclose(fk.ops.tome.cap_r(100, 9, True, False), 4)


def test_reference_checks_its_arguments():
    """The reference (the registered op's "reference" body) names the argument, no raw gather /
    arange / broadcast error."""
    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    with pytest.raises(ValueError, match="num_prefix"):
        fpet_ops.fpet_merge_reference(x, metric, None, -1, 4, 4)
    with pytest.raises(ValueError, match="H"):
        fpet_ops.fpet_merge_reference(x, metric, None, 1, -4, -4)
    tmap = torch.zeros(2, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="token_map"):
        tome_ops.merge_wavg_reference(x, None, tmap[:1], 3)
    with pytest.raises(TypeError, match="token_map"):
        tome_ops.merge_sum_reference(x, tmap.int(), 3)
    with pytest.raises(ValueError, match="size"):
        tome_ops.merge_wavg_reference(x, torch.ones(2, 5, 1), tmap, 3)
    with pytest.raises(ValueError, match="n_out"):
        tome_ops.merge_sum_reference(x, tmap, -1)
    with pytest.raises(ValueError, match="out_size"):
        tome_ops.merge_wavg_backward_reference(torch.randn(2, 3, 8), None, torch.ones(2, 4, 1), tmap)


# ----------------------------------------------------------------------------- issue 18 (op level)
def _pyra_grads(be, x, metric, r, a, bb, lnw, lnb, size, seed=0):
    """(out, out_size, grad_x, grad_a, grad_b, grad_ln_weight, grad_ln_bias, grad_size) of
    sum(out * g) + sum(out_size * gs), class token on."""
    g = torch.Generator().manual_seed(seed)
    if be == "cuda":
        out, osz, src, dst, unm, _ = torch.ops.fpet_simt.pyra_merge(x, metric, r, a, bb, lnw, lnb, size, True, False,
                                                                    1e-5)
        go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
        grads = torch.ops.fpet_simt.pyra_merge_backward(go, gs, x, size, out, osz, src, dst, unm, a, bb, lnw, lnb,
                                                        1e-5, False)
        return (out, osz) + tuple(grads)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, bb, lnw, lnb, size)]
    xs, as_, bs, ws, bis, ss = leaves
    out, osz = fk.pyra_merge(xs, metric, r, as_, bs, ws, bis, ss, True, backend=be)
    go, gs = torch.randn(out.shape, generator=g), torch.randn(osz.shape, generator=g)
    ((out * go).sum() + (osz * gs).sum()).backward()
    return (out.detach(), osz.detach()) + tuple(t.grad for t in leaves)


def test_pyra_rows_whose_sizes_sum_to_zero_are_zero_with_finite_gradients(be):
    """PYRA at merged rows whose sizes sum to 0: the row is 0 (as merge_wavg / tome_merge) in the forward,
    and every gradient is finite and the same on every backend (the backward used to divide by 0)."""
    torch.manual_seed(11)
    b, n, c, r = 2, 13, 6, 4
    x, metric = torch.randn(b, n, c), torch.randn(b, n, 5)
    a, bb, lnw, lnb = torch.randn(r, 1), torch.randn(1, c), 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c)
    size = torch.rand(b, n, 1) + 0.5
    size[0] = 0.0  # image 0: every row's sizes sum to 0
    size[1, 1::2] = 0.0  # image 1: B rows of size 0 (zero unless a source of nonzero size joins them)
    got = _pyra_grads(be, x, metric, r, a, bb, lnw, lnb, size)
    out, osz = got[:2]
    zero = osz[..., 0] == 0
    assert zero[0].all() and zero[1].any()
    assert torch.equal(out[zero], torch.zeros_like(out[zero]))
    for t, what in zip(got, ("out", "out_size", "grad_x", "grad_a", "grad_b", "grad_ln_weight", "grad_ln_bias",
                             "grad_size")):
        assert torch.isfinite(t).all(), what
    if be != "reference":
        ref = _pyra_grads("reference", x, metric, r, a, bb, lnw, lnb, size)
        for t, e, what in zip(got, ref, ("out", "out_size", "grad_x", "grad_a", "grad_b", "grad_ln_weight",
                                         "grad_ln_bias", "grad_size")):
            torch.testing.assert_close(t.float(), e.float(), atol=1e-4, rtol=1e-4, msg=what)


@pytest.mark.parametrize("n_out", [2 ** 40, 2 ** 31, -(2 ** 40)])
def test_n_out_is_bounded_before_allocating(be, n_out):
    """merge_wavg / merge_sum with an absurd n_out: a clear error naming n_out on every kernel entry,
    not an allocation of B * n_out * C elements."""
    x, size = torch.randn(2, 9, 4), torch.ones(2, 9, 1)
    tmap = torch.arange(9).repeat(2, 1) // 2
    with pytest.raises(BAD, match="n_out"):
        merge_wavg(be, x, size, tmap, n_out)
    with pytest.raises(BAD, match="n_out"):
        merge_sum(be, x, tmap, n_out)


@pytest.mark.parametrize("case", ["rows0-size", "cols-size", "batch-size", "heads0", "heads-neg", "heads-float",
                                  "qkv-dim", "qkv-rank", "qkv-int", "size-int", "size-device", "scale-nan",
                                  "scale-inf", "scale-zero", "pad-int", "qkv-empty-channels"])
def test_attention_inputs_triton_checks_its_arguments(case):
    """The Triton kernel entry of attention_inputs: every bad argument a clear error naming it (it used to
    launch on any of these: out-of-bounds reads of size, a 0-row qkv with a size, division by 0)."""
    _need("triton")
    from fpet_kernels.ops import attention_triton
    heads, hd, n = 2, 8, 9
    qkv, size = torch.randn(2, n, 3 * heads * hd), torch.rand(2, n, 1) + 0.5
    calls = {
        "rows0-size": (lambda: (qkv[:, :0], size, heads, 0.5, False), "size"),
        "cols-size": (lambda: (qkv, size[:, :3], heads, 0.5, True), "size"),
        "batch-size": (lambda: (qkv, size[:1], heads, 0.5, True), "size"),
        "heads0": (lambda: (qkv, size, 0, 0.5, True), "num_heads"),
        "heads-neg": (lambda: (qkv, size, -2, 0.5, True), "num_heads"),
        "heads-float": (lambda: (qkv, size, 2.0, 0.5, True), "num_heads"),
        "qkv-dim": (lambda: (qkv[..., :-1], size, heads, 0.5, True), "qkv"),
        "qkv-rank": (lambda: (qkv[0], size, heads, 0.5, True), "qkv"),
        "qkv-int": (lambda: (qkv.long(), size, heads, 0.5, True), "qkv"),
        "size-int": (lambda: (qkv, size.long(), heads, 0.5, True), "size"),
        "size-device": (lambda: (qkv, size.to("meta"), heads, 0.5, True), "size"),
        "scale-nan": (lambda: (qkv, size, heads, NAN, True), "scale"),
        "scale-inf": (lambda: (qkv, size, heads, INF, True), "scale"),
        "scale-zero": (lambda: (qkv, size, heads, 0.0, True), "scale"),
        "pad-int": (lambda: (qkv, size, heads, 0.5, 1), "pad_v"),
        "qkv-empty-channels": (lambda: (qkv[..., :0], None, heads, 0.5, False), "qkv"),
    }
    args, what = calls[case]
    with pytest.raises(BAD, match=what):
        attention_triton.attention_inputs(*args())
    with pytest.raises(BAD, match=what):  # the public function: the same rules
        fk.attention_inputs(*args(), backend="triton")


def test_attention_inputs_triton_zero_rows_and_batch():
    _need("triton")
    from fpet_kernels.ops import attention_triton
    for qkv, size in ((torch.randn(0, 5, 12), torch.ones(0, 5, 1)), (torch.randn(2, 0, 12), torch.ones(2, 0, 1))):
        q, k, v, m = attention_triton.attention_inputs(qkv, size, 2, 0.5, True)
        assert q.shape == (qkv.shape[0], 2, qkv.shape[1], 8) and m.shape == (qkv.shape[0], qkv.shape[1], 2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("scale", [NAN, INF, -INF, 10 ** 400])
def test_xpeft_scale_must_be_finite(backend, scale):
    if backend != "reference":
        _need(backend)
    x, profile = torch.randn(2, 3, 4), torch.tensor([0, 1])
    down, db, up, ub = torch.randn(2, 4, 3), torch.randn(2, 3), torch.randn(2, 3, 4), torch.randn(2, 4)
    from fpet_kernels.ops.xpeft import xpeft_adapter
    with pytest.raises(ValueError, match="scale"):
        xpeft_adapter(x, profile, down, db, up, ub, scale=scale, backend=backend)
    if backend == "cpu" and scale != 10 ** 400:  # the C++ kernel itself
        with pytest.raises(RuntimeError, match="scale must be a finite number"):
            torch.ops.fpet.xpeft_adapter(x, None, profile, down, db, up, ub, scale)


def test_cpp_messages_name_the_public_argument():
    """The C++ CPU kernels name the op's arguments, never their own locals (``b_``, ``out_size_``, ``*t``)."""
    _need("cpu")
    b, n, c, r = 2, 9, 8, 2
    x, metric = torch.randn(b, n, c), torch.randn(b, n, 4)
    a, bb, lnw, lnb = torch.randn(r, 1), torch.randn(1, c), torch.ones(c), torch.zeros(c)
    tmap = torch.arange(n).repeat(b, 1) // 2
    profile = torch.tensor([0, 0])
    down, db, up, ub = torch.randn(1, c, 3), torch.randn(1, 3), torch.randn(1, 3, c), torch.randn(1, c)
    out, osz, tm = torch.ops.fpet.fpet_merge(x, metric, None, 1, 2, 4)
    calls = [
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a, bb.long(), lnw, lnb, None, False, False, 1e-5), "b"),
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a.long(), bb, lnw, lnb, None, False, False, 1e-5), "a"),
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a, bb, lnw.long(), lnb, None, False, False, 1e-5),
         "ln_weight"),
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a, bb, lnw, lnb.long(), None, False, False, 1e-5),
         "ln_bias"),
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a[:1], bb, lnw, lnb, None, False, False, 1e-5), "a"),
        (lambda: torch.ops.fpet.pyra_merge(x, metric, r, a, bb[:, :3], lnw, lnb, None, False, False, 1e-5), "b"),
        (lambda: torch.ops.fpet.xpeft_adapter(x, None, profile, down.long(), db, up, ub, 1.0), "down"),
        (lambda: torch.ops.fpet.xpeft_adapter(x, None, profile, down, db.int(), up, ub, 1.0), "down_bias"),
        (lambda: torch.ops.fpet.xpeft_adapter(x, None, profile, down, db, up.long(), ub, 1.0), "up"),
        (lambda: torch.ops.fpet.xpeft_adapter(x, None, profile, down, db, up, ub.long(), 1.0), "up_bias"),
        (lambda: torch.ops.fpet.merge_wavg_backward(x[:, :5], None, torch.ones(b, 4, 1), tmap), "out_size"),
        (lambda: torch.ops.fpet.merge_wavg_backward(x[:, :5].long(), None, torch.ones(b, 5, 1), tmap), "grad_out"),
        (lambda: torch.ops.fpet.merge_sum(x.long(), tmap, 5), "x"),
        (lambda: torch.ops.fpet.unmerge(x.long(), tmap), "y"),
        (lambda: torch.ops.fpet.fpet_merge_backward(out[:, :2], None, x, metric, None, out, osz, tm, 1, 2, 4),
         "grad_out"),
        (lambda: torch.ops.fpet.fpet_merge_backward(out, None, x, metric, None, out, osz[:, :2], tm, 1, 2, 4),
         "out_size"),
        (lambda: torch.ops.fpet.fpet_merge_backward(out, None, x, metric, None, out.long(), osz, tm, 1, 2, 4), "out"),
    ]
    for call, what in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        msg = str(info.value).splitlines()[0]
        assert re.search(rf"(?<![A-Za-z_*]){re.escape(what)}(?![A-Za-z_])", msg), msg
        assert not re.search(r"\*t\b|\b[a-z_]+_ must\b", msg), msg


@pytest.mark.parametrize("backend,key", [("cpu", "attention_inputs-cpu"), ("cuda", "attention_inputs-cuda")])
def test_attention_inputs_says_once_when_it_runs_pytorch_for_a_backend(backend, key):
    """A backend attention_inputs has no kernel for runs the PyTorch formulation and says so once."""
    from fpet_kernels.ops import _backend
    _backend.STATE.warned.discard(key)
    qkv = torch.randn(2, 5, 12)
    with pytest.warns(RuntimeWarning, match=f"attention_inputs has no {backend} kernel"):
        got = fk.attention_inputs(qkv, None, 2, 0.5, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fk.attention_inputs(qkv, None, 2, 0.5, backend=backend)
        fk.attention_inputs(qkv, None, 2, 0.5)  # CPU tensors, automatic: PyTorch is the implementation
        fk.attention_inputs(qkv, None, 2, 0.5, backend="reference")
    exp = fk.ops.attention.attention_inputs_reference(qkv, None, 2, 0.5, False)
    for g, h, e in zip(got, again, exp):
        assert torch.equal(g, e) and torch.equal(h, e)


def test_attention_inputs_says_once_that_triton_has_no_backward():
    _need("triton")
    from fpet_kernels.ops import _backend
    _backend.STATE.warned.discard("attention_inputs-triton-grad")
    qkv = torch.randn(2, 5, 12, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="Triton kernel of attention_inputs has no backward"):
        q, k, v, m = fk.attention_inputs(qkv, torch.ones(2, 5, 1), 2, 0.5, backend="triton")
    (q.sum() + k.sum() + v.sum() + m.sum()).backward()
    assert qkv.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.attention_inputs(qkv, torch.ones(2, 5, 1), 2, 0.5, backend="triton")
        with torch.no_grad():  # no gradient: the kernel, silently
            fk.attention_inputs(qkv, torch.ones(2, 5, 1), 2, 0.5, backend="triton")
