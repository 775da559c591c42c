"""The CUDA kernels of the token-map merges (csrc/cuda/merge_wavg.cuh: unmerge, merge_sum,
merge_wavg, merge_wavg_backward), run on the host by the SIMT emulator (``torch.ops.fpet_simt``),
against the CPU kernels (``torch.ops.fpet``).

Both sum every group in ascending input position in float32 and round once to the output dtype,
so the results are equal; the comparison allows a tight tolerance for float32 all the same. Every
case runs in both thread orders (a race shows as a difference), with 256 and 64 threads per block
and a small multiprocessor count (channel split over several blocks per image).
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

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"),
          pytest.param(torch.bfloat16, id="bf16")]
# (B, N, C, n_out): odd C, N = 1, C over several channel tiles and slices, n_out > N (empty rows)
SHAPES = [
    pytest.param(2, 197, 37, 120, id="vit-oddC"),
    pytest.param(1, 1, 5, 1, id="N1"),
    pytest.param(1, 1, 3, 4, id="N1-empty-rows"),
    pytest.param(3, 16, 64, 40, id="nout>N"),
    pytest.param(1, 50, 300, 30, id="C300-split"),
    pytest.param(5, 33, 1, 17, id="C1"),
]


@pytest.fixture
def simt_config(simt):
    """conftest.py's ``simt``: every thread order / block size / multiprocessor count."""
    return simt


def _tol(dtype):
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def assert_same(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    tol = _tol(dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def random_map(bsz, n, n_out, seed, drop=0.2):
    """Entries in [-1, n_out): about `drop` of them -1; destinations skip a few rows (empty rows)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, max(n_out, 1), (bsz, n), generator=g)
    if n_out > 3:  # leave destination 1 and the last one empty
        m = torch.where((m == 1) | (m == n_out - 1), torch.zeros_like(m), m)
    keep = torch.rand(bsz, n, generator=g) >= drop
    if n_out == 0:
        keep = torch.zeros_like(keep)
    return torch.where(keep, m, torch.full_like(m, -1))


def tome_map(bsz, n, c, r, cls=False, dist=False, seed=3):
    metric = torch.randn(bsz, n, c, generator=torch.Generator().manual_seed(seed))
    return CPU.tome_match(metric, r, cls, dist)[3], n - r


def inputs(bsz, n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, c, generator=g).to(dtype)
    size = torch.randint(1, 5, (bsz, n, 1), generator=g).to(dtype)
    return x, size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,n,c,n_out", SHAPES)
def test_merges_random_maps(simt_config, bsz, n, c, n_out, dtype):
    x, size = inputs(bsz, n, c, dtype)
    tmap = random_map(bsz, n, n_out, seed=n + c)
    # merge_sum
    assert_same(SIMT.merge_sum(x, tmap, n_out), CPU.merge_sum(x, tmap, n_out), dtype, "merge_sum")
    # merge_wavg with and without sizes (sizes in another dtype than x too)
    for s in (None, size, size.float(), size.to(torch.bfloat16)):
        out, osz = SIMT.merge_wavg(x, s, tmap, n_out)
        ref, rsz = CPU.merge_wavg(x, s, tmap, n_out)
        assert_same(out, ref, dtype, "merge_wavg out")
        assert osz.dtype == torch.float32
        torch.testing.assert_close(osz, rsz, atol=0, rtol=0)
    # unmerge of merged rows
    y = torch.randn(bsz, n_out, c).to(dtype)
    assert torch.equal(SIMT.unmerge(y, tmap), CPU.unmerge(y, tmap))
    # merge_wavg_backward with the forward's out_size
    g = torch.randn(bsz, n_out, c).to(dtype)
    for s in (None, size):
        _, osz = CPU.merge_wavg(x, s, tmap, n_out)
        assert_same(SIMT.merge_wavg_backward(g, s, osz, tmap), CPU.merge_wavg_backward(g, s, osz, tmap), dtype,
                    "merge_wavg_backward")


@pytest.mark.parametrize("cls,dist", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("r", [0, 1, 16, 98])
def test_merges_tome_maps(simt_config, r, cls, dist):
    bsz, n, c = 2, 197, 24
    r = min(r, (n - int(cls) - int(dist)) // 2)
    tmap, n_out = tome_map(bsz, n, 16, r, cls, dist)
    x, size = inputs(bsz, n, c, torch.float32, seed=5)
    out, osz = SIMT.merge_wavg(x, size, tmap, n_out)
    ref, rsz = CPU.merge_wavg(x, size, tmap, n_out)
    assert_same(out, ref, torch.float32, "merge_wavg")
    assert torch.equal(osz, rsz)
    assert_same(SIMT.merge_sum(x, tmap, n_out), CPU.merge_sum(x, tmap, n_out), torch.float32, "merge_sum")
    y = torch.randn(bsz, n_out, c)
    assert torch.equal(SIMT.unmerge(y, tmap), CPU.unmerge(y, tmap))
    assert_same(SIMT.merge_wavg_backward(y, size, rsz, tmap), CPU.merge_wavg_backward(y, size, rsz, tmap),
                torch.float32, "merge_wavg_backward")


def test_merges_agree_with_fused_tome_merge():
    """merge_wavg over tome_merge's token map is tome_merge's merge (same sums, other order)."""
    x, size = inputs(2, 197, 40, torch.float32, seed=7)
    metric = torch.randn(2, 197, 16)
    out, osz, *_, tmap = CPU.tome_merge(x, metric, 60, size, True, False)
    wout, wsz = SIMT.merge_wavg(x, size, tmap, 197 - 60)
    torch.testing.assert_close(wout, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wsz, osz)


def test_merges_large_n():
    """N = 4096 (the sort over 4096 keys, several output chunks of 1024 rows)."""
    SIMT.configure(1, 256, 4)
    try:
        bsz, n, c, n_out = 1, 4096, 3, 2500
        x, size = inputs(bsz, n, c, torch.float32, seed=9)
        tmap = random_map(bsz, n, n_out, seed=11)
        out, osz = SIMT.merge_wavg(x, size, tmap, n_out)
        ref, rsz = CPU.merge_wavg(x, size, tmap, n_out)
        assert_same(out, ref, torch.float32, "merge_wavg")
        assert torch.equal(osz, rsz)
        assert_same(SIMT.merge_sum(x, tmap, n_out), CPU.merge_sum(x, tmap, n_out), torch.float32, "merge_sum")
    finally:
        SIMT.configure(0, 256, 4)


@pytest.mark.parametrize("entry", [12, 1012, -2, -(2**40)])
def test_merges_out_of_range_entries_raise(entry):
    """The CUDA launchers check token-map ranges on the host before they launch (as the CPU kernels
    do), naming token_map; the kernels also skip such entries (while a CUDA graph is captured the
    host check cannot run), so memory stays in bounds either way."""
    bsz, n, c, n_out = 2, 40, 9, 12
    x, size = inputs(bsz, n, c, torch.float32)
    bad = random_map(bsz, n, n_out, seed=2)
    bad[1, 7] = entry
    y = torch.randn(bsz, n_out, c)
    for call in (lambda: SIMT.merge_sum(x, bad, n_out), lambda: SIMT.merge_wavg(x, size, bad, n_out),
                 lambda: SIMT.unmerge(y, bad), lambda: SIMT.merge_wavg_backward(y, size, torch.ones(bsz, n_out, 1), bad),
                 lambda: CPU.merge_sum(x, bad, n_out)):
        with pytest.raises(RuntimeError, match="token_map entries must be in"):
            call()


def test_merges_empty_shapes():
    x = torch.randn(2, 5, 4)
    tmap = random_map(2, 5, 3, seed=0)
    assert SIMT.merge_sum(x, torch.full_like(tmap, -1), 0).shape == (2, 0, 4)  # n_out = 0: every entry is -1
    out, osz = SIMT.merge_wavg(x[:0], None, tmap[:0], 3)
    assert out.shape == (0, 3, 4) and osz.shape == (0, 3, 1)
    out, osz = SIMT.merge_wavg(x[:, :, :0], None, tmap, 3)
    ref, rsz = CPU.merge_wavg(x[:, :, :0], None, tmap, 3)
    assert out.shape == (2, 3, 0) and torch.equal(osz, rsz)
    assert SIMT.unmerge(torch.randn(2, 3, 0), tmap).shape == (2, 5, 0)
    # N = 0: every output row is empty
    out, osz = SIMT.merge_wavg(x[:, :0], None, tmap[:, :0], 3)
    assert torch.equal(out, torch.zeros(2, 3, 4)) and torch.equal(osz, torch.zeros(2, 3, 1))


def test_merges_non_contiguous_inputs():
    x = torch.randn(2, 30, 20).transpose(1, 2).contiguous().transpose(1, 2)[:, :, 1:18]
    tmap = random_map(2, 30, 11, seed=4)[:, :]
    tmap_nc = torch.stack([tmap, tmap], -1)[..., 0]
    assert not x.is_contiguous() and not tmap_nc.is_contiguous()
    assert torch.equal(SIMT.merge_sum(x, tmap_nc, 11), CPU.merge_sum(x, tmap, 11))
    out, osz = SIMT.merge_wavg(x, None, tmap_nc, 11)
    ref, rsz = CPU.merge_wavg(x, None, tmap, 11)
    assert torch.equal(out, ref) and torch.equal(osz, rsz)


@pytest.mark.parametrize("call,msg", [
    (lambda x, m: SIMT.merge_sum(x, m.int(), 4), "token_map must be an int64"),
    (lambda x, m: SIMT.merge_sum(x, m[:, :3], 4), "token_map must have shape"),
    (lambda x, m: SIMT.merge_sum(x.double(), m, 4), "x must be float32, float16 or bfloat16"),
    (lambda x, m: SIMT.merge_sum(x, m, -1), "n_out must be >= 0"),
    (lambda x, m: SIMT.merge_wavg(x, torch.ones(2, 6, 2), m, 4), "size must have shape"),
    (lambda x, m: SIMT.unmerge(x[0], m), "y must have 3 dimensions"),
    (lambda x, m: SIMT.unmerge(x, m[:1]), "token_map must have shape"),
    (lambda x, m: SIMT.merge_wavg_backward(x, None, torch.ones(2, 5, 2), m), "out_size must have shape"),
    (lambda x, m: SIMT.merge_wavg_backward(x, None, torch.ones(2, 6, 1, dtype=torch.float64), m),
     "out_size must be float32"),
])
def test_merges_argument_checks(call, msg):
    x = torch.randn(2, 6, 3)
    m = random_map(2, 6, 4, seed=1)
    with pytest.raises(RuntimeError, match=msg):
        call(x, m)
