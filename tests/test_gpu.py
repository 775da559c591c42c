"""GPU backends ("triton", "cuda") on CUDA tensors against the reference on the same tensors.

Every public op and its gradients: tome_match, tome_merge (x and size), unmerge (its backward is
merge_sum), merge_wavg through ToMe's and FPET's closure APIs (backward merge_wavg_backward),
fpet_merge (x, metric, size), pyra_merge (x, a, b, LayerNorm, size), for both GPU backends.

Marked ``gpu``; skipped without a CUDA device (CI has none: there the Triton kernels are tested
in the interpreter by the rest of the suite). Run on the GPU machine with ``bench/gpu_check.sh``.
``FPET_TEST_BACKENDS=cuda`` restricts the backends (the compute-sanitizer step runs
``-k sanitizer`` that way: small shapes, every op forward and backward).
"""
import os

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import reference as ref
from fpet_kernels.ops.pyra import pyra_merge_reference

from helpers import DTYPE_TOLS, gen, gen_size

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_ONLY = [b.strip() for b in os.environ.get("FPET_TEST_BACKENDS", "").split(",") if b.strip()]
GPU_BACKENDS = [b for b in ("triton", "cuda") if fk.backends()["live"].get(b) and (not _ONLY or b in _ONLY)]
if torch.cuda.is_available() and not GPU_BACKENDS:
    # a GPU is present: a missing backend must fail, not skip
    GPU_BACKENDS = [b for b in ("triton", "cuda") if not _ONLY or b in _ONLY]


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


def _grads(fn, leaves, seed=11):
    """Outputs of ``fn(*leaves)`` and the gradients of a random projection of its float outputs."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator("cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device="cuda")).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros(()) if x is None else x for x in grads]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("n,cls,dist", [(197, True, False), (198, True, True), (64, False, False), (65, False, True)])
def test_tome_match_matches_reference(gpu_backend, dtype, atol, rtol, n, cls, dist):
    _, metric, _ = _inputs(8, n, 8, 64, dtype)
    for r in (0, 1, 16, n // 2):
        got = fk.tome_match(metric, r, cls, dist, backend=gpu_backend)
        exp = fk.tome_match(metric, r, cls, dist, backend="reference")
        _close(tuple(got), tuple(exp), atol, rtol, f"tome_match r={r}")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_tome_merge_and_unmerge_gradients(gpu_backend, dtype, atol, rtol):
    """d tome_merge / d (x, size) (merge_wavg_backward) and d unmerge / d y (merge_sum)."""
    x, metric, size = _inputs(4, 197, 768, 64, dtype)

    def f(be):
        def run(x, size):
            y, s, m = fk.tome_merge(x, metric, 16, size, True, backend=be)
            return y, s, fk.unmerge(y, m, backend=be)
        return run
    got = _grads(f(gpu_backend), [x, size])
    exp = _grads(f("reference"), [x, size])
    _close(got[0], exp[0], atol, rtol, "tome_merge + unmerge forward")
    _close(got[1], exp[1], atol * 4, rtol * 4, "tome_merge + unmerge grad x / size")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("closure", ["tome", "fpet"])
def test_merge_wavg_public_api(gpu_backend, dtype, atol, rtol, closure):
    """fk.merge_wavg over ToMe's bipartite_soft_matching (merge_wavg op) and FPET's
    bipartite_diff_matching (fpet_merge op), forward and gradients."""
    x, metric, size = _inputs(4, 197, 768, 64, dtype)

    def f(be):
        def run(x, metric, size):
            if closure == "tome":
                merge, _ = fk.bipartite_soft_matching(metric.detach(), 16, True, backend=be)
            else:
                merge = fk.bipartite_diff_matching(metric, True, backend=be)
            return fk.merge_wavg(merge, x, size)
        return run
    got = _grads(f(gpu_backend), [x, metric, size])
    exp = _grads(f("reference"), [x, metric, size])
    _close(got[0], exp[0], atol, rtol, f"merge_wavg ({closure}) forward")
    _close(got[1][:1] + got[1][2:], exp[1][:1] + exp[1][2:], atol * 4, rtol * 4,
           f"merge_wavg ({closure}) grad x / size")
    scale = exp[1][1].float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(got[1][1].float() / scale, exp[1][1].float() / scale, atol=max(atol, 1e-4) * 10, rtol=0)


def test_unmerge_of_dropped_tokens(gpu_backend):
    """unmerge / merge_sum with -1 entries (FPET ties) and a composed two-layer token map."""
    x, metric, size = _inputs(4, 197, 256, 64, torch.float32)
    _, _, tmap = fk.fpet_merge(x, metric, size, True, backend="reference", return_token_map=True)
    tmap[:, 5] = -1
    y = gen(4, 99, 256, seed=4).cuda()
    got = _grads(lambda y: fk.unmerge(y, tmap, backend=gpu_backend), [y])
    exp = _grads(lambda y: fk.unmerge(y, tmap, backend="reference"), [y])
    _close(got[0] + got[1], exp[0] + exp[1], 1e-5, 1e-5, "unmerge with dropped tokens")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_pyra_merge_gradients(gpu_backend, dtype, atol, rtol):
    x, metric, size = _inputs(4, 197, 768, 64, dtype)
    r = 16
    params = [gen(r, 1, seed=5).cuda(), 0.1 * gen(1, 768, seed=6).cuda(), (1 + 0.1 * gen(768, seed=7)).cuda(),
              (0.1 * gen(768, seed=8)).cuda()]

    def f(be):
        return lambda x, size, a, b, lw, lb: fk.pyra_merge(x, metric, r, a, b, lw, lb, size, True, backend=be)
    got = _grads(f(gpu_backend), [x, size] + params)
    exp = _grads(f("reference"), [x, size] + params)
    _close(got[0], exp[0], atol * 4, rtol * 4, "pyra_merge forward")
    for i, (g, e) in enumerate(zip(got[1], exp[1])):  # parameter gradients sum over B*N: relative to their scale
        scale = e.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.float() / scale, e.float() / scale, atol=max(atol, 1e-4) * 10, rtol=0,
                                   msg=lambda m: f"pyra_merge grad #{i}: {m}")


# Small shapes, every op forward and backward: the subset bench/gpu_check.sh runs under compute-sanitizer
# (memcheck and racecheck are slow; -k sanitizer).
SMALL = [pytest.param(2, 17, 40, 8, True, False, id="cls"), pytest.param(3, 18, 72, 16, True, True, id="cls+dist"),
         pytest.param(1, 1 + 64, 264, 32, True, False, id="grid8")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bsz,n,c,d,cls,dist", SMALL)
def test_sanitizer_every_op_small(gpu_backend, dtype, bsz, n, c, d, cls, dist):
    x, metric, size = _inputs(bsz, n, c, d, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    r = (n - 2) // 4
    a, b = gen(r, 1, seed=5).cuda(), 0.1 * gen(1, c, seed=6).cuda()
    lw, lb = (1 + 0.1 * gen(c, seed=7)).cuda(), (0.1 * gen(c, seed=8)).cuda()

    def every_op(be):
        def run(x, metric, size, a, b, lw, lb):
            m = fk.tome_match(metric.detach(), r, cls, dist, backend=be)
            y, s, m2 = fk.tome_merge(x, metric.detach(), r, size, cls, dist, backend=be)
            full = fk.unmerge(y, m2, backend=be)
            merge, _ = fk.bipartite_soft_matching(metric.detach(), r, cls, dist, backend=be)
            w, ws = fk.merge_wavg(merge, x, size)
            fy, fs = fk.fpet_merge(x, metric, size, cls, dist, backend=be)
            py, ps = fk.pyra_merge(x, metric.detach(), r, a, b, lw, lb, size, cls, dist, backend=be)
            return tuple(m) + (y, s, full, w, ws, fy, fs, py, ps)
        return run
    got = _grads(every_op(gpu_backend), [x, metric, size, a, b, lw, lb])
    exp = _grads(every_op("reference"), [x, metric, size, a, b, lw, lb])
    _close(got[0], exp[0], tol * 4, tol * 4, "every op, forward")
    for i, (g, e) in enumerate(zip(got[1], exp[1])):
        scale = e.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.float() / scale, e.float() / scale, atol=tol * 10, rtol=0,
                                   msg=lambda m: f"every op, grad #{i}: {m}")
