"""GPU backends ("triton", "cuda") on CUDA tensors against the reference on the same tensors.

Every public op and its gradients: tome_match, tome_merge (x and size), unmerge (backward merge_sum),
merge_wavg through ToMe's and FPET's closure APIs (backward merge_wavg_backward), fpet_merge (padded batches too; x,
metric, size), pyra_merge (x, size, a, b, LayerNorm), for both GPU backends; X-PEFT's xpeft_adapter
(x, residual and the four weights) and PaFi's masked_weight_grad (and its gradients) on Triton; they
have no CUDA C++ kernel, so under ``cuda`` an explicit ``backend="cuda"`` must raise naming the op
and the automatic choice (a live kernel, not the reference) is compared instead; a patched tiny ViT on
the GPU against the same model on the CPU (``-k test_vit_patched``); small shapes of every op for
compute-sanitizer (``-k test_sanitizer``). Ops are called only through the public functions with
``backend=``.

How results are compared:
- precision pinned for the whole module: no TF32 in float32 matmuls (the reference's similarity and
  FPET's dense merge are matmuls), ``torch.set_float32_matmul_precision("highest")``;
- genuine near-ties: the matching is recomputed in float64 from the metric; an image (batch
  element) whose decision has two candidates within ``TIE_ULPS`` float32 ulps (ToMe: a merged A row's
  top-1 vs top-2, the r-th vs (r+1)-th best score, the order of unmerged rows without a class token;
  FPET: top-1 vs top-2 and top-2 vs top-3 of an A row) may get a different, equally right matching.
  Its outputs are not compared (its token map must still be in range) and it is masked out of the
  loss whose gradients are compared; every other image must agree exactly in its indices. A draw in
  which every image has a near-tie is redrawn (new seed), so some images are always compared;
- values: ``|got - ref| <= atol + rtol * |ref|`` per element (torch.testing.assert_close); gradients
  likewise per element, ``atol`` scaled by the mean magnitude of the reference gradient (never by
  its largest entry).

Marked ``gpu``; skipped without a CUDA device (CI has none: there the Triton kernels are tested in
the interpreter by the rest of the suite). ``bench/gpu_check.sh`` runs it on the GPU machine.
``FPET_TEST_BACKENDS=cuda`` restricts the backends. ``FPET_GPU_TEST_DEVICE=cpu`` runs the same
checks on CPU tensors with the "cpu" backend (to test this file's logic without a GPU);
``FPET_TEST_BACKENDS=triton`` with it runs them in Triton's CPU interpreter (slow: name tests with -k).
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk

from helpers import DTYPE_TOLS, gen, gen_size

DEV = os.environ.get("FPET_GPU_TEST_DEVICE", "cuda").strip() or "cuda"
ON_GPU = DEV == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device")]

_ONLY = [b.strip() for b in os.environ.get("FPET_TEST_BACKENDS", "").split(",") if b.strip()]
# On CPU tensors "triton" is the interpreter: only when named in FPET_TEST_BACKENDS.
_CANDIDATES = ("triton", "cuda") if ON_GPU else ("cpu", "triton")
GPU_BACKENDS = [b for b in _CANDIDATES if b in _ONLY] if _ONLY else list(_CANDIDATES if ON_GPU else ("cpu",))

TIE_ULPS = 32
TIE_TOL = TIE_ULPS * torch.finfo(torch.float32).eps  # scores are cosines (|s| <= 1): absolute ulps at 1


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    name = request.param
    if not fk.backends()["live"].get(name):
        # a GPU is present: a backend that is not live fails, it does not skip
        pytest.fail(f"backend {name!r} is not live on this machine: {fk.backends()}")
    return name


@pytest.fixture(autouse=True, scope="module")
def _pinned_precision():
    """float32 matmuls in full float32 (no TF32) for the reference and the kernels' callers."""
    matmul = torch.backends.cuda.matmul
    old = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers the fp32_precision API; both still work
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[:2]
        torch.set_float32_matmul_precision(old[2])


# ----------------------------------------------------------------------------- cases
# Few distinct shapes: each (shape class, dtype, flags) is a new Triton compilation on a fresh machine.
# (bsz, n, c, class_token, distill_token, grid)
CASES = {
    "vitb": (4, 197, 768, True, False, None),      # ViT-B/16: class token, 14 x 14 grid
    "dist": (3, 198, 768, True, True, None),       # DeiT: class + distillation token
    "plain": (2, 64, 384, False, False, None),     # no prefix, N and C multiples of 16
    "oddc": (2, 65, 200, False, True, None),       # odd N, C not a multiple of 16, distillation only
    "rect": (2, 96, 256, False, False, (8, 12)),   # FPET on a rectangular grid
    "large": (2, 577, 1024, True, False, None),    # ViT-L/14 at 336: several tiles of tokens
    "b1": (1, 197, 768, True, False, None),        # B = 1
}
_TOL = {p.values[0]: p for p in DTYPE_TOLS}


def _case_params(names_dtypes):
    out = []
    for name, dtypes in names_dtypes:
        for dt in dtypes:
            p = _TOL[dt]
            out.append(pytest.param(name, *p.values, id=f"{name}-{p.id}"))
    return out


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOME_CASES = _case_params([("vitb", (F32, F16, BF16)), ("dist", (F32, F16)), ("plain", (F32,)), ("oddc", (F32,)),
                           ("large", (F16,)), ("b1", (F16,))])
FPET_CASES = _case_params([("vitb", (F32, F16, BF16)), ("dist", (F32, F16)), ("plain", (F32,)), ("rect", (F32,)),
                           ("large", (F16,)), ("b1", (F16,))])
PYRA_CASES = _case_params([("vitb", (F32, F16, BF16)), ("dist", (F32,)), ("oddc", (F32,)), ("b1", (F16,))])


def _inputs(bsz, n, c, d, dtype, seed=0):
    x = gen(bsz, n, c, dtype=dtype, seed=seed).to(DEV)
    metric = gen(bsz, n, d, dtype=dtype, seed=seed + 1).to(DEV)
    size = gen_size(bsz, n, seed=seed + 2).to(DEV)
    return x, metric, size


def _cap(n, cls, dist):
    return (n - int(cls) - int(dist)) // 2


# ----------------------------------------------------------------------------- near-ties (float64)
def tome_ties(metric, r, cls, dist):
    """[B] bool: images whose ToMe matching has a near-tie at a decision (see the module docstring)."""
    m = F.normalize(metric.double(), dim=-1)
    s = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    if cls:
        s[:, 0, :] = -torch.inf
    if dist:
        s[:, :, 0] = -torch.inf
    bsz, na, nb = s.shape
    r = max(0, min(r, _cap(metric.shape[1], cls, dist)))
    flags = torch.zeros(bsz, dtype=torch.bool, device=metric.device)
    if r == 0 or nb == 0:
        return flags
    best = s.amax(-1)
    order = best.sort(-1, descending=True).values
    if r < na:  # which A rows merge
        flags |= (order[:, r - 1] - order[:, r]).abs() <= TIE_TOL
    if nb > 1:  # the destination of every (nearly) merged row
        top2 = s.topk(2, dim=-1).values
        row_tie = (top2[..., 0] - top2[..., 1]) <= TIE_TOL
        merged = best >= order[:, r - 1:r] - TIE_TOL
        flags |= (row_tie & merged & torch.isfinite(best)).any(-1)
    if not cls:  # the unmerged rows are in score order: their order is the output order
        rest = order[:, r:]
        gaps = rest[:, :-1] - rest[:, 1:]
        fin = torch.isfinite(rest[:, 1:])
        flags |= ((gaps <= TIE_TOL) & fin).any(-1)
    return flags


def _checkerboard(num_prefix, h, w, device):
    """Spec 2.2: A = (even row, even col) + (odd, odd) cells; B = the prefix, then (odd, even) + (even, odd)."""
    pos = num_prefix + torch.arange(h * w, device=device).view(h, w)
    a = torch.cat([pos[0::2, 0::2].flatten(), pos[1::2, 1::2].flatten()])
    b = torch.cat([torch.arange(num_prefix, device=device), pos[1::2, 0::2].flatten(), pos[0::2, 1::2].flatten()])
    return a, b


def _grid(n, num_prefix, grid):
    if grid is not None:
        return grid
    side = int(round((n - num_prefix) ** 0.5))
    assert side * side == n - num_prefix, (n, num_prefix)
    return side, side


def fpet_ties(metric, cls, dist, grid):
    """[B] bool: images with an A row whose top-1 / top-2 or top-2 / top-3 scores nearly tie."""
    p = int(cls) + int(dist)
    h, w = _grid(metric.shape[1], p, grid)
    a, b = _checkerboard(p, h, w, metric.device)
    m = F.normalize(metric.double(), dim=-1)
    s = m[:, a] @ m[:, b].transpose(1, 2)
    s[:, :, :p] = -torch.inf
    k = min(3, s.shape[-1] - p)
    top = s.topk(k, dim=-1).values
    gaps = top[..., :-1] - top[..., 1:]
    return ((gaps <= TIE_TOL) & torch.isfinite(top[..., 1:])).any(-1).any(-1)


def _draw(make, ties, seeds=(0, 10, 20, 30, 40)):
    """Inputs of the first seed whose draw leaves at least one image without a near-tie."""
    for seed in seeds:
        inputs = make(seed)
        flags = ties(inputs)
        if not bool(flags.all()):
            return inputs, flags
    pytest.fail(f"every image of {len(seeds)} draws has a near-tie: widen the shapes or reduce TIE_ULPS")


# ----------------------------------------------------------------------------- comparisons
def _close(got, exp, keep, atol, rtol, what):
    """Per element, images ``keep`` only; int64 tensors (indices) exactly."""
    for i, (g, e) in enumerate(zip(got, exp)):
        assert g.shape == e.shape, f"{what} output {i}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        g, e = g[keep], e[keep]
        if e.dtype == torch.int64:
            bad = (g != e).nonzero()
            assert bad.numel() == 0, f"{what} output {i}: indices differ at {bad[:5].tolist()} (no near-tie there)"
        else:
            torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol,
                                       msg=lambda m: f"{what} output {i}: {m}")


def _close_grads(got, exp, atol, rtol, what):
    """Per element: |g - e| <= atol * mean|e| + rtol * |e| (images with near-ties are out of the loss)."""
    for i, (g, e) in enumerate(zip(got, exp)):
        assert g.shape == e.shape, f"{what} grad {i}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        e32, g32 = e.float(), g.float()
        scale = float(e32.abs().mean()) if e32.numel() else 0.0
        torch.testing.assert_close(g32, e32, atol=atol * max(scale, 1e-6), rtol=rtol,
                                   msg=lambda m: f"{what} grad #{i} (mean |ref| {scale:.3g}): {m}")


def _map_in_range(tmap, n_out, allow_dropped=False):
    lo = -1 if allow_dropped else 0
    assert bool(((tmap >= lo) & (tmap < n_out)).all()), f"token map outside [{lo}, {n_out})"


def _grads(fn, leaves, keep, seed=11):
    """Outputs of ``fn(*leaves)`` and the gradients of a random projection of its float outputs,
    restricted to the images ``keep`` (the others' projection weights are zero)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        if o.is_floating_point() and o.requires_grad:
            w = torch.randn(o.shape, generator=g).to(o.device)
            w = w * keep.view(-1, *([1] * (o.dim() - 1))).to(w.dtype)
            loss = loss + (o.float() * w).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros(()) if x is None else x for x in grads]


# ----------------------------------------------------------------------------- ToMe
@pytest.mark.parametrize("case,dtype,atol,rtol", TOME_CASES)
def test_tome_match(gpu_backend, case, dtype, atol, rtol):
    bsz, n, c, cls, dist, _ = CASES[case]
    for r in (1, 16, _cap(n, cls, dist)) if case == "vitb" else (16, _cap(n, cls, dist)):
        metric, flags = _draw(lambda s: _inputs(bsz, n, 8, 64, dtype, seed=s)[1],
                              lambda m: tome_ties(m, r, cls, dist))
        got = fk.tome_match(metric, r, cls, dist, backend=gpu_backend)
        exp = fk.tome_match(metric, r, cls, dist, backend="reference")
        keep = ~flags
        _map_in_range(got.token_map, n - got.src_idx.shape[1])
        # src order follows the rank of equal scores: compare (src, dst) pairs sorted by src
        gs, ge = got.src_idx.sort(-1), exp.src_idx.sort(-1)
        got_pairs = (gs.values, got.dst_idx.gather(1, gs.indices))
        exp_pairs = (ge.values, exp.dst_idx.gather(1, ge.indices))
        _close(got_pairs + (got.unm_idx, got.token_map), exp_pairs + (exp.unm_idx, exp.token_map), keep, 0, 0,
               f"tome_match r={r}")


@pytest.mark.parametrize("case,dtype,atol,rtol", TOME_CASES)
def test_tome_merge_unmerge_and_gradients(gpu_backend, case, dtype, atol, rtol):
    """Forward (x', size', matching) and d/d(x, size) of tome_merge (merge_wavg_backward) and of
    unmerge (merge_sum)."""
    bsz, n, c, cls, dist, _ = CASES[case]
    rs = (1, 16, _cap(n, cls, dist)) if case == "vitb" and dtype == F32 else (16,)
    for r in rs:
        (x, metric, size), flags = _draw(lambda s: _inputs(bsz, n, c, 64, dtype, seed=s),
                                         lambda t: tome_ties(t[1], r, cls, dist))
        keep = ~flags

        def run(be):
            def f(x, size):
                y, s, m = fk.tome_merge(x, metric, r, size, cls, dist, backend=be)
                # the token map holds the whole matching (src_idx's order follows the rank of equal
                # scores; test_tome_match compares the indices order-free)
                return y, s, fk.unmerge(y, m, backend=be), m.token_map
            return f
        got = _grads(run(gpu_backend), [x, size], keep)
        exp = _grads(run("reference"), [x, size], keep)
        _map_in_range(got[0][-1], got[0][0].shape[1])
        _close(got[0], exp[0], keep, atol, rtol, f"tome_merge + unmerge r={r}")
        _close_grads(got[1], exp[1], 2 * atol, 2 * rtol, f"tome_merge + unmerge r={r}")


def test_tome_merge_r0_and_determinism(gpu_backend):
    x, metric, size = _inputs(4, 197, 768, 64, F16)
    out, osz, m = fk.tome_merge(x, metric, 0, size, True, backend=gpu_backend)
    assert torch.equal(out, x) and torch.equal(osz, size.float()), "r = 0 is not the identity"
    runs = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        out, osz, m = fk.tome_merge(xg, metric, 16, size, True, backend=gpu_backend)
        (gx,) = torch.autograd.grad(out.float().square().sum(), xg)
        fy, fs = fk.fpet_merge(x, metric, size, True, backend=gpu_backend)
        runs.append((out, osz, gx, fy, fs) + tuple(m))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"two identical calls differ (output {i})"


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("closure", ["tome", "fpet"])
def test_merge_wavg_public_api(gpu_backend, dtype, atol, rtol, closure):
    """fk.merge_wavg over ToMe's bipartite_soft_matching (merge_wavg op) and FPET's
    bipartite_diff_matching (fpet_merge op), forward and gradients (x, metric for FPET, size)."""
    bsz, n, c, cls, dist, grid = CASES["vitb"]
    ties = (lambda t: tome_ties(t[1], 16, cls, dist)) if closure == "tome" else \
        (lambda t: fpet_ties(t[1], cls, dist, grid))
    (x, metric, size), flags = _draw(lambda s: _inputs(bsz, n, c, 64, dtype, seed=s), ties)
    keep = ~flags

    def run(be):
        def f(x, metric, size):
            if closure == "tome":
                merge, _ = fk.bipartite_soft_matching(metric.detach(), 16, cls, backend=be)
            else:
                merge = fk.bipartite_diff_matching(metric, cls, backend=be)
            return fk.merge_wavg(merge, x, size)
        return f
    got = _grads(run(gpu_backend), [x, metric, size], keep)
    exp = _grads(run("reference"), [x, metric, size], keep)
    _close(got[0], exp[0], keep, atol, rtol, f"merge_wavg ({closure})")
    _close_grads(got[1], exp[1], 4 * atol, 4 * rtol, f"merge_wavg ({closure})")


def test_unmerge_of_dropped_tokens(gpu_backend):
    """unmerge / merge_sum with -1 entries (FPET ties) in the token map."""
    x, metric, size = _inputs(4, 197, 256, 64, F32)
    _, _, tmap = fk.fpet_merge(x, metric, size, True, backend="reference", return_token_map=True)
    tmap = tmap.clone()
    tmap[:, 5] = -1
    y = gen(4, 99, 256, seed=4).to(DEV)
    keep = torch.ones(4, dtype=torch.bool, device=DEV)
    got = _grads(lambda y: fk.unmerge(y, tmap, backend=gpu_backend), [y], keep)
    exp = _grads(lambda y: fk.unmerge(y, tmap, backend="reference"), [y], keep)
    _close(got[0], exp[0], keep, 1e-6, 1e-6, "unmerge with dropped tokens")
    _close_grads(got[1], exp[1], 1e-5, 1e-5, "unmerge with dropped tokens")


# ----------------------------------------------------------------------------- FPET
@pytest.mark.parametrize("case,dtype,atol,rtol", FPET_CASES)
def test_fpet_merge_forward_and_backward(gpu_backend, case, dtype, atol, rtol):
    bsz, n, c, cls, dist, grid = CASES[case]
    (x, metric, size), flags = _draw(lambda s: _inputs(bsz, n, c, 64, dtype, seed=s),
                                     lambda t: fpet_ties(t[1], cls, dist, grid))
    keep = ~flags

    def run(be):
        def f(x, metric, size):
            return fk.fpet_merge(x, metric, size, cls, dist, grid, backend=be, return_token_map=True)
        return f
    got = _grads(run(gpu_backend), [x, metric, size], keep)
    exp = _grads(run("reference"), [x, metric, size], keep)
    _map_in_range(got[0][2], got[0][0].shape[1], allow_dropped=True)
    _close(got[0], exp[0], keep, atol, rtol, "fpet_merge")
    gx, gm, gs = got[1]
    ex, em, es = exp[1]
    _close_grads([gx, gs], [ex, es], 2 * atol, 2 * rtol, "fpet_merge x / size")
    # the straight-through metric gradient: normalisation, cosine, sigmoid chain in float32
    _close_grads([gm], [em], 8 * max(atol, 1e-5), 8 * max(rtol, 1e-5), "fpet_merge metric")


# ----------------------------------------------------------------------------- FPET, padded batches
PADDED_LENS = (129, 100, 2, 0)  # full, partly padded, [CLS] + one token, fully padded


def fpet_ties_padded(metric, size, p, grid):
    """``fpet_ties`` of a padded batch: scores with a padding (size 0) token take no part."""
    h, w = grid
    a, b = _checkerboard(p, h, w, metric.device)
    valid = size[..., 0] != 0
    m = F.normalize(metric.double(), dim=-1)
    s = m[:, a] @ m[:, b].transpose(1, 2)
    s[:, :, :p] = -torch.inf
    s = s.masked_fill(~(valid[:, a, None] & valid[:, None, b]), -torch.inf)
    top = s.topk(min(3, s.shape[-1] - p), dim=-1).values
    gaps = top[..., :-1] - top[..., 1:]
    return ((gaps <= TIE_TOL) & torch.isfinite(top[..., 1:])).any(-1).any(-1)


@pytest.mark.parametrize("dtype,atol,rtol", [pytest.param(*_TOL[dt].values, id=_TOL[dt].id) for dt in (F32, F16)])
def test_fpet_merge_padded_text_batch(gpu_backend, dtype, atol, rtol):
    """``fpet_merge(padded=True)`` (the op ``fpet_merge_rows``) on a right-padded text batch, grid
    (1, N - 1) ([CLS] + 128 tokens, MiniLM's width): values, sizes, token map and gradients against
    the reference; padding maps to -1 and gets no gradient, the fully padded row stays 0 (no NaN)."""
    bsz, n, c, grid = len(PADDED_LENS), 129, 384, (1, 128)
    lens = torch.tensor(PADDED_LENS, device=DEV)

    def make(seed):
        x, metric, size = _inputs(bsz, n, c, 32, dtype, seed=seed)
        valid = torch.arange(n, device=DEV) < lens[:, None]
        return x, metric, size * valid[..., None]

    (x, metric, size), flags = _draw(make, lambda t: fpet_ties_padded(t[1], t[2], 1, grid))
    keep = ~flags

    def run(be):
        def f(x, metric, size):
            return fk.fpet_merge(x, metric, size, True, grid=grid, backend=be, return_token_map=True, padded=True)
        return f
    got = _grads(run(gpu_backend), [x, metric, size], keep)
    exp = _grads(run("reference"), [x, metric, size], keep)
    _map_in_range(got[0][2], got[0][0].shape[1], allow_dropped=True)
    _close(got[0], exp[0], keep, atol, rtol, "fpet_merge padded")
    gx, gm, gs = got[1]
    ex, em, es = exp[1]
    _close_grads([gx, gs], [ex, es], 2 * atol, 2 * rtol, "fpet_merge padded x / size")
    _close_grads([gm], [em], 8 * max(atol, 1e-5), 8 * max(rtol, 1e-5), "fpet_merge padded metric")
    pad = size[..., 0] == 0
    assert bool((got[0][2][pad] == -1).all()), "padding maps to -1"
    for g in (gx, gm, gs):
        assert bool(torch.isfinite(g).all()) and bool((g[pad] == 0).all()), "padding gets no gradient"
    assert bool((got[0][0][3] == 0).all()) and bool((got[0][1][3] == 0).all()), "a fully padded row is 0"


# ----------------------------------------------------------------------------- PYRA
@pytest.mark.parametrize("case,dtype,atol,rtol", PYRA_CASES)
def test_pyra_merge_forward_and_gradients(gpu_backend, case, dtype, atol, rtol):
    bsz, n, c, cls, dist, _ = CASES[case]
    r = 16
    (x, metric, size), flags = _draw(lambda s: _inputs(bsz, n, c, 64, dtype, seed=s),
                                     lambda t: tome_ties(t[1], r, cls, dist))
    keep = ~flags
    params = [gen(r, 1, seed=5).to(DEV), 0.1 * gen(1, c, seed=6).to(DEV), (1 + 0.1 * gen(c, seed=7)).to(DEV),
              (0.1 * gen(c, seed=8)).to(DEV)]

    def run(be):
        def f(x, size, a, b, lw, lb):
            y, s, m = fk.pyra_merge(x, metric, r, a, b, lw, lb, size, cls, dist, backend=be, return_matching=True)
            return (y, s) + tuple(m)
        return f
    got = _grads(run(gpu_backend), [x, size] + params, keep)
    exp = _grads(run("reference"), [x, size] + params, keep)
    _map_in_range(got[0][-1], got[0][0].shape[1])
    gs, ge = got[0][2].sort(-1), exp[0][2].sort(-1)  # src order follows the rank of equal scores
    got_o = got[0][:2] + [gs.values, got[0][3].gather(1, gs.indices)] + got[0][4:]
    exp_o = exp[0][:2] + [ge.values, exp[0][3].gather(1, ge.indices)] + exp[0][4:]
    _close(got_o, exp_o, keep, 4 * atol, 4 * rtol, "pyra_merge")
    _close_grads(got[1], exp[1], 4 * atol, 4 * rtol, "pyra_merge x / size / a / b / ln")


# ----------------------------------------------------------------------------- X-PEFT and PaFi
def _pet_backend(gpu_backend, op, call):
    """The backend a PET-op test compares: ``gpu_backend`` where it has kernels for ``op``. Else
    (``cuda``: xpeft_adapter and masked_weight_grad have no CUDA C++ kernel) ``call(gpu_backend)``
    must raise naming the op, and the automatic choice on these tensors is compared instead: it must
    be a live kernel, never a silent reference."""
    if fk.ops._backend.op_live(op, gpu_backend):
        return gpu_backend
    with pytest.raises(RuntimeError, match=f"fpet::{op}"):
        call(gpu_backend)
    auto = fk.backends()["auto_per_op"]["cuda" if ON_GPU else "cpu"][op]
    assert auto != "reference" and fk.ops._backend.op_live(op, auto), \
        f"the automatic choice of {op} is {auto!r}, not a live kernel"
    return None


# (B, N, d, rank, profiles, dtype, residual): ViT-B/16 sites, and odd d / N with another rank.
XPEFT_CASES = [pytest.param(4, 197, 768, 16, 3, F32, False, id="vitb-f32"),
               pytest.param(4, 197, 768, 16, 3, F16, True, id="vitb-f16-residual"),
               pytest.param(3, 197, 768, 16, 2, BF16, False, id="vitb-bf16"),
               pytest.param(3, 65, 200, 24, 2, F32, True, id="odd-f32-residual")]


@pytest.mark.parametrize("bsz,n,d,rank,nprof,dtype,with_residual", XPEFT_CASES)
def test_xpeft_adapter_forward_and_gradients(gpu_backend, bsz, n, d, rank, nprof, dtype, with_residual):
    """Mixed profiles in one batch: output and the gradients of x, the four weights and the residual."""
    from fpet_kernels.ops.xpeft import xpeft_adapter

    _, atol, rtol = _TOL[dtype].values
    x = gen(bsz, n, d, dtype=dtype, seed=1).to(DEV)
    profile = (torch.arange(bsz) % nprof).flip(0).to(DEV)  # mixed, not sorted
    w = [gen(nprof, d, rank, seed=2) * d ** -0.5, 0.1 * gen(nprof, rank, seed=3), gen(nprof, rank, d, seed=4) * rank ** -0.5,
         0.1 * gen(nprof, d, seed=5)]
    w = [t.to(dtype).to(DEV) for t in w]
    leaves = [x] + w + ([gen(bsz, n, d, dtype=dtype, seed=6).to(DEV)] if with_residual else [])

    def run(be):
        def f(x, down, down_bias, up, up_bias, residual=None):
            return xpeft_adapter(x, profile, down, down_bias, up, up_bias, scale=0.5, residual=residual, backend=be)
        return f
    be = _pet_backend(gpu_backend, "xpeft_adapter", lambda b: run(b)(*leaves))
    keep = torch.ones(bsz, dtype=torch.bool, device=DEV)
    got = _grads(run(be), leaves, keep)
    exp = _grads(run("reference"), leaves, keep)
    _close(got[0], exp[0], keep, atol, rtol, f"xpeft_adapter ({be or 'auto'})")
    _close_grads(got[1], exp[1], 4 * atol, 4 * rtol, f"xpeft_adapter ({be or 'auto'}) x / weights / residual")


# (leading shape of grad_out / input, out, in, density, dtype): MiniLM's fc1 at 0.5% with M = 4 x 197
# tokens as [B, N, .], and a small layer with unsorted, repeated positions.
MWG_CASES = [pytest.param((4, 197), 1536, 384, 0.005, F32, id="minilm-f32"),
             pytest.param((788,), 1536, 384, 0.005, F16, id="minilm-f16"),
             pytest.param((788,), 384, 1536, 0.005, BF16, id="minilm-t-bf16"),
             pytest.param((3, 65), 40, 72, 0.3, F32, id="small-unsorted")]


@pytest.mark.parametrize("lead,n_out,n_in,density,dtype", MWG_CASES)
def test_masked_weight_grad_and_gradients(gpu_backend, lead, n_out, n_in, density, dtype):
    """PaFi's sparse weight gradient: grad[k] = sum_m grad_out[m, rows[k]] * input[m, cols[k]] (sums
    over M up to 788 in float32), and its own gradients in grad_out and input."""
    from fpet_kernels.ops.sparse import masked_weight_grad

    _, atol, rtol = _TOL[dtype].values
    k = max(1, round(density * n_out * n_in))
    g = torch.Generator().manual_seed(7)
    flat = torch.randperm(n_out * n_in, generator=g)[:k]
    if density < 0.1:
        flat = flat.sort().values  # as pet.pafi_indices gives them
    else:
        flat = torch.cat([flat, flat[:5]])  # unsorted, and some positions twice
    rows, cols = (flat // n_in).to(DEV), (flat % n_in).to(DEV)
    leaves = [gen(*lead, n_out, dtype=dtype, seed=8).to(DEV), gen(*lead, n_in, dtype=dtype, seed=9).to(DEV)]

    def run(be):
        return lambda dy, x: masked_weight_grad(dy, x, rows, cols, backend=be)
    be = _pet_backend(gpu_backend, "masked_weight_grad", lambda b: run(b)(*leaves))
    keep = torch.ones(1, dtype=torch.bool, device=DEV)
    got = _grads(run(be), leaves, keep)
    exp = _grads(run("reference"), leaves, keep)
    # a sum of M products: the tolerance grows with sqrt(M) against the unit-scale entries
    scale = float(torch.tensor(lead).prod()) ** 0.5
    every = torch.ones(rows.numel(), dtype=torch.bool, device=DEV)
    _close(got[0], exp[0], every, atol * scale, rtol, f"masked_weight_grad ({be or 'auto'})")
    _close_grads(got[1], exp[1], 4 * atol, 4 * rtol, f"masked_weight_grad ({be or 'auto'}) grad_out / input")


# ----------------------------------------------------------------------------- compile, empty batch
def test_empty_batch_and_compile(gpu_backend):
    x, metric, size = _inputs(0, 197, 768, 64, F16)
    out, osz, m = fk.tome_merge(x, metric, 16, size, True, backend=gpu_backend)
    assert out.shape == (0, 181, 768) and m.token_map.shape == (0, 197)
    x, metric, size = _inputs(2, 197, 768, 64, F16)

    def f(x, metric, size):
        y, s, m = fk.tome_merge(x, metric, 16, size, True, backend=gpu_backend)
        z, zs = fk.fpet_merge(fk.unmerge(y, m, backend=gpu_backend), metric, size, True, backend=gpu_backend)
        return z, zs
    got = torch.compile(f, fullgraph=True)(x, metric, size)
    exp = f(x, metric, size)
    for a, b in zip(got, exp):
        assert torch.equal(a, b), "torch.compile changed the result"


# ----------------------------------------------------------------------------- patched tiny ViT (-k test_vit_patched)
def _tiny_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    for p in model.parameters():  # random but non-trivial (zero-init heads would hide errors)
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


VIT_PATCH = {"tome": dict(r=8), "fpet": dict(merge_layer=1), "pyra": dict(r=[8, 6, 4, 2])}


@pytest.mark.parametrize("method", ["tome", "fpet", "pyra"])
def test_vit_patched_on_gpu_matches_cpu_reference(gpu_backend, method):
    """fk.patch.timm on a tiny ViT (65 tokens, 4 blocks), float32: the model on the GPU with a GPU
    backend against the same weights on the CPU with backend "reference": logits, token sizes and
    token map. A different token map is accepted only if another input draw agrees (a near-tie of
    the metric computed by two devices), never for every draw."""
    pytest.importorskip("timm")
    cpu = _tiny_vit()
    fk.patch.timm(cpu, method, trace_source=True, backend="reference", **VIT_PATCH[method])
    if method == "pyra":  # PYRA starts as plain ToMe (b = 0): make the modulation matter
        for blk in cpu.blocks:
            if getattr(blk, "fk_pyra", None) is not None:
                torch.nn.init.normal_(blk.fk_pyra.b, std=0.5)
    dev = _tiny_vit()
    fk.patch.timm(dev, method, trace_source=True, backend=gpu_backend, **VIT_PATCH[method])
    dev.load_state_dict(cpu.state_dict())  # the same learned merge parameters
    dev.to(DEV)
    mismatched = []
    for seed in (1, 2, 3):
        img = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = cpu(img)
            st_ref = {k: v for k, v in fk.patch.merge_state(cpu).items()}
            out = dev(img.to(DEV))
            st = fk.patch.merge_state(dev)
        assert out.shape == ref.shape and st["size"].shape == st_ref["size"].shape, "merged sizes differ"
        if not torch.equal(st["token_map"].cpu(), st_ref["token_map"]):
            mismatched.append(seed)
            continue
        torch.testing.assert_close(st["size"].cpu(), st_ref["size"], atol=0, rtol=0)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4, msg=lambda m: f"logits ({method}): {m}")
        return
    pytest.fail(f"{method}: the token map differs from the CPU reference for every draw {mismatched}")


# ----------------------------------------------------------------------------- small shapes (-k test_sanitizer)
SMALL = [pytest.param(2, 17, 40, 8, True, False, id="cls"), pytest.param(3, 18, 72, 16, True, True, id="cls+dist"),
         pytest.param(1, 1 + 64, 264, 32, True, False, id="grid8")]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("bsz,n,c,d,cls,dist", SMALL)
def test_sanitizer_every_op_small(gpu_backend, dtype, bsz, n, c, d, cls, dist):
    """Every op forward and backward at small shapes (bench/gpu_check.sh runs these under
    compute-sanitizer memcheck)."""
    r = (n - 2) // 4
    (x, metric, size), flags = _draw(lambda s: _inputs(bsz, n, c, d, dtype, seed=s),
                                     lambda t: tome_ties(t[1], r, cls, dist) | fpet_ties(t[1], cls, dist, None))
    keep = ~flags
    tol = 1e-5 if dtype == F32 else 2e-3
    a, b = gen(r, 1, seed=5).to(DEV), 0.1 * gen(1, c, seed=6).to(DEV)
    lw, lb = (1 + 0.1 * gen(c, seed=7)).to(DEV), (0.1 * gen(c, seed=8)).to(DEV)

    def every_op(be):
        def run(x, metric, size, a, b, lw, lb):
            m = fk.tome_match(metric.detach(), r, cls, dist, backend=be)
            y, s, m2 = fk.tome_merge(x, metric.detach(), r, size, cls, dist, backend=be)
            full = fk.unmerge(y, m2, backend=be)
            merge, _ = fk.bipartite_soft_matching(metric.detach(), r, cls, dist, backend=be)
            w, ws = fk.merge_wavg(merge, x, size)
            fy, fs = fk.fpet_merge(x, metric, size, cls, dist, backend=be)
            py, ps = fk.pyra_merge(x, metric.detach(), r, a, b, lw, lb, size, cls, dist, backend=be)
            return (m.token_map, m2.token_map, y, s, full, w, ws, fy, fs, py, ps)
        return run
    got = _grads(every_op(gpu_backend), [x, metric, size, a, b, lw, lb], keep)
    exp = _grads(every_op("reference"), [x, metric, size, a, b, lw, lb], keep)
    _close(got[0], exp[0], keep, 4 * tol, 4 * tol, "every op")
    _close_grads(got[1], exp[1], 8 * tol, 8 * tol, "every op")
