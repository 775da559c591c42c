"""bench/gpu_check.sh without a GPU: the script parses, lists its phases in priority order with a
budget that fits one 9-minute call, its python entry points import and answer --help, and its dry
run (the same logic on CPU, GPU-only steps skipped with a SKIP line) passes, prints the versions
beside every table and writes at most 8 files; an optional phase that times out warns, a required
one fails; every op is in the GPU tests, the op table and the dispatch file, which is rewritten
after every cell."""
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
PHASES = ["build", "correctness", "vit", "ops_table", "model_table", "record", "sanitizer"]
REQUIRED = PHASES[:-1]  # the sanitizer is optional: it runs last, only if time is left
CALL_SECONDS = 540      # 9 minutes


def _bash(*args, env=None, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _arrays():
    text = open(SCRIPT).read()

    def arr(name):
        m = re.search(rf"declare -A {name}=\(([^)]*)\)", text)
        assert m, f"no {name} array in gpu_check.sh"
        return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", m.group(1))}
    budget = int(re.search(r"^GPU_BUDGET=(\d+)", text, re.M).group(1))
    return text, arr("CAP"), arr("MIN"), budget


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0


def test_phases_listed_in_priority_order():
    res = _bash("--list")
    assert res.returncode == 0, res.stderr
    listed = [line.split()[1] for line in res.stdout.splitlines()[1:] if line.strip()]
    assert listed == PHASES


def test_budget_fits_one_call():
    text, cap, mins, budget = _arrays()
    assert set(cap) == set(PHASES) and set(mins) == set(PHASES)
    assert budget < CALL_SECONDS, "the script's own deadline must leave margin inside 9 minutes"
    # the minimum every required phase is guaranteed fits the budget
    assert sum(mins[p] for p in REQUIRED) <= budget
    # the header's budget table states the same caps as the arrays the script runs with
    for p in PHASES:
        row = re.search(rf"^# \| \d \| {p}\s*\|\s*(\d+)\s*\|", text, re.M)
        assert row and int(row.group(1)) == cap[p], f"header budget row of {p} does not match CAP"


def test_unknown_option_and_phase_rejected():
    assert _bash("--no-such-option").returncode == 2
    assert _bash("--skip", "nonsense").returncode == 2


@pytest.mark.parametrize("module", ["run_table", "record_dispatch", "bench_model_gpu", "profile_launches"])
def test_entry_points_import_and_help(module, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "usage" in out.getvalue().lower()


VERSIONS_RE = r"^# GPU .+ \| torch \S+ \| Triton \S+ \| CUDA \S+ \| driver \S+$"


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The whole script on CPU: GPU-only phases print SKIP; the dry checks (setup.py parses, the GPU
    tests collect, --help of the table scripts, the model bench on a tiny ViT on CPU, the collection
    of the sanitizer's tests) pass; the versions line heads the summary and the table."""
    out = tmp_path / "out"
    res = _bash(env={"FPET_GPU_CHECK_DRY": "1", "OUT": str(out)}, timeout=1800)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    summary = (out / "summary.txt").read_text()
    for p in PHASES:
        assert re.search(rf"^{p}\s+(OK|SKIP)\b", summary, re.M), f"phase {p} missing from the summary:\n{summary}"
    for p in ("build", "correctness", "vit", "ops_table", "record"):
        assert re.search(rf"^SKIP  {p}: dry run", summary, re.M), f"no SKIP line for {p}"
    assert re.search(r"^OK    sanitizer ", summary, re.M), summary
    assert "all phases passed (dry run)" in summary
    assert len(re.findall(VERSIONS_RE, summary, re.M)) == 2, summary  # after the environment, in the summary
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert 0 < len(files) <= 8, files
    table = (out / "model_table.md").read_text()
    assert re.match(VERSIONS_RE, table.splitlines()[0]), table[:300]
    assert "| 2 | eager | as shipped |" in table and "tome (reference)" in table, table
    # the GPU tests collected in the dry run include the two PET ops
    tests_log = (out / "tests.log").read_text()
    assert "test_xpeft_adapter_forward_and_gradients" in tests_log and "test_masked_weight_grad" in tests_log


@pytest.mark.slow
@pytest.mark.parametrize("phase,rc,line", [("sanitizer", 0, "WARN  sanitizer: optional phase timed out"),
                                           ("vit", 1, "FAIL  vit: timed out")])
def test_timeout_of_optional_phase_warns_of_required_phase_fails(tmp_path, phase, rc, line):
    """--cap PHASE=1 makes the phase's dry-run command (a pytest collection) time out: the optional
    sanitizer is a WARN and the run passes; a required phase is a FAIL and the run exits 1."""
    out = tmp_path / "out"
    res = _bash("--dry-run", "--only", phase, "--cap", f"{phase}=1", env={"OUT": str(out)}, timeout=900)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == rc, res.stdout[-3000:] + res.stderr[-2000:]
    assert line in summary, summary
    if rc == 0:
        assert "WARNINGS (optional, not failures): sanitizer (timeout)" in summary
        assert "all phases passed (dry run) (with warnings)" in summary
    else:
        assert "FAILED: vit (timeout)" in summary


def test_cap_option_rejects_bad_values():
    assert _bash("--cap", "sanitizer").returncode == 2
    assert _bash("--cap", "nonsense=5").returncode == 2


def _bench_module(name, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    return importlib.import_module(name)


def test_every_op_in_the_op_table_and_dispatch_cases(monkeypatch):
    """Every public op that resolves a backend is recorded for the dispatch, and can be put in the op
    table; the GPU table's default cases include X-PEFT's and PaFi's ops."""
    common = _bench_module("common", monkeypatch)
    import fpet_kernels as fk

    ops = set(fk.ops._backend.op_kernels())
    assert {op for op, _ in common.DISPATCH_CASES} == ops
    assert ops <= set(common.ALL_OPS)
    assert {"xpeft_adapter", "masked_weight_grad"} <= {op for op, _ in common.GPU_CASES}
    assert all(m == "forward" for op, m in common.DISPATCH_CASES + common.GPU_CASES if op in common.FORWARD_ONLY)


@pytest.mark.parametrize("op,mode", [("xpeft_adapter", "forward"), ("xpeft_adapter", "forward+backward"),
                                     ("masked_weight_grad", "forward")])
def test_pet_op_calls_of_the_tables_run_and_agree(monkeypatch, op, mode):
    """The tables' calls of the PET ops at B = 1 on CPU: the reference and the C++ kernel agree (the
    same first output), and bytes_moved counts at least the inputs' bytes."""
    common = _bench_module("common", monkeypatch)
    import torch

    def run(provider):
        torch.manual_seed(0)  # the backward's output gradient is drawn when the call is made
        return common.make_call(op, provider, mode, 1)()
    outs = [run("reference"), run("reference")]
    if common.is_live("cpu", "cpu", op):
        outs.append(run("cpu"))
    firsts = [o if isinstance(o, torch.Tensor) else o[0] for o in outs]
    for o in firsts[1:]:
        torch.testing.assert_close(o, firsts[0], atol=1e-4, rtol=1e-4)
    args, _ = common.make_args(op, 1)
    inputs = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert common.bytes_moved(op, 1, torch.float32, mode) >= inputs


def test_dispatch_file_written_after_every_cell(tmp_path, monkeypatch):
    """record_dispatch writes its results file after every cell: a run killed in its fourth cell
    leaves a valid file with the two medians and the one failed cell before it."""
    rd = _bench_module("record_dispatch", monkeypatch)
    import fpet_kernels as fk

    calls = []

    def measure(op, backend, mode, batch, dtype):
        calls.append((op, backend, batch))
        if len(calls) == 2:
            raise RuntimeError("out of resources")
        if len(calls) == 4:
            raise KeyboardInterrupt  # the phase's timeout kills the process
        return 0.01 * len(calls)

    out = tmp_path / "tuning"
    rec = rd.Recorder(str(out), "Fake GPU 80GB", "9.0", driver="1.2.3")
    seen = []
    with pytest.raises(KeyboardInterrupt):
        rd.measure_cells([("tome_merge", "forward"), ("xpeft_adapter", "forward")], ["float16"], [1, 256],
                         lambda op: ["triton", "cuda"] if op == "tome_merge" else ["triton"],
                         lambda *a: (seen.append(sorted(os.listdir(out)) if out.exists() else []), measure(*a))[1],
                         rec, log=lambda m: None)
    assert seen[0] == [] and seen[1] == ["fake_gpu_80gb.json"], seen  # written after the first cell
    files = os.listdir(out)
    assert files == ["fake_gpu_80gb.json"], files  # no temporary file left
    data = fk.ops._tuning.load_results(str(out))
    assert len(data) == 1
    doc = data[0]
    assert [(r["backend"], r["batch"], r["median_ms"]) for r in doc["results"]] == [("triton", 1, 0.01),
                                                                                    ("triton", 256, 0.03)]
    assert [(r["backend"], r["batch"]) for r in doc["failed"]] == [("cuda", 1)]
    assert "out of resources" in doc["failed"][0]["note"]
    assert doc["driver"] == "1.2.3" and doc["gpu"] == "Fake GPU 80GB"


@pytest.mark.slow
def test_pet_op_checks_of_the_gpu_tests_on_cpu():
    """tests/kernels/test_gpu.py's X-PEFT and PaFi checks, run on CPU tensors with the "cpu" backend (their
    logic without a GPU): they pass."""
    res = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels/test_gpu.py", "-q", "-p", "no:cacheprovider",
                          "-k", "xpeft or masked_weight_grad"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, FPET_GPU_TEST_DEVICE="cpu", FPET_TEST_BACKENDS="cpu"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"\b8 passed\b", res.stdout), res.stdout[-2000:]


def test_near_tie_detection_of_the_gpu_tests():
    """tests/kernels/test_gpu.py's near-tie rule flags an image whose scores tie and leaves a random one."""
    import torch
    import test_gpu as tg

    m = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    m[0] = m[0, :1]  # image 0: every token the same, every score ties
    assert tg.tome_ties(m, 4, False, False).tolist() == [True, False]
    assert tg.fpet_ties(m, False, False, (4, 4)).tolist() == [True, False]
    m[1, 3] = m[1, 5] * 2  # image 1: two B tokens (odd positions) with the same direction
    m[1, 2] = m[1, 5]      # and an A token pointing at both: its top-1 and top-2 tie
    assert tg.tome_ties(m, 8, False, False).tolist() == [True, True]
