"""Time reference vs fused ops at ViT-B/16 shapes, print a table, append the results to a CSV.

    python bench/run_table.py                      # CPU: tome_merge and fpet_merge, B in {1, 8, 64}
    python bench/run_table.py --batches 64 --modes forward
    python bench/run_table.py --csv bench/results/results.csv

Medians: torch.utils.benchmark (CPU) or triton.testing.do_bench (GPU). Every row is appended to
the CSV keyed by device, torch and package version, so tables and plots are made from it.
"""
import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys

import torch

from common import BATCHES, CPU_ANCHORS_MS, MODES, OPS, bytes_moved, fk, make_call, providers

HERE = os.path.dirname(os.path.abspath(__file__))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def median_ms(call, device: str, min_run_time: float) -> float:
    call()  # warm-up (allocations, lazy init)
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, return_mode="median"))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())\
        .blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU measurement")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "results.csv"))
    args = ap.parse_args(argv)

    dev, provs = args.device, providers(args.device)
    if provs == ["reference"]:
        print(f"warning: no fused kernel is live ({fk.backends()}); timing the reference only", file=sys.stderr)
    jobs = [(op, mode, b, p) for op in args.ops for mode in args.modes for b in args.batches for p in provs]
    rows, stamp = [], datetime.datetime.now().isoformat(timespec="seconds")
    name, rev = device_name(dev), git_rev()
    print(f"# {name}, torch {torch.__version__}, fpet_kernels {fk.__version__} ({rev}), float32, "
          f"N=197 C=768 D=64 r=16", file=sys.stderr)
    for k, (op, mode, b, p) in enumerate(jobs, 1):
        print(f"[{k}/{len(jobs)}] {op} {mode} B={b} {p} ...", end="", flush=True, file=sys.stderr)
        ms = median_ms(make_call(op, p, mode, b, dev), dev, args.min_run_time)
        print(f" {ms:.3f} ms", file=sys.stderr)
        rows.append(dict(date=stamp, device=name, torch=torch.__version__, version=fk.__version__, commit=rev,
                         op=op, mode=mode, batch=b, provider=p, dtype="float32", median_ms=f"{ms:.4f}"))

    ref = {(r["op"], r["mode"], r["batch"]): float(r["median_ms"]) for r in rows if r["provider"] == "reference"}
    print("\n| op | mode | B | provider | median ms | vs reference | vs published anchor | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["op"], r["mode"], r["batch"])
        ms = float(r["median_ms"])
        anchor = CPU_ANCHORS_MS.get(key[:2], {}).get(r["batch"]) if dev == "cpu" else None
        vs_anchor = f"{anchor / ms:.1f}x ({anchor} ms)" if anchor else "-"
        gbs = f"{bytes_moved(r['op'], r['batch']) / ms / 1e6:.1f}" if r["mode"] == "forward" else "-"
        print(f"| {r['op']} | {r['mode']} | {r['batch']} | {r['provider']} | {ms:.3f} | "
              f"{ref[key] / ms:.1f}x | {vs_anchor} | {gbs} |")

    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\nappended {len(rows)} rows to {os.path.relpath(args.csv)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
