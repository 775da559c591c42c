"""bench/gpu_check.sh without a GPU: the script parses, lists its phases in priority order with a
budget that fits one 9-minute call, its python entry points import and answer --help, and its dry
run (the same logic on CPU, GPU-only steps skipped with a SKIP line) passes and writes at most 8
files."""
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.mark.slow
def test_dry_run(tmp_path):
    """The whole script on CPU: GPU-only phases print SKIP; the dry checks (setup.py parses, the GPU
    tests collect, --help of the table scripts, the model bench on a tiny ViT on CPU) pass."""
    out = tmp_path / "out"
    res = _bash(env={"FPET_GPU_CHECK_DRY": "1", "OUT": str(out)}, timeout=1800)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    summary = (out / "summary.txt").read_text()
    for p in PHASES:
        assert re.search(rf"^{p}\s+(OK|SKIP)\b", summary, re.M), f"phase {p} missing from the summary:\n{summary}"
    for p in ("build", "correctness", "vit", "ops_table", "record", "sanitizer"):
        assert re.search(rf"^SKIP  {p}: dry run", summary, re.M), f"no SKIP line for {p}"
    assert "all phases passed (dry run)" in summary
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert 0 < len(files) <= 8, files
    table = (out / "model_table.md").read_text()
    assert "| 2 | eager | as shipped |" in table and "tome (reference)" in table, table


def test_near_tie_detection_of_the_gpu_tests():
    """tests/test_gpu.py's near-tie rule flags an image whose scores tie and leaves a random one."""
    import torch
    import test_gpu as tg

    m = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    m[0] = m[0, :1]  # image 0: every token the same, every score ties
    assert tg.tome_ties(m, 4, False, False).tolist() == [True, False]
    assert tg.fpet_ties(m, False, False, (4, 4)).tolist() == [True, False]
    m[1, 3] = m[1, 5] * 2  # image 1: two B tokens (odd positions) with the same direction
    m[1, 2] = m[1, 5]      # and an A token pointing at both: its top-1 and top-2 tie
    assert tg.tome_ties(m, 8, False, False).tolist() == [True, True]
