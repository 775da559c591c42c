"""ONNX export: torch.onnx.export(..., dynamo=True) of patched tiny ViTs for the three methods with no
extra import or argument (the public ops trace their export-friendly formulation while the exporter
runs: the ``export`` of each op record in fpet_kernels/ops/<family>.py), on the compiled CPU kernels and on the reference
backend; onnxruntime (CPU) computes eager's logits, and the ops' matchings (token maps, indices)
equal eager's exactly. torch's global decomposition table holds no fpet op."""
import os
import subprocess
import sys

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.ops import _export
from helpers import REQUIRE_EXTENSION, is_live, missing_message, tiny_timm_vit  # noqa: E402

timm = pytest.importorskip("timm")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/ (helpers.py)
KW = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))


@pytest.fixture(params=["cpu", "reference"])
def env_backend(request, monkeypatch):
    """The backend the user picks for the whole process (FPET_BACKEND): the C++ kernels or the reference."""
    if not is_live(request.param):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message(request.param)}", pytrace=False)
        pytest.skip(missing_message(request.param))
    monkeypatch.setenv("FPET_BACKEND", request.param)
    return request.param


def patched_vit(method, seed=0):
    model = fk.patch.timm(tiny_timm_vit(seed, head_std=0.5), method, **KW[method])
    if method == "pyra":  # make the modulation matter (b starts at 0)
        for blk in model.blocks:
            if getattr(blk, "fk_pyra", None) is not None:
                torch.nn.init.normal_(blk.fk_pyra.b, std=0.5)
    return model.eval()


def run_onnx(program, *inputs):
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def assert_standard_onnx(program):
    """The graph holds no custom op: onnxruntime runs standard ONNX operators only."""
    assert not any("fpet" in n.domain or "fpet" in n.op_type for n in program.model_proto.graph.node)


@pytest.mark.parametrize("method", ["tome", "fpet", "pyra"])
def test_patched_vit_exports_and_matches_eager(method, env_backend):
    model = patched_vit(method)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    program = torch.onnx.export(model, (x,), dynamo=True)  # no extra import, no extra argument
    assert not _export.exporting()  # the exporter's flag is down again
    got = torch.from_numpy(run_onnx(program, x)[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert_standard_onnx(program)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # eager after the export: unchanged
    fk.patch.remove(model)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 1e-6  # the merges did change the function


class Ops(torch.nn.Module):
    """The ops directly: ToMe merge with a distillation token, its unmerge, an FPET merge with size,
    a PYRA merge, and the generic merge_wavg of a ToMe closure."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = torch.nn.Parameter(torch.randn(4, 1, generator=g))
        self.b = torch.nn.Parameter(torch.randn(1, 8, generator=g))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x, metric, size):
        out, out_size, m = fk.tome_merge(x, metric, 5, size, class_token=True, distill_token=True)
        full = fk.unmerge(out, m)
        f_out, f_size, f_map = fk.fpet_merge(x[:, 1:], metric[:, 1:], size[:, 1:], class_token=True,
                                             return_token_map=True)
        p_out, p_size, p_m = fk.pyra_merge(x, metric, 4, self.a, self.b, self.norm.weight, self.norm.bias, size,
                                           class_token=True, return_matching=True)
        merge, _ = fk.bipartite_soft_matching(metric, 3, class_token=True)
        w_out, w_size = fk.merge_wavg(merge, x, size)
        return (out, out_size, m.src_idx, m.dst_idx, m.unm_idx, m.token_map, full, f_out, f_size, f_map,
                p_out, p_size, p_m.token_map, w_out, w_size)


def test_export_without_the_extension():
    """A pure-Python install (fpet_kernels._C cannot load: the automatic backend is the reference):
    the user's three lines export a ToMe ViT that onnxruntime runs as eager does."""
    code = f"""
import sys, warnings
sys.modules["fpet_kernels._C"] = None  # import fpet_kernels._C raises ImportError
sys.path[:0] = {[TESTS, os.path.dirname(TESTS)]!r}
import torch, onnxruntime as ort
import fpet_kernels as fk
from helpers import tiny_timm_vit
assert not fk.backends()["live"]["cpu"]
model = fk.patch.timm(tiny_timm_vit(0, head_std=0.5), method="tome", r=3).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the warning that the reference is used
    expected = model(x)
program = torch.onnx.export(model, (x,), dynamo=True)
sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
got = torch.from_numpy(sess.run(None, {{sess.get_inputs()[0].name: x.numpy()}})[0])
torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ops_export_with_exact_matchings(env_backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 18, 8, generator=g)  # 2 prefix tokens + 16 (FPET: 1 prefix + a 4 x 4 grid)
    metric = torch.randn(2, 18, 6, generator=g)
    size = torch.randint(1, 4, (2, 18, 1), generator=g).float()
    ops = Ops().eval()
    with torch.no_grad():
        expected = ops(x, metric, size)
    program = torch.onnx.export(ops, (x, metric, size), dynamo=True)
    got = run_onnx(program, x, metric, size)
    assert len(got) == len(expected)
    for i, (g_, e) in enumerate(zip(got, expected)):
        g_ = torch.from_numpy(g_)
        if e.dtype == torch.int64:
            assert torch.equal(g_, e), f"output {i}: indices differ"
        else:
            torch.testing.assert_close(g_, e, atol=1e-5, rtol=1e-5, msg=f"output {i}")
    assert_standard_onnx(program)


def test_ties_follow_the_spec_in_onnxruntime():
    """Equal scores everywhere (identical metric rows): the spec ranks A rows by index (a stable sort)
    and picks the lowest B column; ONNX TopK / ArgMax must give the same matching as eager."""
    x = torch.randn(1, 9, 4)
    metric = torch.ones(1, 9, 3)

    class Match(torch.nn.Module):
        def forward(self, x, metric):
            out, _, m = fk.tome_merge(x, metric, 3, class_token=True)
            return out, m.token_map

    expected = Match()(x, metric)
    got = run_onnx(torch.onnx.export(Match().eval(), (x, metric), dynamo=True), x, metric)
    torch.testing.assert_close(torch.from_numpy(got[0]), expected[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.from_numpy(got[1]), expected[1])


def test_torch_export_keeps_the_fused_ops():
    """Only the ONNX exporter sees the formulation: a plain torch.export program holds the custom op."""
    if not is_live("cpu"):
        pytest.skip(missing_message("cpu"))
    model = patched_vit("tome")
    ep = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fpet.tome_merge.default" in targets


def test_no_global_decompositions():
    """Importing the package (and the ONNX integration) leaves torch's decomposition table alone:
    Inductor under CI=... would refuse an op with a decomposition there and no lowering."""
    code = ("import torch, fpet_kernels, fpet_kernels.integrations.onnx\n"
            "bad = [str(op) for op in torch._decomp.decomposition_table if 'fpet' in str(op)]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not [op for op in torch._decomp.decomposition_table if "fpet" in str(op)]


def test_importing_the_package_does_not_import_torch_onnx():
    """The export check reads the exporter's flags from sys.modules; it must not load torch.onnx."""
    code = ("import sys, torch\n"
            "pre = 'torch.onnx' in sys.modules\n"
            "import fpet_kernels as fk\n"
            "x = torch.randn(1, 9, 4); fk.tome_merge(x, x, 2)\n"
            "assert pre or 'torch.onnx' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_wrapper(tmp_path):
    """fpet_kernels.integrations.onnx.export: a module to a file, and an ExportedProgram (its custom
    ops decomposed with a table local to the call)."""
    from fpet_kernels.integrations import onnx as fk_onnx
    model = patched_vit("tome")
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "tome.onnx"
    fk_onnx.export(model, (x,), path)
    assert path.stat().st_size > 0
    with pytest.raises(TypeError, match="args"):
        fk_onnx.export(model, x)
    with pytest.raises(TypeError, match="model"):
        fk_onnx.export(lambda t: t, (x,))
    if is_live("cpu"):  # a traced program with the C++ op in it
        ep = torch.export.export(model, (x,))
        program = fk_onnx.export(ep, (x,))
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(torch.from_numpy(run_onnx(program, x)[0]), expected, atol=1e-4, rtol=1e-4)
        assert_standard_onnx(program)
