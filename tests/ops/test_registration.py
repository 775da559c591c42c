"""Registration of the custom ops: torch.library.opcheck on every op and backend, torch.compile
(fullgraph) and torch.export of code calling the public API, forward and backward against eager."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import fpet_kernels as fk
import simt_ext
from fpet_kernels.ops import library
from fpet_kernels.ops.pyra import pyra_merge_rows_op_reference
from fpet_kernels.ops.tome import tome_match_rows_reference
from helpers import REQUIRE_EXTENSION, gen, gen_size, is_live, missing_message

OPS = ("tome_match", "tome_merge", "merge_wavg", "merge_wavg_backward", "unmerge", "merge_sum", "fpet_merge",
       "fpet_merge_backward", "pyra_merge", "pyra_merge_backward", "pyra_merge_rows", "pyra_merge_rows_backward")
B, N, C, D, R = 2, 17, 8, 4, 5  # N = 1 class token + a 4 x 4 grid


def _op(name: str, backend: str):
    """The registered op a kernel backend runs: the C++ kernels are ``torch.ops.fpet.<name>`` itself
    (CPU and CUDA implementations, picked by the dispatcher), Triton is ``<name>_triton``."""
    return getattr(torch.ops.fpet, name + ("_triton" if backend == "triton" else "")).default


def test_every_op_is_registered():
    for name in OPS:
        for suffix in ("", "_triton"):
            op = getattr(torch.ops.fpet, name + suffix).default
            assert all(a.name != "backend" for a in op._schema.arguments)
    with pytest.raises(RuntimeError, match="does not exist"):  # no second namespace of raw kernels
        torch._C._dispatch_has_kernel_for_dispatch_key("fpet_C::tome_merge", "CPU")


def test_extension_is_live_when_required():
    """CI sets FPET_REQUIRE_EXTENSION=1: a missing or broken extension must fail the suite."""
    if not REQUIRE_EXTENSION:
        pytest.skip("FPET_REQUIRE_EXTENSION is not set")
    assert fk.backends()["extension"], missing_message("cpu")
    assert is_live("cpu"), missing_message("cpu")
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{name}", "CPU"), \
            f"the extension registers no CPU kernel for fpet::{name}"


def test_fake_tensor_mode_traces_public_calls():
    """FakeTensorMode (what torch.export and compilers trace with) through the public API, no grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, metric = torch.empty(2, 197, 32), torch.empty(2, 197, 16)
        y, s, m = fk.tome_merge(x, metric, 16, class_token=True)
        assert y.shape == (2, 181, 32) and s.shape == (2, 181, 1) and m.token_map.shape == (2, 197)
        assert fk.unmerge(y, m).shape == (2, 197, 32)
        z, sz = fk.fpet_merge(x, metric, class_token=True)
        assert z.shape == (2, 99, 32) and sz.dtype == torch.float32


def _samples(dtype=torch.float32, grad=True):
    """Per op: a list of (args) tuples, small inputs, with and without optional tensors."""
    x = gen(B, N, C, dtype=dtype, seed=0).requires_grad_(grad)
    metric = gen(B, N, D, dtype=dtype, seed=1)
    size = gen_size(B, N, dtype=dtype).requires_grad_(grad)
    m = fk.tome_match(metric, R, True, backend="reference")
    n_out = N - R
    y = gen(B, n_out, C, dtype=dtype, seed=2).requires_grad_(grad)
    out, out_size, _ = fk.reference.tome_merge_reference(x.detach(), metric, R, size.detach(), True, False)
    tmap_drop = m.token_map.clone()
    tmap_drop[:, 3] = -1  # a dropped token (FPET ties)
    f_out, f_size, f_map = fk.reference.fpet_merge_reference(x.detach(), metric, size.detach(), 1, 4, 4)
    a = gen(R, 1, dtype=dtype, seed=3).requires_grad_(grad)
    b = (0.3 * gen(1, C, dtype=dtype, seed=4)).requires_grad_(grad)
    lw = (1 + 0.1 * gen(C, dtype=dtype, seed=5)).requires_grad_(grad)
    lb = (0.1 * gen(C, dtype=dtype, seed=6)).requires_grad_(grad)
    p_out, p_size, pm = fk.reference.pyra_merge_reference(x.detach(), metric, R, a.detach(), b.detach(), lw.detach(),
                                                         lb.detach(), size.detach(), True, False)
    g = gen(B, n_out, C, dtype=dtype, seed=7)
    gf = gen(*f_out.shape, dtype=dtype, seed=8)
    gs = gen(*f_size.shape, dtype=torch.float32, seed=9)
    mg = metric.detach().clone().requires_grad_(grad)
    # PYRA's per-row op: a padded batch (row 1 has 11 valid tokens) and a threshold matching
    size_p = size.detach().clone()
    size_p[1, 11:] = 0
    rs, rd, _, rmap, _ = tome_match_rows_reference(metric, R, True, False, size_p[..., 0] != 0, None)
    ts, td, _, tmap_thr, _ = tome_match_rows_reference(metric, R, True, False, None, 0.2)
    r_out, r_size = pyra_merge_rows_op_reference(x.detach(), size_p, rs, rd, rmap, a.detach(), b.detach(), lw.detach(),
                                                 lb.detach(), n_out, 1e-5)
    size_p.requires_grad_(grad)
    return {
        "tome_match": [(metric, R, True, False), (metric, 0, False, False), (metric, R, True, True)],
        "tome_merge": [(x, metric, R, size, True, False), (x, metric, R, None, False, True),
                       (x, metric, 0, size, True, False)],
        "merge_wavg": [(x, size, m.token_map, n_out), (x, None, tmap_drop, n_out)],
        "merge_wavg_backward": [(g, size.detach(), out_size, m.token_map), (g, None, out_size, tmap_drop)],
        "unmerge": [(y, m.token_map), (y, tmap_drop)],
        "merge_sum": [(x, m.token_map, n_out), (x, tmap_drop, n_out)],
        "fpet_merge": [(x, mg, size, 1, 4, 4), (x, mg, None, 1, 4, 4), (x, metric, size, 1, 2, 8)],
        "fpet_merge_backward": [(gf, gs, x.detach(), metric, size.detach(), f_out, f_size, f_map, 1, 4, 4),
                                (gf, None, x.detach(), metric, None, f_out, f_size, f_map, 1, 4, 4)],
        "pyra_merge": [(x, metric, R, a, b, lw, lb, size, True, False, 1e-5),
                       (x, metric, R, a, b, lw, lb, None, False, True, 1e-3)],
        "pyra_merge_backward": [(g, None, x.detach(), size.detach(), p_out, p_size, pm.src_idx, pm.dst_idx,
                                 pm.unm_idx, a.detach(), b.detach(), lw.detach(), lb.detach(), 1e-5, False)],
        "pyra_merge_rows": [(x, size_p, rs, rd, rmap, a, b, lw, lb, n_out, 1e-5),
                            (x, None, ts, td, tmap_thr, a, b, lw, lb, N, 1e-3)],
        "pyra_merge_rows_backward": [(g, gen(B, n_out, 1, seed=20), x.detach(), size_p.detach(), r_out, r_size, rs, rd,
                                      rmap, a.detach(), b.detach(), lw.detach(), lb.detach(), 1e-5),
                                     (g, None, x.detach(), None, r_out, r_size, rs, rd, rmap, a.detach(), b.detach(),
                                      lw.detach(), lb.detach(), 1e-5)],
    }


@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(kernel_backend, op_name):
    op = _op(op_name, kernel_backend)
    for args in _samples()[op_name]:
        opcheck(op, args)


@pytest.mark.parametrize("op_name", ["tome_merge", "fpet_merge", "pyra_merge", "merge_wavg", "unmerge",
                                     "pyra_merge_rows"])
def test_opcheck_half(kernel_backend, op_name):
    op = _op(op_name, kernel_backend)
    for args in _samples(torch.bfloat16, grad=False)[op_name][:1]:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------------- torch.compile / export
def _pipeline(backend):
    """A block-like function calling every public op: ToMe merge, unmerge, FPET merge, PYRA merge."""

    def f(x, metric, size, a, b, lw, lb):
        y, s, m = fk.tome_merge(x, metric, 16, size, True, backend=backend)
        full = fk.unmerge(y, m, backend=backend)
        z, sz = fk.fpet_merge(full + x, metric, size, True, backend=backend)
        p, sp = fk.pyra_merge(z, z.detach()[..., :16], 8, a, b, lw, lb, sz, True, backend=backend)
        return p, sp, y, s

    return f


def _pipeline_inputs(n=197, c=32):
    x = gen(2, n, c, seed=10)
    metric = gen(2, n, 16, seed=11)
    size = gen_size(2, n)
    a, b = gen(8, 1, seed=12), 0.3 * gen(1, c, seed=13)
    lw, lb = 1 + 0.1 * gen(c, seed=14), 0.1 * gen(c, seed=15)
    return x, metric, size, a, b, lw, lb


def _run(f, inputs):
    leaves = [t.detach().clone().requires_grad_(i != 2) for i, t in enumerate(inputs)]  # size is a constant
    p, sp, y, s = f(*leaves)
    (p.pow(2).sum() + y.sum() + sp.sum() + s.sum()).backward()
    return [p, sp, y, s] + [t.grad for t in leaves if t.requires_grad]


def _compare(got, exp, atol=1e-5, rtol=1e-5):
    for i, (u, v) in enumerate(zip(got, exp)):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol, msg=lambda m: f"output/grad #{i}: {m}")


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    inputs = _pipeline_inputs()
    f = _pipeline(backend)
    exp = _run(f, inputs)
    got = _run(torch.compile(f, fullgraph=True, backend=compile_backend), inputs)
    _compare(got, exp)


def test_torch_compile_fullgraph_default_backend_argument():
    """backend=None (the automatic choice, what users call) also compiles without graph breaks."""
    torch._dynamo.reset()
    inputs = _pipeline_inputs()
    f = _pipeline(None)
    exp = _run(f, inputs)
    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), inputs)
    _compare(got, exp)


def test_torch_compile_closures_fullgraph(backend):
    """ToMe's closure API under torch.compile: merge_wavg, merge(mode), unmerge, merge_source."""
    torch._dynamo.reset()
    x, metric, size = gen(2, 65, 16, seed=16), gen(2, 65, 8, seed=17), gen_size(2, 65)

    def f(x, metric, size):
        merge, unmerge = fk.bipartite_soft_matching(metric, 16, True, backend=backend)
        y, s = fk.merge_wavg(merge, x, size)
        src = fk.merge_source(merge, x)
        fmerge = fk.bipartite_diff_matching(metric, True, backend=backend)
        z, sz = fk.merge_wavg(fmerge, x, size)
        return y, s, unmerge(merge(x, mode="amax")), src, z, sz

    exp = f(x, metric, size)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, metric, size)
    _compare(got, exp)


def test_torch_compile_inductor(backend):
    """The default (inductor) compiler on CPU, forward and backward."""
    torch._dynamo.reset()
    inputs = _pipeline_inputs(n=65, c=16)
    f = _pipeline(backend)
    exp = _run(f, inputs)
    got = _run(torch.compile(f, fullgraph=True), inputs)
    _compare(got, exp, atol=1e-4, rtol=1e-4)


def test_torch_export(backend):
    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = torch.nn.Parameter(gen(8, 1, seed=18))
            self.b = torch.nn.Parameter(0.3 * gen(1, c, seed=19))
            self.ln = torch.nn.LayerNorm(c)

        def forward(self, x, metric, size):
            y, s, m = fk.tome_merge(x, metric, 16, size, True, backend=backend)
            z, sz = fk.fpet_merge(fk.unmerge(y, m, backend=backend), metric, size, True, backend=backend)
            return fk.pyra_merge(z, z[..., :8], 8, self.a, self.b, self.ln.weight, self.ln.bias, sz, True,
                                 backend=backend)

    mod = Block(32)
    x, metric, size = gen(2, 197, 32, seed=20), gen(2, 197, 16, seed=21), gen_size(2, 197)
    ep = torch.export.export(mod, (x, metric, size))
    got = ep.module()(x, metric, size)
    exp = mod(x, metric, size)
    _compare(got, exp, atol=0, rtol=0)
    x2 = gen(2, 197, 32, seed=22)
    _compare(ep.module()(x2, metric, size), mod(x2, metric, size), atol=0, rtol=0)


def test_every_emulated_op_has_a_record(simt_ops):
    """The test-only emulator (csrc/emu/) holds implementations only: every op it implements has a
    record (``library.OPS``, with CUDA kernels) and runs under that record's schema, the schema of
    ``torch.ops.fpet.<name>`` (tests/simt_ext.py defines them before loading it); every op with CUDA
    kernels is emulated."""
    implemented = simt_ext.implemented_ops()
    assert implemented, "the emulator registers no kernels"
    without_record = [name for name in implemented if name not in library.OPS]
    assert not without_record, f"emulated ops without a record in library.OPS: {without_record}"
    no_cuda = [name for name in implemented if not library.OPS[name].cuda]
    assert not no_cuda, f"emulated ops whose record says they have no CUDA kernels: {no_cuda}"
    assert sorted(op.name for op in simt_ext.emulated_ops()) == implemented
    for name in implemented:
        got = getattr(simt_ops, name).default._schema
        exp = getattr(torch.ops.fpet, name).default._schema
        assert [(a.name, str(a.type)) for a in got.arguments] == [(a.name, str(a.type)) for a in exp.arguments], name
        assert [str(r.type) for r in got.returns] == [str(r.type) for r in exp.returns], name
