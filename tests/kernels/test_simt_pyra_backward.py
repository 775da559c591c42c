"""The CUDA kernels of PYRA's backward (csrc/cuda/pyra_merge_backward.cuh), run on the host by the
SIMT emulator (``torch.ops.fpet_simt.pyra_merge_backward``), against the CPU kernel
(``torch.ops.fpet.pyra_merge_backward``) in every emulator configuration.

The sums over channels run in another order than the CPU kernel's (row_sums lanes), and grad_size is one
fused sum of ``g_z x - g_num out`` where the CPU kernel takes two dot products, so float32 agrees to a
few ulps of each gradient's scale, not bitwise.
"""
from __future__ import annotations

import pytest
import torch

import fpet_kernels  # noqa: F401  (loads the extension and its libraries)
from fpet_kernels.ops import pyra as pyra_ops

# Every test runs in every configuration of conftest.py's ``simt`` fixture (and is skipped, or
# fails under FPET_REQUIRE_EXTENSION=1, when the host build of the CUDA kernels is missing).
pytestmark = pytest.mark.usefixtures("simt")

SIMT = torch.ops.fpet_simt
CPU = torch.ops.fpet

GRADS = ("x", "a", "b", "ln_weight", "ln_bias", "size")
TOLS = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLAGS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="cls"),
         pytest.param(True, True, id="cls+dist"), pytest.param(False, True, id="dist")]


def make(bsz, n, c, r, cls, dist, dtype=torch.float32, pdtype=torch.float32, with_size=True, with_gsize=True,
         seed=0, eps=1e-5):
    """The backward's arguments, with the matching and output of the CPU forward kernel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, c, generator=g).to(dtype)
    metric = torch.randn(bsz, n, 8, generator=g)
    size = torch.randint(1, 5, (bsz, n, 1), generator=g).to(dtype) if with_size else None
    a = torch.randn(r, 1, generator=g).to(pdtype)
    b = (0.5 * torch.randn(1, c, generator=g)).to(pdtype)
    lnw = (1 + 0.2 * torch.randn(c, generator=g)).to(pdtype)
    lnb = (0.1 * torch.randn(c, generator=g)).to(pdtype)
    out, out_size, src, dst, unm, _ = CPU.pyra_merge(x, metric, r, a, b, lnw, lnb, size, cls, dist, eps)
    grad_out = torch.randn(bsz, n - r, c, generator=g).to(dtype)
    grad_out_size = torch.randn(bsz, n - r, 1, generator=g) if with_gsize else None
    return (grad_out, grad_out_size, x, size, out, out_size, src, dst, unm, a, b, lnw, lnb, eps, dist)


def check(args, tol=TOLS[torch.float32]):
    got = SIMT.pyra_merge_backward(*args)
    exp = CPU.pyra_merge_backward(*args)
    for name, u, v in zip(GRADS, got, exp):
        assert u.shape == v.shape and u.dtype == v.dtype, f"grad {name}: {u.shape}/{u.dtype} vs {v.shape}/{v.dtype}"
        if v.numel():
            scale = max(1.0, v.abs().max().item())
            torch.testing.assert_close(u, v, atol=tol * scale, rtol=tol, msg=lambda m: f"grad {name}: {m}")
    return got


def r_eff(kind, n, cls, dist):
    cap = max(0, (n - int(cls) - int(dist)) // 2)
    return min({"0": 0, "1": 1, "16": 16, "max": cap}[kind], cap)


@pytest.mark.parametrize("cls,dist", FLAGS)
@pytest.mark.parametrize("r_kind", ["0", "1", "16", "max"])
def test_backward_matches_cpu(r_kind, cls, dist):
    bsz, n, c = 2, 65, 37  # odd N and C; 65 tokens: three token blocks per image
    r = r_eff(r_kind, n, cls, dist)
    check(make(bsz, n, c, r, cls, dist, seed=1))
    check(make(bsz, n, c, r, cls, dist, with_size=False, with_gsize=False, seed=2))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("pdtype", [pytest.param(torch.float32, id="p32"), pytest.param(torch.bfloat16, id="pbf16")])
def test_backward_half_dtypes(dtype, pdtype):
    args = make(2, 40, 24, 12, True, False, dtype, pdtype, seed=3)
    check(args, tol=TOLS[dtype])


@pytest.mark.parametrize("bsz,n,c,r", [pytest.param(1, 197, 64, 16, id="vit"), pytest.param(5, 24, 40, 11, id="B>sms"),
                                       pytest.param(1, 50, 300, 24, id="wide")])
def test_backward_shapes(bsz, n, c, r):
    check(make(bsz, n, c, r, True, False, seed=4))


def test_backward_equals_reference():
    """The emulated CUDA kernel against the closed-form reference too (not only the CPU kernel)."""
    args = make(2, 33, 20, 9, True, True, seed=5)
    got = SIMT.pyra_merge_backward(*args)
    exp = pyra_ops.pyra_merge_backward_reference(*args)
    for name, u, v in zip(GRADS, got, exp):
        scale = max(1.0, v.abs().max().item())
        torch.testing.assert_close(u, v, atol=3e-5 * scale, rtol=3e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_backward_tiny_n(n):
    for cls, dist in ((False, False), (True, False), (True, True)):
        cap = max(0, (n - int(cls) - int(dist)) // 2)
        for r in sorted({0, cap}):
            check(make(1, n, 5, r, cls, dist, seed=n))


def test_backward_empty_batch():
    gx, ga, gb, gw, gbias, gs = check(make(0, 13, 8, 4, True, False))
    assert gx.shape == (0, 13, 8) and torch.equal(ga, torch.zeros(4, 1))


def test_backward_deterministic():
    args = make(3, 41, 48, 12, True, False, seed=6)
    for u, v in zip(SIMT.pyra_merge_backward(*args), SIMT.pyra_merge_backward(*args)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("i,value,msg", [
    (6, lambda t: t.clone().fill_(99), "src_idx"),
    (7, lambda t: t.clone().fill_(-1), "dst_idx"),
    (8, lambda t: t[:, 1:], "unm_idx must have shape"),
    (9, lambda t: t[1:], r"a must have shape"),
    (12, lambda t: t.double(), "ln_bias must be float32"),
    (0, lambda t: t[:, 1:], "grad_out must have shape"),
])
def test_backward_argument_checks(i, value, msg):
    args = list(make(1, 12, 8, 4, False, False))
    args[i] = value(args[i])
    with pytest.raises(RuntimeError, match=msg):
        SIMT.pyra_merge_backward(*args)
