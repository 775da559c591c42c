"""bench/bench_model.py in its quickest mode (a tiny timm ViT), and the zero-cost bound it compares against."""
import csv
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TINY = "vit_tiny_patch16_224"  # 12 blocks, 197 tokens, as ViT-B/16: the same schedules apply


@pytest.fixture(scope="module")
def mc():
    sys.path.insert(0, BENCH)
    try:
        import model_common
        yield model_common
    finally:
        sys.path.remove(BENCH)


def test_zero_cost_schedules(mc):
    tome = mc.tokens_per_block(mc.Variant("zero-cost bound", "tome", 16))
    assert tome == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]  # the last r capped at (21 - 1) // 2
    pyra = mc.tokens_per_block(mc.Variant("zero-cost bound", "pyra", mc.PYRA_R))
    assert pyra == tome  # PYRA's "low" schedule is ToMe r=16 with the cap written out
    fpet = mc.tokens_per_block(mc.Variant("zero-cost bound", "fpet"))
    assert fpet == [197] * 6 + [99] * 6
    assert mc.tokens_per_block(mc.Variant("zero-cost bound", "tome", 0)) == [197] * 12


def test_zero_cost_wraps_and_restores(mc):
    model = mc.make_model(TINY, "cpu", torch.float32)
    clean = mc.signature(model)
    x = mc.make_input(2, "cpu", torch.float32)
    with torch.inference_mode():
        ref = model(x)
        undo = mc.zero_cost(model, mc.Variant("zero-cost bound", "tome", 0))
        same = model(x)  # r = 0: the wrapped blocks compute timm's forward
        undo()
        undo = mc.zero_cost(model, mc.Variant("zero-cost bound", "fpet"))
        seen = []
        hook = model.blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        model(x)
        hook.remove()
        undo()
    torch.testing.assert_close(same, ref)
    assert seen == [99]
    assert mc.signature(model) == clean


def test_bench_model_quick(tmp_path):
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:
        plot = ["--no-plot"]
    cmd = [sys.executable, os.path.join(BENCH, "bench_model.py"), "--quick", "--device", "cpu", "--model", TINY,
           "--out", str(tmp_path)] + plot
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | method | r | dtype | B |" in proc.stdout
    assert "ToMe r sweep" in proc.stdout
    with open(tmp_path / "model_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"as shipped", "zero-cost bound", "reference patch", "fused"}
    assert {r["method"] for r in rows} == {"-", "tome", "fpet", "pyra"}
    assert {r["r"] for r in rows if r["method"] == "tome"} == {"0", "16"}
    assert all(r["batch"] == "1" and r["dtype"] == "float32" and r["model"] == TINY for r in rows)
    for r in rows:  # measured, or (before fpet_kernels.patch existed) marked unavailable
        assert r["median_ms"] or r["note"].startswith("unavailable"), r
        if r["median_ms"]:
            assert float(r["median_ms"]) > 0 and float(r["images_per_s"]) > 0
    assert any(r["median_ms"] for r in rows if r["variant"] == "fused")  # fpet_kernels.patch exists now
    if not plot:
        assert (tmp_path / "model_throughput_cpu.png").stat().st_size > 0
