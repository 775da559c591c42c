"""The CUDA ToMe kernels (csrc/cuda/tome_merge.cuh) run on the host through torch.ops.fpet_simt,
against the C++ CPU kernels (torch.ops.fpet on CPU tensors, themselves checked against the spec).

The host runner executes the kernels' own source one thread at a time, in forward and reverse order
within every phase and with 256 or 64 threads per block (the ``simt`` fixture in conftest.py):
indices must be equal, values equal up to float32 summation order.
"""
import pytest
import torch

from helpers import DTYPE_TOLS, gen, gen_size

CPU = torch.ops.fpet

SHAPES = [  # B, N, C, D, class_token, distill_token
    (2, 197, 96, 64, True, False),
    (3, 198, 70, 40, True, True),
    (2, 64, 33, 16, False, False),
    (1, 51, 300, 24, True, False),   # one image, C split over several blocks
    (2, 3, 8, 4, False, False),
    (1, 2, 5, 3, True, False),
]


def _inputs(bsz, n, c, d, dtype, ties=True, size=True):
    x = gen(bsz, n, c, dtype=dtype, seed=3)
    metric = gen(bsz, n, d, dtype=dtype, seed=4)
    if ties and n > 12:  # exact ties: duplicated A rows and duplicated B columns
        metric[:, 6] = metric[:, 8]
        metric[:, 9] = metric[:, 11]
        metric[:, 2] = 0.0  # a zero row normalises to zeros
    return x, metric, (gen_size(bsz, n) if size else None)


def _r_values(n, cls, dist):
    cap = (n - int(cls) - int(dist)) // 2
    return sorted({0, min(1, cap), min(16, cap), cap})


def _assert_same(got, exp, atol, rtol):
    assert len(got) == len(exp)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert g.shape == e.shape and g.dtype == e.dtype, (i, g.shape, e.shape, g.dtype, e.dtype)
        if e.dtype == torch.int64:
            assert torch.equal(g, e), f"output {i}: indices differ"
        else:
            torch.testing.assert_close(g, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-c{int(s[4])}d{int(s[5])}")
def test_tome_merge_and_match(simt, shape, dtype, atol, rtol):
    bsz, n, c, d, cls, dist = shape
    x, metric, size = _inputs(bsz, n, c, d, dtype)
    for r in _r_values(n, cls, dist):
        for s in (size, None):
            _assert_same(simt.tome_merge(x, metric, r, s, cls, dist), CPU.tome_merge(x, metric, r, s, cls, dist),
                         atol, rtol)
        _assert_same(simt.tome_match(metric, r, cls, dist), CPU.tome_match(metric, r, cls, dist), 0, 0)


def test_tome_large_n(simt):
    """N = 1025, D = 128: several score tiles per row and column, shared memory past 48 KiB."""
    x, metric, size = _inputs(1, 1025, 40, 128, torch.float32)
    for r in (1, 300, 512):
        _assert_same(simt.tome_merge(x, metric, r, size, True, False), CPU.tome_merge(x, metric, r, size, True, False),
                     1e-5, 1e-5)


def test_tome_mixed_dtypes_and_strides(simt):
    """metric and size in another dtype than x, x non-contiguous: converted per load, not up front."""
    x = gen(2, 64, 40, dtype=torch.bfloat16).transpose(1, 2)  # [2, 40, 64], non-contiguous
    metric = gen(2, 40, 16, dtype=torch.float16, seed=5)
    size = gen_size(2, 40, dtype=torch.bfloat16)
    _assert_same(simt.tome_merge(x, metric, 10, size, True, False), CPU.tome_merge(x, metric, 10, size, True, False),
                 1.6e-2, 1.6e-2)


def test_tome_nan_scores_rank_first(simt):
    metric = gen(1, 20, 8, seed=6)
    metric[0, 4, 0] = float("nan")
    x = gen(1, 20, 8, seed=7)
    _assert_same(simt.tome_match(metric, 5, False, False), CPU.tome_match(metric, 5, False, False), 0, 0)
    got = simt.tome_merge(x, metric, 5, None, False, False)
    exp = CPU.tome_merge(x, metric, 5, None, False, False)
    for g, e in zip(got[2:], exp[2:]):
        assert torch.equal(g, e)
    torch.testing.assert_close(got[0], exp[0], equal_nan=True)


def test_tome_empty_batch(simt):
    x, metric = gen(0, 10, 4), gen(0, 10, 3)
    _assert_same(simt.tome_merge(x, metric, 3, None, True, False), CPU.tome_merge(x, metric, 3, None, True, False), 0, 0)


@pytest.mark.parametrize("call,match", [
    (lambda S: S.tome_merge(gen(1, 10, 4), gen(1, 10, 3), 5, None, True, False), "r must be in"),
    (lambda S: S.tome_merge(gen(1, 10, 4), gen(1, 9, 3), 2, None, True, False), "metric must be"),
    (lambda S: S.tome_merge(gen(1, 10, 4, dtype=torch.float64), gen(1, 10, 3), 2, None, True, False), "x must be"),
    (lambda S: S.tome_merge(gen(1, 10, 4), gen(1, 10, 3), 2, gen(1, 9, 1), True, False), "size must have"),
    (lambda S: S.tome_match(gen(10, 3), 2, True, False), "metric must have 3"),
])
def test_tome_bad_arguments_name_the_argument(simt, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(simt)
