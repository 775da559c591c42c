"""bench/bench_model.py in its quickest mode (a tiny timm ViT), and the zero-cost bound it compares against."""
import csv
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def test_spread_and_paired_ratios(mc):
    assert mc.spread([]) == 0 and mc.spread([5.0]) == 0
    assert mc.spread([1.0, 3.0]) == 1.0
    assert mc.spread([10.0, 1.0, 2.0, 3.0, -7.0]) == 1.0  # the extremes 10 and -7 are dropped from 5 values on
    num, den = {0: 10.0, 1: 12.0, 2: 9.0}, {0: 5.0, 1: 6.0, 3: 1.0}
    assert mc.paired_ratios(num, den) == [2.0, 2.0]  # only the rounds both have
    assert mc.ratio_stats(num, den) == (2.0, 0.0)
    assert mc.ratio_stats({0: 1.0}, {0: 2.0}) == (0.5, None)  # one round: no spread to tell
    assert mc.ratio_stats({0: 1.0}, {1: 2.0}) == (None, None)


def _bench(tmp_path, *extra):
    try:
        import matplotlib  # noqa: F401
        plot = []
    except ImportError:
        plot = ["--no-plot"]
    cmd = [sys.executable, os.path.join(BENCH, "bench_model.py"), "--quick", "--device", "cpu", "--model", TINY,
           "--out", str(tmp_path)] + plot + list(extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900), plot


def test_bench_model_detects_wrong_logits(tmp_path):
    """A fused path whose logits differ from the reference patch's makes the job fail (status 3): here
    the tolerance is made negative, so that any difference (even 0) counts."""
    code = ("import sys; sys.path.insert(0, %r); import bench_model as bm; "
            "bm.LOGIT_TOLERANCE = {'float32': -1.0}; "
            "sys.exit(bm.main(['--quick', '--device', 'cpu', '--model', %r, '--methods', 'tome', '--sweep-r', "
            "'--no-plot', '--out', %r]))" % (BENCH, TINY, str(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the fused path disagrees with the reference patch" in proc.stderr
    assert "LOGITS DIFFER" in proc.stdout


def test_bench_model_train_quick(tmp_path):
    proc, _ = _bench(tmp_path, "--train", "--methods", "fpet", "tome")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PET fine-tuning step" in proc.stdout
    with open(tmp_path / "model_train_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["method"]) for r in rows] == [
        ("plain PET", "-"), ("reference patch", "fpet"), ("fused", "fpet"), ("reference patch", "tome"),
        ("fused", "tome")]
    saved = {(r["variant"], r["method"]): float(r["saved_mib"]) for r in rows}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    # merging keeps fewer activations for the backward than the plain PET model
    assert saved[("fused", "fpet")] < saved[("plain PET", "-")]
    assert saved[("fused", "tome")] < saved[("plain PET", "-")]
    for m in ("fpet", "tome"):
        fused = next(r for r in rows if r["variant"] == "fused" and r["method"] == m)
        assert float(fused["max_dlogit"]) <= float(fused["logit_tolerance"])


def test_bench_model_quick(tmp_path):
    proc, plot = _bench(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | method | r | dtype | B |" in proc.stdout
    assert "ToMe r sweep" in proc.stdout
    with open(tmp_path / "model_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"as shipped", "zero-cost bound", "reference patch", "fused"}
    assert {r["method"] for r in rows} == {"-", "tome", "fpet", "pyra"}
    assert {r["r"] for r in rows if r["method"] == "tome"} == {"0", "16"}
    assert all(r["batch"] == "1" and r["dtype"] == "float32" and r["model"] == TINY for r in rows)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["images_per_s"]) > 0 and r["reps"] == "1", r
    for r in rows:  # every fused row was checked against the reference patch
        if r["variant"] == "fused" and r["r"] != "0":
            assert float(r["max_dlogit"]) <= float(r["logit_tolerance"]), r
    if not plot:
        assert (tmp_path / "model_throughput_cpu.png").stat().st_size > 0


def _run_csv(path, rows):
    fields = ["commit", "model", "variant", "method", "r", "dtype", "batch", "mode", "speedup", "speedup_spread",
              "vs_reference_patch", "vs_reference_patch_spread"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for variant, speedup, spread in rows:
            w.writerow(dict(commit="abc", model="m", variant=variant, method="tome", r="16", dtype="float32",
                            batch="1", mode="eager", speedup=speedup, speedup_spread=spread,
                            vs_reference_patch="", vs_reference_patch_spread=""))


@pytest.mark.parametrize("second,rc", [("1.60", 0), ("1.90", 1)])
def test_compare_runs(tmp_path, second, rc):
    """Two speed-ups agree when they differ by at most the sum of their spreads (0.1 + 0.1 here)."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _run_csv(a, [("fused", "1.50", "0.1")])
    _run_csv(b, [("fused", second, "0.1")])
    out = subprocess.run([sys.executable, os.path.join(BENCH, "compare_runs.py"), str(a), str(b)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == rc, out.stdout + out.stderr
    assert ("| yes |" if rc == 0 else "| NO |") in out.stdout


def test_plot_carries_spreads_and_ticks_at_measured_r(mc, tmp_path):
    """The main job's plot: every point has an error bar from its latency's spread (as shipped: a band),
    and the r axis is ticked at the measured r only (not matplotlib's round numbers between them)."""
    pytest.importorskip("matplotlib")
    pt = mc.throughput_point
    ips, minus, plus = pt(8, 100.0, 10.0)  # 80 img/s; 90 ms -> 88.9, 110 ms -> 72.7
    assert ips == pytest.approx(80.0) and minus == pytest.approx(80 - 8e3 / 110) and plus == pytest.approx(8e3 / 90 - 80)
    assert pt(1, 5.0, None)[1:] == (0.0, 0.0)
    series = {("float32", 8, "eager"): {
        "fused": {0: pt(8, 100.0, 10.0), 4: pt(8, 90.0, 5.0), 12: pt(8, 70.0, 7.0), 16: pt(8, 60.0, 3.0)},
        "zero-cost bound": {0: pt(8, 100.0, 9.0), 16: pt(8, 55.0, 2.0)},
        "reference patch": {16: pt(8, 62.0, 4.0)},
        "as shipped": pt(8, 100.0, 6.0)}}
    drawn = mc.plot_sweep(series, str(tmp_path / "p.png"), "test")
    (info,) = drawn.values()
    assert info["xticks"] == [0, 4, 12, 16]
    assert info["yerr"]["fused"][2] == pytest.approx((8e3 / 70 - 8e3 / 77, 8e3 / 63 - 8e3 / 70))
    assert all(m > 0 and p > 0 for name in ("fused", "zero-cost bound", "reference patch", "as shipped")
               for m, p in info["yerr"][name])
    assert (tmp_path / "p.png").stat().st_size > 0
