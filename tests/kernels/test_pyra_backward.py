"""PYRA's fused backward (the raw kernel ``pyra_merge_backward`` of the cpu and triton backends) against
the closed-form reference ``pyra_merge_backward_reference``: every gradient (x, a, b, ln_weight, ln_bias,
size), r = 0 / 1 / capped / at the cap, class and distillation tokens, sizes and grad_out_size given or
not, b = 0, B = 0, half precision (flash-attention's criterion), determinism, argument checks; and the
autograd of ``fk.pyra_merge`` running the kernel of its forward's backend.

The CUDA kernel's source is compared with the CPU kernel in tests/kernels/test_simt_pyra_backward.py."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fpet_kernels as fk
from fpet_kernels.ops import _backend
from fpet_kernels.ops import library
from fpet_kernels.ops import pyra as pyra_ops
from helpers import HALF_DTYPES, assert_thread_invariant, gen, gen_size, leaf

GRADS = ("x", "a", "b", "ln_weight", "ln_bias", "size")
FLAGS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="cls"),
         pytest.param(True, True, id="cls+dist"), pytest.param(False, True, id="dist")]


def params(r, c, dtype=torch.float32, seed=0, b_scale=0.5):
    a = gen(r, 1, dtype=dtype, seed=seed)
    b = b_scale * gen(1, c, dtype=dtype, seed=seed + 1)
    lw = 1 + 0.2 * gen(c, dtype=dtype, seed=seed + 2)
    lb = 0.1 * gen(c, dtype=dtype, seed=seed + 3)
    return a, b, lw, lb


def case(bsz, n, c, r, cls, dist, dtype=torch.float32, with_size=True, with_gsize=True, seed=0, b_scale=0.5,
         eps=1e-5):
    """The backward's arguments: inputs, the reference forward's output and matching, random gradients."""
    x = gen(bsz, n, c, dtype=dtype, seed=seed)
    metric = gen(bsz, n, 16, seed=seed + 1)
    size = gen_size(bsz, n, seed=seed + 2).to(dtype) if with_size else None
    r = fk.ops.tome.cap_r(r, n, cls, dist)
    a, b, lw, lb = params(r, c, dtype, seed=seed + 3, b_scale=b_scale)
    out, out_size, m = pyra_ops.pyra_merge_reference(x, metric, r, a, b, lw, lb, size, cls, dist, eps)
    grad_out = gen(bsz, n - r, c, dtype=dtype, seed=seed + 4)
    grad_out_size = gen(bsz, n - r, 1, seed=seed + 5) if with_gsize else None
    return (grad_out, grad_out_size, x, size, out, out_size, m.src_idx, m.dst_idx, m.unm_idx, a, b, lw, lb, eps,
            dist)


def kernel(backend, args):
    return library.family(backend).pyra_merge_backward(*args)


def reference(args):
    return pyra_ops.pyra_merge_backward_reference(*args)


def assert_grads_close(got, exp, rtol=1e-4, atol=1e-5, what=""):
    """Per gradient: |got - exp| <= atol * scale + rtol * |exp|, scale = max(1, max |exp|)."""
    assert len(got) == len(exp) == 6
    for name, g, e in zip(GRADS, got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype, f"{what} grad {name}: {g.shape}/{g.dtype} vs {e.shape}/{e.dtype}"
        if e.numel() == 0:
            continue
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g, e, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what} grad {name}: {m}")


# ----------------------------------------------------------------------------------- float32 vs the reference
@pytest.mark.parametrize("cls,dist", FLAGS)
@pytest.mark.parametrize("r", [pytest.param(0, id="r0"), pytest.param(1, id="r1"), pytest.param(5, id="r5"),
                               pytest.param(100, id="r-cap")])
@pytest.mark.parametrize("n,c", [pytest.param(13, 20, id="N13-C20"), pytest.param(12, 7, id="N12-C7"),
                                 pytest.param(65, 160, id="N65-C160")])
def test_kernel_equals_reference(kernel_backend, n, c, r, cls, dist):
    args = case(2, n, c, r, cls, dist, seed=n + r)
    assert_grads_close(kernel(kernel_backend, args), reference(args), what=kernel_backend)


@pytest.mark.parametrize("with_size,with_gsize", [(False, False), (True, False), (False, True)])
def test_optional_sizes(kernel_backend, with_size, with_gsize):
    args = case(2, 21, 24, 6, True, False, with_size=with_size, with_gsize=with_gsize, seed=3)
    assert_grads_close(kernel(kernel_backend, args), reference(args), what=kernel_backend)


@pytest.mark.parametrize("n,c,r", [pytest.param(197, 384, 16, id="vit-s-r16"), pytest.param(197, 96, 98, id="r-cap")])
def test_vit_shapes(kernel_backend, n, c, r):
    if kernel_backend == "triton" and c > 128:
        pytest.skip("interpreter: small shapes only")
    args = case(2, n, c, r, True, False, seed=7)
    assert_grads_close(kernel(kernel_backend, args), reference(args), what=kernel_backend)


def test_b_zero_gradients(kernel_backend):
    """b = 0 (PYRA's initial value): wt = 0, the forward is plain ToMe, but b, a, and the LayerNorm still
    get gradients (through wt); they must equal the reference's."""
    args = case(2, 33, 40, 10, True, False, seed=11, b_scale=0.0)
    got, exp = kernel(kernel_backend, args), reference(args)
    assert exp[2].abs().max() > 0
    assert_grads_close(got, exp, what=kernel_backend)


def test_eps(kernel_backend):
    args = case(2, 17, 12, 4, False, False, seed=13, eps=0.3)
    assert_grads_close(kernel(kernel_backend, args), reference(args), what=kernel_backend)


def test_empty_batch(kernel_backend):
    args = case(0, 13, 8, 4, True, False)
    gx, ga, gb, gw, gbias, gs = kernel(kernel_backend, args)
    assert gx.shape == (0, 13, 8) and gs.shape == (0, 13, 1)
    for g, p in zip((ga, gb, gw, gbias), args[9:13]):
        assert torch.equal(g, torch.zeros_like(p))


def test_parameter_dtypes(kernel_backend):
    """Parameters in bfloat16 with float32 x: the gradients come back in each parameter's dtype."""
    args = list(case(2, 15, 16, 5, True, False, seed=17))
    for i in range(9, 13):
        args[i] = args[i].to(torch.bfloat16)
    got, exp = kernel(kernel_backend, args), reference(args)
    assert [g.dtype for g in got] == [e.dtype for e in exp]
    assert_grads_close(got, exp, rtol=1.6e-2, atol=1.6e-2, what=kernel_backend)


def test_non_contiguous(kernel_backend):
    args = list(case(2, 15, 16, 5, True, False, seed=19))
    exp = kernel(kernel_backend, args)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # grad_out, strided
    args[2] = args[2].transpose(0, 1).contiguous().transpose(0, 1)  # x
    args[9] = torch.cat([args[9], args[9]], 1)[:, :1]               # a, stride 2
    assert not args[0].is_contiguous() and not args[9].is_contiguous()
    for g, e in zip(kernel(kernel_backend, args), exp):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------------- half precision
def _half_error(got, truth):
    return (got.double() - truth).abs().max().item()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_criterion(kernel_backend, dtype):
    """float16/bfloat16 inputs: each gradient's error against float64 is at most 2x the error of the
    reference computed on the same inputs (float32 math, rounded to the same dtypes), plus a small
    slack relative to the gradient's size."""
    n, c = (65, 96) if kernel_backend == "triton" else (197, 384)
    args = case(2, n, c, 16, True, False, dtype=dtype, seed=23)
    got, ref = kernel(kernel_backend, args), reference(args)
    args64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    truth = reference(args64)
    slack = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for name, g, e, t in zip(GRADS, got, ref, truth):
        assert g.dtype == e.dtype
        ek, er = _half_error(g, t), _half_error(e, t)
        assert ek <= 2 * er + slack * max(1.0, t.abs().max().item()), f"grad {name}: {ek:.3g} vs reference {er:.3g}"


# ----------------------------------------------------------------------------------- determinism
def test_deterministic(kernel_backend):
    args = case(3, 41, 48, 12, True, False, seed=29)
    first = kernel(kernel_backend, args)
    for u, v in zip(first, kernel(kernel_backend, args)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("bsz", [1, 5])
def test_cpu_thread_count_invariant(bsz):
    if not _backend.live()["cpu"]:
        pytest.skip("the C++ extension is not built")
    args = case(bsz, 197, 192, 40, True, False, seed=31)
    assert_thread_invariant(lambda: kernel("cpu", args))


# ----------------------------------------------------------------------------------- autograd wiring
@pytest.mark.parametrize("cls,dist", FLAGS[:3])
def test_autograd_runs_the_kernel(kernel_backend, cls, dist):
    """fk.pyra_merge's backward calls the fused kernel of its forward's backend, and its gradients in
    every input equal those of the reference backend."""
    calls = []

    class Spy(TorchDispatchMode):  # every op dispatched, autograd's backward calls included
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.name())
            return func(*args, **(kwargs or {}))

    n, c, r = 37, 32, 9
    x, metric, size = gen(2, n, c, seed=37), gen(2, n, 16, seed=38), gen_size(2, n, seed=39)
    ps = params(r, c, seed=40)
    g = gen(2, n - r, c, seed=41)
    res = []
    for be in (kernel_backend, "reference"):
        ins = [leaf(t) for t in (x, *ps, size)]
        with Spy():
            out, out_size = fk.pyra_merge(ins[0], metric, r, *ins[1:5], ins[5], cls, dist, backend=be)
            ((out * g).sum() + (out_size * 0.5).pow(2).sum()).backward()
        res.append([t.grad for t in ins])
    suffix = "_triton" if kernel_backend == "triton" else ""
    assert f"fpet::pyra_merge_backward{suffix}" in calls, sorted(set(calls))
    for name, u, v in zip(GRADS, *res):
        torch.testing.assert_close(u, v, atol=1e-5 * max(1.0, v.abs().max().item()), rtol=1e-4,
                                   msg=lambda m: f"grad {name}: {m}")


def test_registered_op_dispatches_by_backend(kernel_backend):
    """torch.ops.fpet.pyra_merge_backward (C++) and pyra_merge_backward_triton equal the reference."""
    args = case(2, 19, 16, 6, True, False, seed=43)
    got = library.call(library.family(kernel_backend).pyra_merge_backward, *args)
    exp = pyra_ops.pyra_merge_backward_reference(*args)
    assert_grads_close(got, exp, what=kernel_backend)


# ----------------------------------------------------------------------------------- argument checks
def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


@pytest.mark.parametrize("what,make,msg", [
    ("src_idx range", lambda a: _bad(a, 6, a[6].clone().fill_(99)), "src_idx"),
    ("src_idx duplicate", lambda a: _bad(a, 6, a[6][:, :1].expand_as(a[6]).contiguous()), "src_idx"),
    ("dst_idx range", lambda a: _bad(a, 7, a[7].clone().fill_(-3)), "dst_idx"),
    ("unm_idx range", lambda a: _bad(a, 8, a[8].clone().fill_(1000)), "unm_idx"),
    ("unm_idx shape", lambda a: _bad(a, 8, a[8][:, 1:]), "unm_idx must have shape"),
    ("grad_out shape", lambda a: _bad(a, 0, a[0][:, 1:]), "grad_out must have shape"),
    ("out shape", lambda a: _bad(a, 4, a[4][:, :, 1:]), " out must have shape"),
    ("out_size shape", lambda a: _bad(a, 5, a[5][:, 1:]), " out_size must have shape"),
    ("grad_out_size shape", lambda a: _bad(a, 1, a[1][:1]), "grad_out_size must have shape"),
    ("size shape", lambda a: _bad(a, 3, a[3][:, 1:]), " size must have shape"),
    ("a shape", lambda a: _bad(a, 9, a[9][1:]), " a must have shape"),
    ("b shape", lambda a: _bad(a, 10, a[10].view(-1)), " b must have shape"),
    ("ln_weight shape", lambda a: _bad(a, 11, a[11][1:]), "ln_weight must have shape"),
    ("ln_bias dtype", lambda a: _bad(a, 12, a[12].long()), "ln_bias must be"),
    ("index dtype", lambda a: _bad(a, 7, a[7].int()), "dst_idx must be an int64"),
    ("eps", lambda a: _bad(a, 13, float("nan")), "eps"),
])
def test_bad_arguments_raise(kernel_backend, what, make, msg):
    args = make(case(2, 13, 8, 4, True, False, seed=47))
    with pytest.raises((RuntimeError, ValueError), match=msg):
        kernel(kernel_backend, args)
