"""ONNX export (fpet_kernels/integrations/onnx.py): torch.onnx.export(..., dynamo=True) of patched
tiny ViTs for the three methods, with no extra argument; onnxruntime (CPU) computes eager's logits,
and the ops' matchings (token maps, indices) equal eager's exactly."""
import pytest
import torch

import fpet_kernels as fk
from helpers import tiny_timm_vit  # noqa: E402

timm = pytest.importorskip("timm")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _decompositions():
    """The opt-in import (it registers the decompositions) at test time, not at collection, and the
    decompositions taken out afterwards: the rest of the suite (Inductor under CI=...) runs without
    them, as a process that never imported fpet_kernels.integrations.onnx."""
    from fpet_kernels.integrations import onnx as fk_onnx
    fk_onnx.register()
    yield
    fk_onnx.unregister()

KW = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))
# The decompositions apply to the registered ops, which the public functions call when a compiled
# backend is live; the reference backend alone traces aten.sort.stable, which ONNX cannot take.
needs_kernels = pytest.mark.skipif(not fk.backends()["live"]["cpu"],
                                   reason="ONNX export needs the C++ CPU kernels (build the extension)")


def tiny_vit(seed=0):
    return tiny_timm_vit(seed, head_std=0.5)


def run_onnx(program, *inputs):
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


@needs_kernels
@pytest.mark.parametrize("method", ["tome", "fpet", "pyra"])
def test_patched_vit_exports_and_matches_eager(method):
    model = fk.patch.timm(tiny_vit(), method, **KW[method])
    if method == "pyra":  # make the modulation matter (b starts at 0)
        for blk in model.blocks:
            if getattr(blk, "fk_pyra", None) is not None:
                torch.nn.init.normal_(blk.fk_pyra.b, std=0.5)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    program = torch.onnx.export(model, (x,), dynamo=True)  # no extra argument
    got = torch.from_numpy(run_onnx(program, x)[0])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the graph holds no custom op: onnxruntime ran standard ONNX operators only
    assert not any("fpet" in n.domain or "fpet" in n.op_type for n in program.model_proto.graph.node)
    fk.patch.remove(model)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 1e-6  # the merges did change the function


class Ops(torch.nn.Module):
    """The ops directly: ToMe merge with a distillation token, its unmerge, an FPET merge with size."""

    def forward(self, x, metric, size):
        out, out_size, m = fk.tome_merge(x, metric, 5, size, class_token=True, distill_token=True)
        full = fk.unmerge(out, m)
        f_out, f_size, f_map = fk.fpet_merge(x[:, 1:], metric[:, 1:], size[:, 1:], class_token=True,
                                             return_token_map=True)
        return out, out_size, m.src_idx, m.dst_idx, m.unm_idx, m.token_map, full, f_out, f_size, f_map


@needs_kernels
def test_ops_export_with_exact_matchings():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 18, 8, generator=g)  # 2 prefix tokens + 16 (FPET: 1 prefix + a 4 x 4 grid)
    metric = torch.randn(2, 18, 6, generator=g)
    size = torch.randint(1, 4, (2, 18, 1), generator=g).float()
    with torch.no_grad():
        expected = Ops()(x, metric, size)
    program = torch.onnx.export(Ops(), (x, metric, size), dynamo=True)
    got = run_onnx(program, x, metric, size)
    assert len(got) == len(expected)
    for i, (g_, e) in enumerate(zip(got, expected)):
        g_ = torch.from_numpy(g_)
        if e.dtype == torch.int64:
            assert torch.equal(g_, e), f"output {i}: indices differ"
        else:
            torch.testing.assert_close(g_, e, atol=1e-5, rtol=1e-5, msg=f"output {i}")


def test_decompositions_are_registered_and_leave_torch_export_alone():
    from fpet_kernels.integrations import onnx as fk_onnx
    table = torch._decomp.decomposition_table
    for name in ("tome_match", "tome_merge", "merge_wavg", "unmerge", "merge_sum", "fpet_merge", "pyra_merge"):
        assert getattr(torch.ops.fpet, name).default in table
    assert all(op in table for name in fk_onnx.DECOMPOSITIONS for op in fk_onnx.registered_ops(name))
    # torch.export's own default decompositions keep the fused op (only the ONNX exporter decomposes it)
    assert torch.ops.fpet.tome_merge.default not in torch.export.default_decompositions()


@needs_kernels
def test_export_wrapper_writes_a_file(tmp_path):
    from fpet_kernels.integrations import onnx as fk_onnx
    model = fk.patch.timm(tiny_vit(), "tome", r=3).eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "tome.onnx"
    fk_onnx.export(model, (x,), path)
    assert path.stat().st_size > 0
    with pytest.raises(TypeError, match="args"):
        fk_onnx.export(model, x)
