"""The CUDA kernels of PYRA's per-row merge (csrc/cuda/pyra_merge_rows.cuh: the ops ``pyra_merge_rows``
and ``pyra_merge_rows_backward``, padded batches and threshold merging), run on the host by the SIMT
emulator (``torch.ops.fpet_simt``), against the pure-PyTorch reference (values, and gradients from
autograd of ``pyra_merge_rows_op_reference``) and the C++ CPU kernel, in every emulator configuration.

The per-sequence equivalence of the op itself (a padded row equals the row alone through the ordinary
op) is tests/ops/test_padded.py's, on the reference, CPU and Triton; here the emulated CUDA kernel is
held to the reference on the same padded / threshold matchings, so it inherits that equivalence.
"""
from __future__ import annotations

import pytest
import torch

import fpet_kernels  # noqa: F401  (loads the extension and its libraries)
from fpet_kernels.ops.pyra import pyra_merge_rows_op_reference
from fpet_kernels.ops.tome import static_r, static_rows, tome_match_rows_reference, valid_tokens

pytestmark = pytest.mark.usefixtures("simt")

SIMT = torch.ops.fpet_simt
CPU = torch.ops.fpet
GRADS = ("x", "a", "b", "ln_weight", "ln_bias", "size")
TOLS = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(lens, n, c, r, cls=False, dist=False, threshold=None, dtype=torch.float32, seed=0, with_size=True):
    """A right-padded batch (row b: lens[b] valid tokens, garbage after them) and its per-row matching
    (tome_match_rows_reference): the arguments of pyra_merge_rows."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(lens)
    x = torch.randn(bsz, n, c, generator=g)
    metric = torch.randn(bsz, n, 6, generator=g)
    size = (torch.rand(bsz, n, 1, generator=g) * 2.5 + 0.5).round()
    for b, k in enumerate(lens):
        size[b, k:] = 0
        x[b, k:] = 1e3
        metric[b, k:] = torch.nan
    if not with_size:
        size = None
    valid = valid_tokens(size, x)
    src, dst, _, tmap, kept = tome_match_rows_reference(metric, r, cls, dist, valid, threshold)
    n_out = static_rows(n, r, threshold, cls, dist)
    rr = static_r(r, n, cls, dist)
    assert src.shape[1] == rr
    a = torch.randn(rr, 1, generator=g)
    bb = 0.5 * torch.randn(1, c, generator=g)
    lw = 1 + 0.2 * torch.randn(c, generator=g)
    lb = 0.1 * torch.randn(c, generator=g)
    x = x.to(dtype)
    size = None if size is None else size.to(dtype)
    return [x, size, src, dst, tmap, a, bb, lw, lb, n_out, 1e-5], kept


def _close(got, exp, tol, what):
    assert got.shape == exp.shape and got.dtype == exp.dtype, \
        f"{what}: {got.shape}/{got.dtype} vs {exp.shape}/{exp.dtype}"
    if exp.numel():
        scale = max(1.0, exp.abs().max().item())
        torch.testing.assert_close(got, exp, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def check(args, tol=TOLS[torch.float32], seed=1):
    """Forward and backward of the emulated CUDA kernels against the CPU kernels and the reference
    (float64 autograd of the op's reference for the gradients)."""
    out, osz = SIMT.pyra_merge_rows(*args)
    eo, es = CPU.pyra_merge_rows(*args)
    _close(out, eo, tol, "out vs cpu")
    assert torch.equal(osz, es), "out_size: sums of small integers, exact"
    x, size, src, dst, tmap, a, bb, lw, lb, n_out, eps = args
    wide = [t.double().requires_grad_(True) if t is not None else None for t in (x, size, a, bb, lw, lb)]
    xd, sd, ad, bd, lwd, lbd = wide
    ro, rs = pyra_merge_rows_op_reference(xd, sd, src, dst, tmap, ad, bd, lwd, lbd, n_out, eps)
    _close(out.double(), ro.detach(), max(tol, 1e-5), "out vs reference")
    assert torch.isfinite(out).all() and (osz >= 0).all()
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(x.dtype)
    gos = torch.randn(osz.shape, generator=g)
    bargs = (go, gos, x, size, out, osz, src, dst, tmap, a, bb, lw, lb, eps)
    got = SIMT.pyra_merge_rows_backward(*bargs)
    exp = CPU.pyra_merge_rows_backward(*bargs)
    for name, u, v in zip(GRADS, got, exp):
        if name == "size" and size is None:
            continue
        _close(u, v, tol, f"grad {name} vs cpu")
    # the reference: autograd through the op's reference, in float64
    leaves = [t for t in wide if t is not None]
    grads = torch.autograd.grad((ro * go.double()).sum() + (rs * gos.double()).sum(), leaves, allow_unused=True)
    names = [nm for nm, t in zip(("x", "size", "a", "b", "ln_weight", "ln_bias"), wide) if t is not None]
    ref = dict(zip(names, grads))
    for name, u in zip(GRADS, got):
        if name == "size" and size is None:
            continue
        exp_g = ref[name] if ref[name] is not None else torch.zeros_like(u, dtype=torch.float64)
        _close(u.double(), exp_g.view(u.shape), max(tol, 1e-4), f"grad {name} vs reference")
    return out, osz, got


FLAGS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="cls"),
         pytest.param(True, True, id="cls+dist"), pytest.param(False, True, id="dist")]


@pytest.mark.parametrize("cls,dist", FLAGS)
@pytest.mark.parametrize("r", [0, 1, 3, 40])
def test_padded_rows_match_the_reference_and_cpu(r, cls, dist):
    """Rows of different lengths (full, partly padded, one token, fully padded), r per row capped."""
    lens = [21, 13, 1, 0, 6]
    args, kept = make(lens, 21, 19, r, cls, dist, seed=r)
    out, osz, got = check(args)
    assert (out[3] == 0).all() and (osz[3] == 0).all(), "a fully padded row: zeros"
    assert (got[0][3] == 0).all() and (got[5][3] == 0).all(), "a fully padded row: zero gradients"
    for b, k in enumerate(lens):  # padding tokens: zero gradients
        assert (got[0][b, k:] == 0).all() and (got[5][b, k:] == 0).all()
        kk = int(kept[b])
        assert (out[b, kk:] == 0).all() and (osz[b, kk:] == 0).all()


@pytest.mark.parametrize("thr", [1.0, 0.3, -1.0], ids=["nothing", "some", "everything"])
def test_threshold_rows(thr):
    """Threshold merging: rows that merge nothing (input order, x itself), some, or their cap."""
    lens = [16, 11, 16, 0]
    args, kept = make(lens, 16, 12, 8, True, False, threshold=thr, seed=5)
    out, osz, _ = check(args)
    if thr == 1.0:
        x = args[0]
        for b, k in enumerate(lens[:3]):
            if int(kept[b]) == k:  # merged nothing: the tokens themselves
                _close(out[b, :k], x[b, :k], 1e-6, "row that merges nothing")
    if thr == -1.0:
        assert kept.tolist()[:3] == [16 - 7, 11 - 5, 16 - 7]


def test_without_sizes():
    args, _ = make([12, 12], 12, 9, 4, seed=7, with_size=False)
    check(args)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
def test_half_dtypes(dtype):
    args, _ = make([18, 9, 1], 18, 16, 5, True, False, dtype=dtype, seed=3)
    check(args, tol=TOLS[dtype])


def test_non_contiguous_inputs():
    args, _ = make([14, 10, 3], 14, 10, 4, True, False, seed=11)
    x, size, src, dst, tmap, a, bb, lw, lb, n_out, eps = args
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major strides
    srct = src.t().contiguous().t()
    assert not xt.is_contiguous() and not srct.is_contiguous()
    got = SIMT.pyra_merge_rows(xt, size, srct, dst, tmap, a, bb, lw, lb, n_out, eps)
    exp = SIMT.pyra_merge_rows(*args)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_bad_indices_and_shapes_are_errors_naming_the_argument():
    """Direct calls are checked before the launch: nothing is read or written out of bounds."""
    args, _ = make([10, 7], 10, 8, 3, seed=2)
    x, size, src, dst, tmap, a, bb, lw, lb, n_out, eps = args
    cases = [("src_idx entries", 2, src.clone().fill_(5)),  # Na = 5
             ("dst_idx entries", 3, torch.where(src >= 0, 9, dst)),
             ("token_map entries", 4, tmap.clone().fill_(n_out)),
             ("a must have shape", 5, torch.randn(2, 1)),
             ("token_map must be an int64", 4, tmap.int()),
             ("size must have shape", 1, torch.ones(2, 9, 1)),
             ("src_idx must have at most", 2, torch.zeros(2, 6, dtype=torch.int64))]
    for what, pos, bad in cases:
        bad_args = list(args)
        bad_args[pos] = bad
        with pytest.raises(RuntimeError, match=what):
            SIMT.pyra_merge_rows(*bad_args)
    with pytest.raises(RuntimeError, match="n_out must be in"):
        SIMT.pyra_merge_rows(x, size, src, dst, tmap, a, bb, lw, lb, 11, eps)
    out, osz = SIMT.pyra_merge_rows(*args)
    go = torch.randn_like(out)
    with pytest.raises(RuntimeError, match="out must have shape"):
        SIMT.pyra_merge_rows_backward(go, None, x, size, out[:, :-1], osz, src, dst, tmap, a, bb, lw, lb, eps)
    with pytest.raises(RuntimeError, match="token_map entries"):
        SIMT.pyra_merge_rows_backward(go, None, x, size, out, osz, src, dst, tmap.clone().fill_(out.shape[1]), a, bb,
                                      lw, lb, eps)
