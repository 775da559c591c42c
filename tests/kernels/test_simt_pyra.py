"""The CUDA kernel of the PYRA merge (the ToMe body of csrc/cuda/tome_merge.cuh with PYRA's
modulation and launcher, csrc/cuda/pyra_merge.cuh), run on the host by the SIMT emulator
(``torch.ops.fpet_simt.pyra_merge``), against the CPU kernel (``torch.ops.fpet.pyra_merge``).

Indices must be equal; merged rows and sizes close (the LayerNorm statistics and the two weights
are sums in another order than the CPU kernel's, so float32 agrees to a few ulps, not bitwise).
"""
from __future__ import annotations

import pytest
import torch

import fpet_kernels  # noqa: F401  (loads the extension and its libraries)


# Every test runs in every configuration of conftest.py's ``simt`` fixture (and is skipped, or
# fails under FPET_REQUIRE_EXTENSION=1, when the host build of the CUDA kernels is missing).
pytestmark = pytest.mark.usefixtures("simt")

SIMT = torch.ops.fpet_simt
CPU = torch.ops.fpet

TOLS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLAGS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="cls"),
         pytest.param(True, True, id="cls+dist"), pytest.param(False, True, id="dist")]


@pytest.fixture
def simt_config(simt):
    """conftest.py's ``simt``: every thread order / block size / multiprocessor count."""
    return simt


def make(bsz, n, c, d, r, dtype=torch.float32, pdtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, c, generator=g).to(dtype)
    metric = torch.randn(bsz, n, d, generator=g).to(dtype)
    size = torch.randint(1, 5, (bsz, n, 1), generator=g).to(dtype)
    a = (0.5 * torch.randn(r, 1, generator=g)).to(pdtype)
    b = (0.2 * torch.randn(1, c, generator=g)).to(pdtype)
    lnw = (1 + 0.1 * torch.randn(c, generator=g)).to(pdtype)
    lnb = (0.1 * torch.randn(c, generator=g)).to(pdtype)
    return x, metric, size, (a, b, lnw, lnb)


def check(x, metric, r, params, size, cls, dist, eps=1e-5, tol=2e-5):
    got = SIMT.pyra_merge(x, metric, r, *params, size, cls, dist, eps)
    ref = CPU.pyra_merge(x, metric, r, *params, size, cls, dist, eps)
    for name, g, e in zip(("src_idx", "dst_idx", "unm_idx", "token_map"), got[2:], ref[2:]):
        assert torch.equal(g, e), name
    assert got[0].dtype == ref[0].dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=tol, rtol=tol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0, msg=lambda m: f"out_size: {m}")
    return got


def r_eff(kind, n, cls, dist):
    cap = max(0, (n - int(cls) - int(dist)) // 2)
    return min({"0": 0, "1": 1, "16": 16, "max": cap}[kind], cap)


@pytest.mark.parametrize("cls,dist", FLAGS)
@pytest.mark.parametrize("r_kind", ["0", "1", "16", "max"])
def test_pyra_matches_cpu(simt_config, r_kind, cls, dist):
    bsz, n, c, d = 2, 65, 37, 12  # odd N and C
    r = r_eff(r_kind, n, cls, dist)
    x, metric, size, params = make(bsz, n, c, d, r)
    check(x, metric, r, params, size, cls, dist)
    check(x, metric, r, params, None, cls, dist)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("pdtype", [pytest.param(torch.float32, id="p32"), pytest.param(torch.bfloat16, id="pbf16")])
def test_pyra_half_dtypes(simt_config, dtype, pdtype):
    bsz, n, c, d = 2, 40, 24, 8
    r = 12
    x, metric, size, params = make(bsz, n, c, d, r, dtype, pdtype, seed=1)
    check(x, metric, r, params, size, True, False, tol=TOLS[dtype])
    check(x, metric, r, params, size.float(), False, False, tol=TOLS[dtype])


@pytest.mark.parametrize("bsz,n,c", [pytest.param(1, 50, 300, id="channel-split"),
                                     pytest.param(6, 24, 40, id="B>sms"),
                                     pytest.param(1, 197, 64, id="vit")])
def test_pyra_shapes(simt_config, bsz, n, c):
    r = min(16, n // 2 - 1)
    x, metric, size, params = make(bsz, n, c, 16, r, seed=2)
    check(x, metric, r, params, size, True, False)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pyra_tiny_n(n):
    for cls, dist in ((False, False), (True, False), (True, True)):
        cap = max(0, (n - int(cls) - int(dist)) // 2)
        for r in sorted({0, cap}):
            x, metric, size, params = make(1, n, 5, 4, r, seed=n)
            check(x, metric, r, params, size, cls, dist)


def test_pyra_r0_is_identity():
    x, metric, size, params = make(2, 20, 9, 4, 0, seed=3)
    out, osz, src, dst, unm, tmap = check(x, metric, 0, params, size, False, False)
    assert src.shape == (2, 0) and torch.equal(tmap, torch.arange(20).expand(2, 20))
    torch.testing.assert_close(out, x)
    assert torch.equal(osz, size)


def test_pyra_eps_and_non_contiguous_params():
    x, metric, size, (a, b, lnw, lnb) = make(2, 30, 16, 8, 7, seed=4)
    a_nc = torch.cat([a, a], 1)[:, :1]
    lnw_nc = torch.stack([lnw, lnw], 1)[:, 0]
    assert not a_nc.is_contiguous() and not lnw_nc.is_contiguous()
    check(x, metric, 7, (a_nc, b, lnw_nc, lnb), size, True, False, eps=0.5)


@pytest.mark.parametrize("which,bad,msg", [
    (0, torch.ones(3, 1), r"a must have shape \[4, 1\]"),
    (1, torch.ones(8), r"b must have shape \[1, 8\]"),
    (2, torch.ones(7), r"ln_weight must have shape \[8\]"),
    (3, torch.ones(8, dtype=torch.float64), "ln_bias must be float32, float16 or bfloat16"),
])
def test_pyra_argument_checks(which, bad, msg):
    x, metric, size, params = make(1, 12, 8, 4, 4)
    params = list(params)
    params[which] = bad
    with pytest.raises(RuntimeError, match=msg):
        SIMT.pyra_merge(x, metric, 4, *params, size, False, False, 1e-5)
    with pytest.raises(RuntimeError, match="r must be in"):
        SIMT.pyra_merge(x, metric, 7, torch.ones(7, 1), *make(1, 12, 8, 4, 4)[3][1:], size, False, False, 1e-5)
