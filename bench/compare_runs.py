"""Do two runs of the main job agree? Compares the speed-ups of two ``bench/bench_model.py`` CSVs.

    python bench/compare_runs.py RUN1/model_cpu.csv RUN2/model_cpu.csv

Rows are matched on (model, variant, method, r, dtype, batch, mode); of each CSV the last row of a key
counts (a CSV that several runs appended to holds each run's rows in turn). Two speed-ups (``speedup``,
and ``vs_reference_patch`` where both have it) agree when they differ by at most the sum of their
spreads, the figures printed beside them. Prints one line per row and exits 1 when any row disagrees,
2 when the files share no row.
"""
from __future__ import annotations

import argparse
import csv
import sys

KEY = ("model", "variant", "method", "r", "dtype", "batch", "mode")
FIGURES = (("speedup", "speedup_spread"), ("vs_reference_patch", "vs_reference_patch_spread"))


def load(path: str) -> dict:
    with open(path, newline="") as f:
        return {tuple(row[k] for k in KEY): row for row in csv.DictReader(f)}


def number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def compare(a: dict, b: dict):
    """Yield (key, figure, value a, spread a, value b, spread b, agree) for every figure both rows have."""
    for key in a:
        if key not in b:
            continue
        for fig, spr in FIGURES:
            va, vb = number(a[key].get(fig)), number(b[key].get(fig))
            if va is None or vb is None:
                continue
            sa, sb = number(a[key].get(spr)) or 0.0, number(b[key].get(spr)) or 0.0
            yield key, fig, va, sa, vb, sb, abs(va - vb) <= sa + sb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first")
    ap.add_argument("second")
    args = ap.parse_args(argv)
    a, b = load(args.first), load(args.second)
    commits = {r["commit"] for r in list(a.values()) + list(b.values())}
    print(f"{args.first} vs {args.second} (commits: {', '.join(sorted(commits))})")
    print("| variant | method | r | B | mode | figure | run 1 | run 2 | agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = bad = 0
    for key, fig, va, sa, vb, sb, ok in compare(a, b):
        n += 1
        bad += not ok
        _, variant, method, r, _, batch, mode = key
        if variant == "as shipped":
            continue  # its speed-up is 1 by definition
        print(f"| {variant} | {method} | {r} | {batch} | {mode} | {fig} | {va:.2f} ±{sa:.2f} | {vb:.2f} ±{sb:.2f} | "
              f"{'yes' if ok else 'NO'} |")
    if n == 0:
        print("the two files share no row")
        return 2
    print(f"{n - bad} of {n} figures agree within the sum of their spreads")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
