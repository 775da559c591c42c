"""GPU backends ("triton", "cuda") on CUDA tensors against the reference on the same tensors.

Marked ``gpu``; skipped without a CUDA device (CI has none: there the Triton kernels are tested
in the interpreter by the rest of the suite). Run on the GPU machine with ``bench/gpu_check.sh``.
"""
import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import reference as ref
from fpet_kernels.ops.pyra import pyra_merge_reference

from helpers import DTYPE_TOLS, gen, gen_size

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = [b for b in ("triton", "cuda") if fk.backends()["live"].get(b)]
if torch.cuda.is_available() and not GPU_BACKENDS:
    GPU_BACKENDS = ["triton", "cuda"]  # a GPU is present: a missing backend must fail, not skip


@pytest.fixture(params=GPU_BACKENDS or ["none"])
def gpu_backend(request):
    name = request.param
    if not fk.backends()["live"].get(name):
        pytest.fail(f"backend {name!r} is not live on this GPU machine: {fk.backends()}")
    return name


def _inputs(bsz, n, c, d, dtype, seed=0):
    x = gen(bsz, n, c, dtype=dtype, seed=seed).cuda()
    metric = gen(bsz, n, d, dtype=dtype, seed=seed + 1).cuda()
    size = gen_size(bsz, n).cuda()
    return x, metric, size


def _close(got, exp, atol, rtol, what):
    for i, (g, e) in enumerate(zip(got, exp)):
        if g.dtype == torch.int64:
            assert torch.equal(g, e), f"{what} output {i}: indices differ"
        else:
            torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol,
                                       msg=lambda m: f"{what} output {i}: {m}")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("bsz", [1, 8])
@pytest.mark.parametrize("n,c,cls,dist", [(197, 768, True, False), (198, 768, True, True), (577, 1024, True, False),
                                          (64, 384, False, False)])
def test_tome_merge_matches_reference(gpu_backend, dtype, atol, rtol, bsz, n, c, cls, dist):
    x, metric, size = _inputs(bsz, n, c, 64, dtype)
    for r in (0, 1, 16, n // 2):
        out, osz, m = fk.tome_merge(x, metric, r, size, cls, dist, backend=gpu_backend)
        eo, es, em = ref.tome_merge(x, metric, r, size, cls, dist)
        _close((out, osz) + tuple(m), (eo, es) + tuple(em), atol, rtol, f"tome_merge r={r}")
        _close((fk.unmerge(out, m, backend=gpu_backend),), (ref.unmerge(eo, em.token_map),), atol, rtol, "unmerge")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("n,grid,cls,dist", [(197, None, True, False), (198, None, True, True), (1025, None, True, False),
                                             (96, (8, 12), False, False)])
def test_fpet_merge_forward_and_backward(gpu_backend, dtype, atol, rtol, n, grid, cls, dist):
    x, metric, size = _inputs(4, n, 768, 64, dtype)
    got, exp = [], []
    for be, out in ((gpu_backend, got), ("reference", exp)):
        xg, mg = x.clone().requires_grad_(), metric.clone().requires_grad_()
        y, s = fk.fpet_merge(xg, mg, size, cls, dist, grid, backend=be)
        g = torch.randn(y.shape, generator=torch.Generator("cuda").manual_seed(3), device="cuda").to(y.dtype)
        gx, gm = torch.autograd.grad((y * g).sum() + s.sum(), (xg, mg))
        out += [y, s, gx, gm]
    _close(got[:3], exp[:3], atol, rtol, "fpet_merge forward / grad_x")
    scale = exp[3].float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(got[3].float() / scale, exp[3].float() / scale, atol=max(atol, 1e-4) * 10, rtol=0)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("bsz", [1, 8])
def test_pyra_merge_matches_reference(gpu_backend, dtype, atol, rtol, bsz):
    x, metric, size = _inputs(bsz, 197, 768, 64, dtype)
    r = 16
    a, b = gen(r, 1, seed=5).cuda(), 0.1 * gen(1, 768, seed=6).cuda()
    lw, lb = (1 + 0.1 * gen(768, seed=7)).cuda(), (0.1 * gen(768, seed=8)).cuda()
    got = fk.pyra_merge(x, metric, r, a, b, lw, lb, size, True, backend=gpu_backend, return_matching=True)
    exp = pyra_merge_reference(x, metric, r, a, b, lw, lb, size, True, False, 1e-5)  # (out, size, Matching)
    _close(got[:2] + tuple(got[2]), exp[:2] + tuple(exp[2]), atol * 4, rtol * 4, "pyra_merge")


def test_gradients_and_determinism(gpu_backend):
    x, metric, size = _inputs(8, 197, 768, 64, torch.float16)
    runs = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        out, osz, m = fk.tome_merge(xg, metric, 16, size, True, backend=gpu_backend)
        (gx,) = torch.autograd.grad(out.float().square().sum(), xg)
        runs.append((out, osz, gx) + tuple(m))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical calls differ"
    xg = x.clone().requires_grad_()
    out, _, _ = ref.tome_merge(xg, metric, 16, size, True)
    (gx,) = torch.autograd.grad(out.float().square().sum(), xg)
    torch.testing.assert_close(runs[0][2].float(), gx.float(), atol=2e-3, rtol=2e-3)


def test_empty_batch_and_compile(gpu_backend):
    x, metric, size = _inputs(0, 197, 768, 64, torch.float16)
    out, osz, m = fk.tome_merge(x, metric, 16, size, True, backend=gpu_backend)
    assert out.shape == (0, 181, 768) and m.token_map.shape == (0, 197)
    x, metric, size = _inputs(2, 197, 768, 64, torch.float16)

    def f(x, metric, size):
        y, s, m = fk.tome_merge(x, metric, 16, size, True, backend=gpu_backend)
        z, zs = fk.fpet_merge(fk.unmerge(y, m, backend=gpu_backend), metric, size, True, backend=gpu_backend)
        return z, zs
    got = torch.compile(f, fullgraph=True)(x, metric, size)
    exp = f(x, metric, size)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
