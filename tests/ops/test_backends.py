"""Backend selection: fk.backends(), explicit requests, FPET_BACKEND, and the automatic choice on CUDA
tensors from recorded results (fpet_kernels/tuning/*.json), exercised on CPU with temporary
results files, a pretend GPU identity and pretend liveness (no GPU is needed: the choice is made
from a torch.device("cuda", i) before any CUDA tensor exists)."""
from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.ops import _backend, _tuning, library

from helpers import gen

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
H100 = ("NVIDIA H100 80GB HBM3", "9.0")


def _doc(rows, gpu=H100[0], cap=H100[1], **kw):
    doc = {"format": 1, "gpu": gpu, "capability": cap, "torch": "2.11.0", "triton": "3.5.0",
           "date": "2026-01-01T00:00:00", "results": rows}
    doc.update(kw)
    return doc


def _rows(op, ms: dict, modes=("forward",), dtypes=("float16",), batches=(1, 256)):
    return [dict(op=op, mode=m, dtype=d, batch=b, backend=be, median_ms=v * (1 + b / 256))
            for m in modes for d in dtypes for b in batches for be, v in ms.items()]


def _pretend_gpu(gpu=H100, image=90):
    """``_backend.STATE`` on a pretend GPU ``gpu`` (devices 0 and current) whose extension image is ``image``."""
    _backend.STATE.gpu_identity.update({0: gpu, -1: gpu})
    _backend.STATE.cuda_image[0] = image


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A pretend H100 with both GPU backends live for every op, results read from ``tmp_path``: fields
    of ``_backend.STATE``, forgotten (``reset()``) after the test."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _backend.STATE.reset(tuning_dir=str(tmp_path))
    _backend.STATE.live.update(cuda=True, triton=True)
    _backend.STATE.kernels["CUDA"] = dict.fromkeys(_backend.raw_kernels(), True)
    _pretend_gpu()  # the extension holds sm_90 code
    yield tmp_path
    _backend.STATE.reset()


def _write(tmp_path, doc, name="gpu.json"):
    (tmp_path / name).write_text(json.dumps(doc))


CUDA0 = torch.device("cuda", 0)


# ----------------------------------------------------------------------------- fk.backends()
def test_backends_reports_live_choice_and_extension():
    info = fk.backends()
    for key in ("live", "auto", "auto_per_op", "auto_source", "extension", "extension_cuda", "cuda_kernels",
                "env", "env_var", "cuda_device", "results_files"):
        assert key in info, key
    assert info["live"]["reference"] is True
    assert set(info["live"]) == set(_backend.BACKENDS)
    assert set(info["auto_per_op"]["cpu"]) == set(_backend.op_kernels())
    expect = "cpu" if info["live"]["cpu"] else "reference"
    assert info["auto"]["cpu"] == expect and set(info["auto_per_op"]["cpu"].values()) == {expect}
    assert info["env_var"] == "FPET_BACKEND"
    # the extension's CUDA status is known without a GPU (a dispatcher query)
    has = _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("fpet::tome_merge", "CUDA")
    assert info["extension_cuda"] == bool(has)
    assert ("tome_merge" in info["cuda_kernels"]) == bool(has)
    if not torch.cuda.is_available():
        assert "cuda" not in info["auto"] and info["cuda_device"] is None
        assert info["live"]["cuda"] is False


def test_backends_env(monkeypatch):
    monkeypatch.setenv("FPET_BACKEND", "reference")
    assert fk.backends()["env"] == "reference"


def test_backends_with_a_gpu_without_results(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = fk.backends()
    assert info["cuda_device"] == {"name": H100[0], "capability": H100[1], "extension_image": 90}
    assert info["auto"]["cuda"] == "cuda"
    for op, why in info["auto_source"]["cuda"].items():
        assert why.startswith("default order cuda/triton: no recorded results for NVIDIA H100"), (op, why)


def test_backend_tables_derive_from_the_op_records():
    """The backend tables are read from the records (no hand-written op list): the public C++ ops, each
    with its forward first and then the registered ops its backward calls, in registration order."""
    assert _backend.OPS is library.OPS
    cpp = [op for op in library.OPS.values() if op.cpp]
    assert list(_backend.op_kernels()) == [op.name for op in cpp if op.public]
    assert _backend.raw_kernels() == tuple(op.name for op in cpp)
    for name, kernels in _backend.op_kernels().items():
        assert kernels[0] == name and all(k in library.OPS and library.OPS[k].cpp for k in kernels), (name, kernels)
    assert list(fk.backends()["auto_per_op"]["cpu"]) == list(_backend.op_kernels())
    # the ops as they were listed by hand before the records (issue 20) are all there
    assert {"tome_match", "tome_merge", "merge_wavg", "unmerge", "fpet_merge", "pyra_merge", "xpeft_adapter",
            "masked_weight_grad"} <= set(_backend.op_kernels())
    assert _backend.op_kernels()["tome_merge"] == ("tome_merge", "merge_wavg_backward")
    assert _backend.op_kernels()["unmerge"] == ("unmerge", "merge_sum")
    # an op without C++ kernels (attention) is in the one list but in no C++ table
    assert "attention_inputs" in library.OPS and "attention_inputs" not in _backend.raw_kernels()


def test_state_reset_forgets_what_was_learnt(fake_gpu):
    assert _backend.live()["cuda"] is True  # pretended
    with pytest.warns(RuntimeWarning, match="once"):
        _backend.warn_once("test-key", "once")
    _backend.STATE.reset()
    assert _backend.live()["cuda"] is torch.cuda.is_available() and _backend.STATE.tuning_dir == _tuning.TUNING_DIR
    assert "test-key" not in _backend.STATE.warned and _backend.STATE.results is None


# ----------------------------------------------------------------------------- explicit requests
def test_explicit_cuda_without_gpu_raises_naming_the_argument():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    x, metric = gen(2, 17, 8), gen(2, 17, 4)
    with pytest.raises(RuntimeError, match=r"backend='cuda' was requested but is not live"):
        fk.tome_merge(x, metric, 4, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda'"):
        fk.fpet_merge(x, metric, class_token=True, backend="cuda")
    if fk.backends()["extension_cuda"]:
        with pytest.raises(RuntimeError, match="holds CUDA kernels but no CUDA device is present"):
            fk.unmerge(x[:, :13], fk.tome_match(metric, 4), backend="cuda")


def test_env_var_request_names_the_env_var(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("FPET_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"FPET_BACKEND='cuda' was requested"):
        fk.tome_merge(gen(2, 17, 8), gen(2, 17, 4), 4)
    monkeypatch.setenv("FPET_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"FPET_BACKEND='nope' is not one of"):
        fk.tome_merge(gen(2, 17, 8), gen(2, 17, 4), 4)
    monkeypatch.setenv("FPET_BACKEND", "reference")
    assert _backend.resolve(None, torch.device("cpu"), (torch.float32,), op="tome_merge") == "reference"


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        fk.tome_merge(gen(2, 17, 8), gen(2, 17, 4), 4, backend="fast")


def test_explicit_cuda_for_an_op_without_cuda_kernels(fake_gpu):
    _backend.STATE.kernels["CUDA"] = dict.fromkeys(_backend.raw_kernels(), False) | {"tome_match": True,
                                                                                     "tome_merge": True}
    assert _backend.resolve("cuda", CUDA0, (torch.float16,), op="tome_merge") == "cuda"
    with pytest.raises(RuntimeError, match=r"backend='cuda' was requested for fpet_merge, but the extension has no "
                                           r"CUDA kernel for fpet::fpet_merge"):
        _backend.resolve("cuda", CUDA0, (torch.float16,), op="fpet_merge")
    # the automatic choice needs the forward and backward kernels: tome_merge's backward is missing
    _backend.STATE.reset_choices()
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_match") == "cuda"
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "triton"
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="fpet_merge") == "triton"


def test_cuda_without_code_for_the_gpu_falls_back_to_triton(fake_gpu):
    """A build without code for this GPU's architecture (e.g. 9.0 only on an A100): the automatic
    choice takes Triton and says so once; an explicit backend='cuda' raises, naming the fix."""
    _pretend_gpu(("NVIDIA A100-SXM4-80GB", "8.0"), image=-1)
    _backend.STATE.reset_choices()
    with pytest.warns(RuntimeWarning, match=r"hold no code for NVIDIA A100.*\(sm 8.0\); using triton"):
        assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "triton"
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="fpet_merge") == "triton"  # no second warning
    with pytest.raises(RuntimeError, match=r"backend='cuda' was requested, but .*TORCH_CUDA_ARCH_LIST=8.0"):
        _backend.resolve("cuda", CUDA0, (torch.float16,), op="tome_merge")


# ----------------------------------------------------------------------------- an op without C++ kernels
def test_attention_inputs_rule_reads_its_record(fake_gpu):
    """attention_inputs (no C++ kernel, no backward): Triton on CUDA tensors, PyTorch on CPU tensors
    (silently: it is the implementation there), PyTorch for an explicit cpu/cuda (said once)."""
    op = "attention_inputs"
    assert not _backend.op_live(op, "cpu") and not _backend.op_live(op, "cuda") and _backend.op_live(op, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve(None, CUDA0, {"qkv": torch.float16}, op=op) == "triton"
        assert _backend.resolve("auto", CUDA0, {"qkv": torch.float16}, op=op) == "triton"
        assert _backend.resolve(None, CUDA0, {"qkv": torch.float64}, op=op) == "reference"
        assert _backend.resolve(None, torch.device("cpu"), {"qkv": torch.float32}, op=op) == "reference"
        assert _backend.resolve("triton", CUDA0, {"qkv": torch.float16}, op=op) == "triton"
    for name in ("cpu", "cuda"):
        with pytest.warns(RuntimeWarning, match=rf"attention_inputs has no {name} kernel \(backend='{name}'\): it "
                                                r"runs the PyTorch formulation \(permute, mean, concatenations\)"):
            assert _backend.resolve(name, CUDA0, {"qkv": torch.float16}, op=op) == "reference"
    with pytest.raises(TypeError, match="qkv is torch.float64"):
        _backend.resolve("triton", CUDA0, {"qkv": torch.float64}, op=op)
    _backend.STATE.live.update(triton=False)
    _backend.STATE.reset_choices()
    with pytest.warns(RuntimeWarning, match="the Triton kernel of attention_inputs is not live"):
        assert _backend.resolve(None, CUDA0, {"qkv": torch.float16}, op=op) == "reference"


def test_only_an_inference_only_op_leaves_its_kernel_for_a_gradient():
    """A kernel without a backward is left for the reference only where the op is differentiable
    (``inference_only``: attention_inputs); a matching (no gradient) keeps its kernel, silently."""
    assert [n for n, op in library.OPS.items() if op.inference_only] == ["attention_inputs"]
    if not _backend.live()["cpu"]:
        pytest.skip("the C++ extension is not live")
    metric = gen(2, 17, 4).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fk.tome_match(metric, 4, backend="cpu")
    exp = fk.tome_match(metric.detach(), 4, backend="reference")
    assert all(torch.equal(g, e) for g, e in zip(got, exp))


# ----------------------------------------------------------------------------- automatic choice on CUDA tensors
def test_auto_without_results_takes_the_default_order(fake_gpu):
    for op in _backend.op_kernels():
        assert _backend.resolve(None, CUDA0, (torch.float16,), op=op) == "cuda"
    be, why = _backend.choose_gpu_backend("tome_merge", *H100, _tuning.load_results(str(fake_gpu)))
    assert be == "cuda" and "no recorded results for NVIDIA H100 80GB HBM3" in why
    # float64 always takes the reference; so does a GPU with no live kernel backend
    assert _backend.resolve(None, CUDA0, (torch.float64,), op="tome_merge") == "reference"


def test_auto_follows_recorded_results(fake_gpu):
    rows = (_rows("tome_merge", {"cuda": 0.010, "triton": 0.020}) + _rows("fpet_merge", {"cuda": 0.05, "triton": 0.03},
                                                                         modes=("forward", "forward+backward"))
            + _rows("unmerge", {"cuda": 0.02}))  # no triton row: no common cell
    _write(fake_gpu, _doc(rows))
    _backend.STATE.reset_choices()
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "cuda"
    assert _backend.resolve(None, CUDA0, (torch.bfloat16,), op="fpet_merge") == "triton"
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="unmerge") == "cuda"  # default order
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="pyra_merge") == "cuda"  # no rows: default order
    _, why = _backend._auto_cuda_choice("fpet_merge", 0)
    assert why.startswith("recorded: gpu.json (NVIDIA H100 80GB HBM3, same GPU; torch 2.11.0, triton 3.5.0")
    assert "triton 0.60x the time of cuda (geometric mean of 4 cells)" in why
    _, why = _backend._auto_cuda_choice("unmerge", 0)
    assert "has no results of unmerge for cuda and triton" in why
    # an explicit request still wins over the recorded choice
    assert _backend.resolve("cuda", CUDA0, (torch.float16,), op="fpet_merge") == "cuda"


def test_auto_uses_same_capability_when_the_name_differs(fake_gpu):
    _write(fake_gpu, _doc(_rows("tome_merge", {"cuda": 0.03, "triton": 0.02}), gpu="NVIDIA H100 PCIe"))
    _write(fake_gpu, _doc(_rows("tome_merge", {"cuda": 0.01, "triton": 0.02}), gpu="NVIDIA A100", cap="8.0"),
           "a100.json")
    _backend.STATE.reset_choices()
    be, why = _backend._auto_cuda_choice("tome_merge", 0)
    assert be == "triton" and "same compute capability 9.0" in why


def test_auto_skips_a_recorded_winner_that_is_not_live(fake_gpu):
    _write(fake_gpu, _doc(_rows("tome_merge", {"cuda": 0.01, "triton": 0.02})))
    _backend.STATE.live.update(cuda=False, triton=True)
    _backend.STATE.reset_choices()
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "triton"
    _backend.STATE.live.update(cuda=False, triton=False)
    _backend.STATE.reset_choices()
    with pytest.warns(RuntimeWarning, match="no compiled kernel is live for tome_merge on cuda tensors"):
        assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "reference"


def test_auto_choice_is_made_once(fake_gpu):
    _write(fake_gpu, _doc(_rows("tome_merge", {"cuda": 0.03, "triton": 0.02})))
    _backend.STATE.reset_choices()
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "triton"
    (fake_gpu / "gpu.json").unlink()  # read once per process: later calls do not touch the file system
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "triton"


@pytest.mark.parametrize("bad", [
    "not json", json.dumps({"format": 2}), json.dumps(_doc([])),
    json.dumps(_doc([dict(op="tome_merge", mode="forward", dtype="float16", batch=1, backend="cuda", median_ms=-1)])),
    json.dumps(_doc([dict(op="tome_merge", mode="forward", dtype="float16", batch=1, backend="cuda")])),
])
def test_malformed_results_are_ignored_with_a_warning(fake_gpu, bad):
    (fake_gpu / "bad.json").write_text(bad)
    with pytest.warns(RuntimeWarning, match="ignoring recorded results"):
        assert _tuning.load_results(str(fake_gpu)) == []
    _backend.STATE.reset_choices()
    with pytest.warns(RuntimeWarning, match="ignoring recorded results"):
        assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "cuda"


def test_auto_choice_under_torch_compile_fullgraph(fake_gpu):
    """resolve runs inside traces: the first (file-reading) choice must not break the graph."""
    _write(fake_gpu, _doc(_rows("tome_merge", {"cuda": 0.03, "triton": 0.02})))
    _backend.STATE.reset_choices()
    torch._dynamo.reset()

    def f(x):
        be = _backend.resolve(None, CUDA0, (x.dtype,), op="tome_merge")
        return x + (1 if be == "triton" else 2)

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(out, torch.ones(3))
    torch._dynamo.reset()


def test_shipped_results_files_are_well_formed():
    """Files in fpet_kernels/tuning/ are measured results (bench/record_dispatch.py), never hand-written:
    they must load, name their GPU, versions and date, and cover ops the package knows."""
    tuning = os.path.join(os.path.dirname(fk.__file__), "tuning")
    assert os.path.isfile(os.path.join(tuning, "README.md"))
    names = [n for n in os.listdir(tuning) if n.endswith(".json")]
    for name in names:
        with open(os.path.join(tuning, name)) as f:
            doc = json.load(f)
        _tuning.check_results(doc)
        assert doc.get("triton") is not None and doc.get("commit"), name
        assert {r["op"] for r in doc["results"]} <= set(_backend.op_kernels()), name
        assert {r["backend"] for r in doc["results"]} <= set(_backend.GPU_BACKENDS), name


def test_record_script_round_trip(fake_gpu):
    """bench/record_dispatch.py writes what the package reads."""
    sys.path.insert(0, BENCH)
    try:
        import record_dispatch
    finally:
        sys.path.remove(BENCH)
    rows = _rows("pyra_merge", {"cuda": 0.02, "triton": 0.01})
    doc = record_dispatch.build_record(rows, [], "NVIDIA H100 80GB HBM3", "9.0", torch="2.11.0", triton="3.5.0",
                                       commit="abc1234", date="2026-01-01T00:00:00")
    path = record_dispatch.write_record(doc, str(fake_gpu))
    assert os.path.basename(path) == "nvidia_h100_80gb_hbm3.json"
    _backend.STATE.reset_choices()
    assert [d["gpu"] for d in _tuning.load_results(str(fake_gpu))] == ["NVIDIA H100 80GB HBM3"]
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="pyra_merge") == "triton"
    assert _backend.resolve(None, CUDA0, (torch.float16,), op="tome_merge") == "cuda"
    with pytest.raises(ValueError):
        record_dispatch.build_record([], [], "x", "9.0")


def test_every_resolving_op_names_itself(monkeypatch):
    """Every public op passes op= to resolve (the automatic choice is per op)."""
    seen = []
    real = _backend.resolve

    def spy(backend, device, dtypes=(), op=None):
        seen.append(op)
        return real(backend, device, dtypes, op=op)

    monkeypatch.setattr(_backend, "resolve", spy)
    x, metric, size = gen(2, 17, 8), gen(2, 17, 4), torch.ones(2, 17, 1)
    fk.tome_match(metric, 4)
    fk.tome_match(metric, 4, size=size, padded=True)  # the per-row matching: tome_match_rows
    y, _, m = fk.tome_merge(x, metric, 4)
    fk.unmerge(y, m)
    merge, _ = fk.bipartite_soft_matching(metric, 4)
    fk.merge_wavg(merge, x, size)
    fk.fpet_merge(x, metric, class_token=True)
    fk.fpet_merge(x, metric, size, class_token=True, grid=(1, 16), padded=True)  # fpet_merge_rows
    fk.merge_wavg(fk.bipartite_diff_matching(metric, class_token=True), x, size)
    fk.pyra_merge(x, metric, 4, gen(4, 1), gen(1, 8), torch.ones(8), torch.zeros(8), class_token=True)
    fk.pyra_merge(x, metric, 4, gen(4, 1), gen(1, 8), torch.ones(8), torch.zeros(8), size, True, padded=True)
    from fpet_kernels.ops import sparse, xpeft
    w = (gen(2, 8, 3), gen(2, 3), gen(2, 3, 8), gen(2, 8))
    xpeft.xpeft_adapter(x, torch.tensor([0, 1]), *w)
    sparse.masked_weight_grad(gen(5, 6), gen(5, 7), torch.tensor([0, 2]), torch.tensor([1, 3]))
    assert None not in seen and set(seen) == set(_backend.op_kernels()), seen
