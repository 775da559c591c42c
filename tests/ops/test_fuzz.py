"""Property-based differential test (hypothesis): every op and its gradients on the kernel backends
that run on CPU tensors ("cpu", and "triton" in its interpreter) against the reference, on small
random shapes: odd N, C and D, batch 1-2, class / distillation tokens, r from 0 past the cap, sizes,
float32 / float16 / bfloat16, and tokens holding inf or NaN (docs/semantics.md: they reach only
their own output row, as in the reference).

Bounded in time: a fixed number of examples per op and backend (fewer for the slow Triton
interpreter), no deadline, derandomized (the same examples on every run, so CI is reproducible).
The whole file takes well under 2 minutes on one CPU core.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fpet_kernels as fk
from fpet_kernels.ops import fpet as fpet_ops

from helpers import REQUIRE_EXTENSION, is_live, map_ops, missing_message

EXAMPLES = {"cpu": 40, "triton": 4}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(name: str) -> str:
    live = (fk.backends()["live"]["triton"]) if name == "triton" \
        else is_live(name)
    if not live:
        if REQUIRE_EXTENSION and name == "cpu":
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message(name)}", pytrace=False)
        pytest.skip(f"backend {name!r} is not live here")
    return name


@pytest.fixture(params=("cpu", "triton"))
def backend(request):
    return _backend(request.param)


def fuzz(backend: str, strategy, check) -> None:
    """Run ``check(backend, case)`` on EXAMPLES[backend] cases drawn from ``strategy``."""
    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        check(backend, case)
    run()


@st.composite
def cases(draw, fpet: bool = False):
    """A random case: shapes, flags, dtype, sizes and a seed for the values."""
    bsz = draw(st.integers(1, 2))
    cls = draw(st.booleans())
    dist = draw(st.booleans()) and not fpet
    if fpet:
        p = int(cls) + draw(st.integers(0, 2))  # class token and register tokens
        h, w = draw(st.sampled_from([(2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (5, 3)]))
        n = p + h * w
    else:
        p, h, w = 0, 0, 0
        n = draw(st.integers(2, 21))
    return dict(
        bsz=bsz, n=n, c=draw(st.integers(1, 9)), d=draw(st.integers(1, 7)), cls=cls, dist=dist, p=p, h=h, w=w,
        r=draw(st.integers(0, n)), dtype=draw(st.sampled_from(DTYPES)), sized=draw(st.booleans()),
        nonfinite=draw(st.sampled_from([None, "inf", "nan"])), seed=draw(st.integers(0, 2 ** 16)),
    )


def data(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, n, c, d, dt = case["bsz"], case["n"], case["c"], case["d"], case["dtype"]
    x = torch.randn(b, n, c, generator=g).to(dt)
    metric = torch.randn(b, n, d, generator=g).to(dt)
    size = torch.randint(1, 5, (b, n, 1), generator=g).float() if case["sized"] else None
    if case["nonfinite"] is not None:
        pos = int(torch.randint(0, n, (1,), generator=g))
        x[-1, pos, 0] = float(case["nonfinite"])
    return x, metric, size


def close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def grads(fn, tensors, outs_weights):
    """Gradients of sum_k <out_k, w_k> with respect to ``tensors`` (None where no gradient)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, outs_weights))
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


def weights(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) for o in outs]


def finite_grad_mask(x):
    """Gradients are compared on finite tokens' rows only (a NaN token's gradient is NaN anyway)."""
    return torch.isfinite(x.float()).all(-1, keepdim=True)


# ----------------------------------------------------------------------------- ToMe
def _check_tome(backend, case):
    x, metric, size = data(case)
    args = (case["r"], size, case["cls"], case["dist"])
    out, osz, m = fk.tome_merge(x, metric, *args, backend=backend)
    rout, rosz, rm = fk.tome_merge(x, metric, *args, backend="reference")
    for a, b in zip(m, rm):
        assert torch.equal(a, b), (case, m, rm)
    close(out, rout, case["dtype"], "tome_merge")
    assert torch.equal(osz, rosz)
    assert all(torch.equal(a, b) for a, b in zip(fk.tome_match(metric, case["r"], case["cls"], case["dist"],
                                                               backend=backend), rm))
    # gradients in x (and size), through the registered backward of that backend
    w = weights((out, osz), case["seed"])
    fn = (lambda be: lambda xx, ss: fk.tome_merge(xx, metric, case["r"], ss, case["cls"], case["dist"],
                                                  backend=be)[:2])
    got = grads(fn(backend), (x, size), w)
    ref = grads(fn("reference"), (x, size), w)
    if m.src_idx.shape[1] == 0:
        return
    keep = finite_grad_mask(x)
    close(got[0] * keep, ref[0] * keep, case["dtype"], "grad x")
    if size is not None and bool(torch.isfinite(x).all()):
        # the kernels' size gradient reads the merged output in x's dtype; the reference's autograd
        # keeps it in float32: half-precision tolerance for half inputs
        close(got[1], ref[1], case["dtype"], "grad size")


def test_fuzz_tome_merge(backend):
    fuzz(backend, cases(), _check_tome)


def _check_maps(backend, case):
    """merge_wavg / unmerge / merge_sum driven by a token map (a ToMe map with some entries dropped)."""
    x, metric, size = data(case)
    m = fk.tome_match(metric, case["r"], case["cls"], case["dist"], backend="reference")
    tmap = m.token_map.clone()
    g = torch.Generator().manual_seed(case["seed"] + 1)
    tmap[torch.rand(tmap.shape, generator=g) < 0.2] = -1
    n_out = tmap.shape[1] - m.src_idx.shape[1]
    out, osz = map_ops(backend).merge_wavg(x, size, tmap, n_out)
    rout, rosz = map_ops("reference").merge_wavg(x, size, tmap, n_out)
    close(out, rout, case["dtype"], "merge_wavg")
    close(osz, rosz, torch.float32, "merge_wavg size")
    close(map_ops(backend).merge_sum(x, tmap, n_out), map_ops("reference").merge_sum(x, tmap, n_out), case["dtype"],
          "merge_sum")
    y = torch.randn(x.shape[0], n_out, x.shape[2], generator=g).to(case["dtype"])
    assert torch.equal(map_ops(backend).unmerge(y, tmap), map_ops("reference").unmerge(y, tmap))
    gw = [torch.randn(o.shape, generator=g) for o in (out,)]
    got = grads(lambda xx: (map_ops(backend).merge_wavg(xx, size, tmap, n_out)[0],), (x,), gw)
    ref = grads(lambda xx: (map_ops("reference").merge_wavg(xx, size, tmap, n_out)[0],), (x,), gw)
    keep = finite_grad_mask(x)
    close(got[0] * keep, ref[0] * keep, case["dtype"], "grad merge_wavg")
    got = grads(lambda yy: (map_ops(backend).unmerge(yy, tmap),), (y,), weights((x,), 3))
    ref = grads(lambda yy: (map_ops("reference").unmerge(yy, tmap),), (y,), weights((x,), 3))
    close(got[0], ref[0], case["dtype"], "grad unmerge (merge_sum)")


def test_fuzz_token_map_merges(backend):
    fuzz(backend, cases(), _check_maps)


# ----------------------------------------------------------------------------- FPET
def _check_fpet(backend, case):
    x, metric, size = data(case)
    p, grid = case["p"], (case["h"], case["w"])
    out, osz, tmap = fk.fpet_merge(x, metric, size, grid=grid, num_prefix=p, backend=backend, return_token_map=True)
    rout, rosz, rtmap = fk.fpet_merge(x, metric, size, grid=grid, num_prefix=p, backend="reference",
                                      return_token_map=True)
    assert torch.equal(tmap, rtmap), case
    close(out, rout, case["dtype"], "fpet_merge")
    close(osz, rosz, torch.float32, "fpet_merge size")
    if not bool(torch.isfinite(x).all()):
        return  # the metric gradient is a product with x by definition
    w = weights((out, osz), case["seed"])
    sz = size if size is not None else torch.ones(*x.shape[:2], 1)

    def fn(be):
        return lambda xx, mm, ss: fk.fpet_merge(xx, mm, ss, grid=grid, num_prefix=p, backend=be)
    got = grads(fn(backend), (x, metric, sz), w)
    ref = grads(fn("reference"), (x, metric, sz), w)
    close(got[0], ref[0], case["dtype"], "grad x")
    # metric gradients pass through sigmoid'(s - t): compare in float32 terms, scaled to their size
    scale = max(1.0, float(ref[1].float().abs().max()))
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[case["dtype"]] * scale
    torch.testing.assert_close(got[1].float(), ref[1].float(), atol=atol, rtol=0.05, msg=lambda m: f"grad metric: {m}")
    close(got[2], ref[2], case["dtype"] if case["dtype"] != torch.float32 else torch.float32, "grad size")


def test_fuzz_fpet_merge(backend):
    fuzz(backend, cases(fpet=True), _check_fpet)


@st.composite
def padded_cases(draw):
    """An FPET case of a padded batch (``padded=True``, the op ``fpet_merge_rows``): sizes given, some
    tokens of size 0: right padding (a random length per row, 0 included), or anywhere."""
    case = draw(cases(fpet=True))
    case.update(sized=True, pad=draw(st.sampled_from(["right", "anywhere"])))
    return case


def _check_fpet_padded(backend, case):
    x, metric, size = data(case)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    b, n = x.shape[:2]
    if case["pad"] == "right":
        lens = torch.randint(0, n + 1, (b, 1), generator=g)
        valid = torch.arange(n) < lens
    else:
        valid = torch.rand(b, n, generator=g) < 0.6
    size = size * valid.unsqueeze(-1)
    p, grid = case["p"], (case["h"], case["w"])

    def fn(be):
        return lambda xx, mm, ss: fk.fpet_merge(xx, mm, ss, grid=grid, num_prefix=p, backend=be,
                                                return_token_map=True, padded=True)
    out, osz, tmap = fn(backend)(x, metric, size)
    rout, rosz, rtmap = fn("reference")(x, metric, size)
    assert torch.equal(tmap, rtmap), case
    assert bool((tmap[~valid] == -1).all()), case
    close(out, rout, case["dtype"], "fpet_merge padded")
    assert torch.equal(osz, rosz), case
    if not bool(torch.isfinite(x).all()):
        return  # the metric gradient is a product with x by definition
    w = weights((out, osz), case["seed"])
    got = grads(lambda *t: fn(backend)(*t)[:2], (x, metric, size), w)
    ref = grads(lambda *t: fn("reference")(*t)[:2], (x, metric, size), w)
    close(got[0], ref[0], case["dtype"], "grad x")
    scale = max(1.0, float(ref[1].float().abs().max()))
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[case["dtype"]] * scale
    torch.testing.assert_close(got[1].float(), ref[1].float(), atol=atol, rtol=0.05, msg=lambda m: f"grad metric: {m}")
    close(got[2], ref[2], case["dtype"] if case["dtype"] != torch.float32 else torch.float32, "grad size")
    for t in got:  # padding gets no gradient
        assert bool((t[~valid] == 0).all()), case


def test_fuzz_fpet_merge_padded(backend):
    fuzz(backend, padded_cases(), _check_fpet_padded)


# ----------------------------------------------------------------------------- PYRA
def _check_pyra(backend, case):
    x, metric, size = data(case)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    r, c = case["r"], case["c"]
    a, b = torch.randn(r, 1, generator=g), torch.randn(1, c, generator=g) * 0.5
    lnw, lnb = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    args = (size, case["cls"], case["dist"])
    out, osz = fk.pyra_merge(x, metric, r, a, b, lnw, lnb, *args, backend=backend)
    rout, rosz = fk.pyra_merge(x, metric, r, a, b, lnw, lnb, *args, backend="reference")
    # LayerNorm over few channels amplifies half rounding: the dtype's tolerance, four times
    atol, rtol = (4 * t for t in TOL[case["dtype"]])
    torch.testing.assert_close(out.float(), rout.float(), atol=atol, rtol=rtol, equal_nan=True)
    assert torch.equal(osz, rosz)
    if not bool(torch.isfinite(x).all()) or fk.ops.tome.cap_r(r, x.shape[1], case["cls"], case["dist"]) == 0:
        return
    w = weights((out,), case["seed"])

    def fn(be):
        return lambda xx, aa, bb: (fk.pyra_merge(xx, metric, r, aa, bb, lnw, lnb, *args, backend=be)[0],)
    got = grads(fn(backend), (x, a, b), w)
    ref = grads(fn("reference"), (x, a, b), w)
    for name, gg, rr in zip(("x", "a", "b"), got, ref):
        torch.testing.assert_close(gg.float(), rr.float(), atol=atol * 10, rtol=rtol * 10, msg=lambda m: f"{name}: {m}")


def test_fuzz_pyra_merge(backend):
    fuzz(backend, cases(), _check_pyra)


def test_fuzz_grid_layouts_raise_on_every_kernel(backend):
    """Any (num_prefix, H, W) that does not describe the tokens raises, never touches memory."""
    from fpet_kernels.ops import fpet_triton

    def check(be, args):
        p, h, w = args
        x, metric = torch.randn(1, 10, 3), torch.randn(1, 10, 2)
        good = 0 <= p <= 10 and h >= 1 and w >= 1 and p + h * w == 10
        if good:
            try:
                fpet_ops.resolve_grid(10, p, (h, w))
            except ValueError:
                good = False
        call = (lambda: fpet_triton.fpet_merge(x, metric, None, p, h, w)) if be == "triton" else \
            (lambda: torch.ops.fpet.fpet_merge(x, metric, None, p, h, w))
        if good:
            assert call()[0].shape[1] == fpet_ops.grid_sizes(p, h, w)[1]
        else:
            with pytest.raises((RuntimeError, ValueError, TypeError)):
                call()

    @settings(max_examples=30 if backend == "cpu" else 12, deadline=None, derandomize=True, database=None)
    @given(st.tuples(st.integers(-3, 12), st.integers(-3, 11), st.integers(-3, 11)))
    def run(args):
        check(backend, args)
    run()


# ----------------------------------------------------------------------------- misuse (issue 18)
@st.composite
def attention_cases(draw):
    """attention_inputs arguments, each possibly wrong: qkv channels, heads, size's shape, scale, pad_v."""
    return dict(b=draw(st.integers(0, 2)), n=draw(st.integers(0, 5)), heads=draw(st.integers(-1, 3)),
                hd=draw(st.integers(0, 5)), extra=draw(st.sampled_from([0, 0, 1])),
                size=draw(st.sampled_from(["ok", "none", "rows", "batch", "last", "int"])),
                scale=draw(st.sampled_from([0.5, 2, 0.0, float("nan"), float("inf")])),
                pad_v=draw(st.sampled_from([True, False, 1])), seed=draw(st.integers(0, 2 ** 16)))


def _check_attention(backend, case):
    """A valid call equals the reference; an invalid one raises a ValueError / TypeError naming a wrong
    argument, on the public function and on the Triton kernel entry."""
    import warnings

    from fpet_kernels.ops import attention as attention_ops
    from fpet_kernels.ops import attention_triton
    g = torch.Generator().manual_seed(case["seed"])
    b, n, heads, hd = case["b"], case["n"], case["heads"], case["hd"]
    qkv = torch.randn(b, n, 3 * max(heads, 1) * hd + case["extra"], generator=g)
    size = {"ok": lambda: torch.rand(b, n, 1, generator=g) + 0.5, "none": lambda: None,
            "rows": lambda: torch.ones(b, n + 1, 1), "batch": lambda: torch.ones(b + 1, n, 1),
            "last": lambda: torch.ones(b, n, 2), "int": lambda: torch.ones(b, n, 1, dtype=torch.long)}[case["size"]]()
    scale, pad_v = case["scale"], case["pad_v"]
    wrong = []
    if heads < 1:
        wrong.append("num_heads")
    if heads >= 1 and (hd == 0 or case["extra"]):
        wrong.append("qkv")
    if case["size"] not in ("ok", "none"):
        wrong.append("size")
    if not (scale == scale and abs(scale) != float("inf") and scale != 0):
        wrong.append("scale")
    if not isinstance(pad_v, bool):
        wrong.append("pad_v")
    entries = [lambda: fk.attention_inputs(qkv, size, heads, scale, pad_v, backend=backend)]
    if backend == "triton":
        entries.append(lambda: attention_triton.attention_inputs(qkv, size, heads, scale, pad_v))
    for call in entries:
        if wrong:
            with pytest.raises((ValueError, TypeError)) as info:
                call()
            assert any(w in str(info.value) for w in wrong), (case, wrong, str(info.value))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backend="cpu": PyTorch, said once
            with torch.no_grad():
                got = call()
        exp = attention_ops.attention_inputs_reference(qkv, size, heads, scale, pad_v and size is not None)
        for a, e in zip(got, exp):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_fuzz_attention_inputs_misuse(name):
    be = name if name == "reference" else _backend(name)
    examples = {"reference": 40, "cpu": 20, "triton": 8}[name]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(attention_cases())
    def run(case):
        _check_attention(be, case)
    run()


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_fuzz_map_merges_misuse(name):
    """merge_wavg / merge_sum / unmerge entries with random n_out (absurd ones included) and maps with
    entries anywhere: a valid call equals the reference, an invalid one raises naming n_out or token_map."""
    be = name if name == "reference" else _backend(name)
    from helpers import map_ops

    def check(args):
        n_out, lo, hi, seed = args
        g = torch.Generator().manual_seed(seed)
        x, size = torch.randn(2, 7, 3, generator=g), torch.rand(2, 7, 1, generator=g) + 0.5
        tmap = torch.randint(lo, hi + 1, (2, 7), generator=g)
        bad_n = not 0 <= n_out < 2 ** 31
        ok = not bad_n and bool(((tmap >= -1) & (tmap < n_out)).all())
        ops = map_ops(be)
        for call in (lambda: ops.merge_wavg(x, size, tmap, n_out), lambda: ops.merge_sum(x, tmap, n_out)):
            if ok:
                got = call()
                got = got if isinstance(got, tuple) else (got,)
                assert got[0].shape == (2, n_out, 3)
            else:
                with pytest.raises((ValueError, TypeError, RuntimeError), match="n_out" if bad_n else "token_map"):
                    call()

    @settings(max_examples=30 if name != "triton" else 8, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(st.sampled_from([-1, 0, 3, 9, 2 ** 31 - 1, 2 ** 31, 2 ** 40, -(2 ** 40)]), st.integers(-3, 0),
                     st.integers(0, 10), st.integers(0, 2 ** 16)))
    def run(args):
        if args[0] == 2 ** 31 - 1 and args[2] < 2 ** 31 - 1:
            args = (9,) + args[1:]  # a valid huge n_out would allocate 2^31 rows: not a misuse
        check(args)
    run()
