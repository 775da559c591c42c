"""Time reference vs fused ops at ViT-B/16 shapes, print a markdown table, append the rows to a CSV.

    python bench/run_table.py                       # CPU: tome_merge, fpet_merge, B in {1, 8, 64}, float32
    python bench/run_table.py --quick               # CPU: B=1 only, shorter measurements
    python bench/run_table.py --batches 64 --modes forward
    python bench/run_table.py --csv bench/results/results.csv

On a GPU (the default device when CUDA is available) the table follows the Triton issue:
tome_merge (r=16), fpet_merge forward and forward+backward, pyra_merge forward, unmerge; B in
{1, 64, 256}; float16 and bfloat16; providers "reference" (eager), "reference+compile" (the
reference under torch.compile), every live GPU backend ("triton", "cuda") and "floor" (a
device-to-device copy moving the op's minimum memory traffic, see common.bytes_moved). Each row
gives the achieved GB/s, its share of the copy bandwidth (1 GiB copy, read + write), the speed-up
over the eager reference and the issue's target with met / NOT met.

    python bench/run_table.py --quick               # GPU: B in {1, 256}, fewer compiled variants
    python bench/run_table.py --ops tome_merge --dtypes float16 --providers reference triton floor

torch.compile is slow to compile: only --compile-dtypes x --compile-batches are compiled, at most
--compile-max variants and --compile-budget seconds of compiling (later ones get a "skipped" row).

Medians: torch.utils.benchmark (CPU) or triton.testing.do_bench (GPU; L2 flushed before each
call, CUDA-event time of the call). Rows are appended to the CSV keyed by device, torch and package
version; a CSV written by an older version (fewer columns) is rewritten once with the new columns
(blank in the old rows).
"""
import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time

import torch

from common import (append_csv, ALL_OPS, ALL_PROVIDERS, BATCHES, BF16_VS_F16, CPU_ANCHORS_MS, DTYPES, GPU_BATCHES, GPU_CASES,
                    GPU_DTYPES, GPU_TARGETS_MS, MODES, OPS, bytes_moved, fk, is_live, make_call, make_copy_call,
                    providers, table_providers)

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_VS_FLOOR = 1.2  # the CUDA issue: tome_merge at B=256 within 1.2x of the bandwidth floor
CSV_FIELDS = ["date", "device", "torch", "version", "commit", "op", "mode", "batch", "provider", "dtype",
              "median_ms",
              # added with the GPU table (blank in rows written before)
              "triton", "min_bytes", "gbps", "copy_gbps", "pct_copy", "speedup", "target", "target_met", "note"]


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


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def median_ms(call, device: str, min_run_time: float, warmup: int = 25, rep: int = 100) -> float:
    call()  # warm-up (allocations, lazy init, kernel compilation)
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())\
        .blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def copy_bandwidth(device: str, mib: int, min_run_time: float, warmup: int, rep: int) -> tuple:
    """(GB/s, ms) of one device-to-device copy of ``mib`` MiB, counting read + write."""
    nbytes = mib * 2 ** 20
    call = make_copy_call(2 * nbytes, device)
    ms = median_ms(call, device, min_run_time, warmup, rep)
    del call
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6, ms


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def target_of(row, f16_ms, by_key=None) -> tuple:
    """(target text, target in ms or None) of a fused-kernel row: the issue's float16 figure, or
    "bfloat16 within 10% of float16" for bfloat16 rows (needs the float16 row of the same provider).
    The CUDA issue adds, for the "cuda" provider's tome_merge forward: at B=1 no slower than the
    Triton row, at B=256 within CUDA_VS_FLOOR x the floor row (both of the same dtype; tighter of
    the two targets wins)."""
    if row["provider"] in ("reference", "reference+compile", "floor") or row["device_type"] != "cuda":
        return "", None
    if row["provider"] == "cuda" and (row["op"], row["mode"]) == ("tome_merge", "forward") and by_key:
        key = (row["op"], row["mode"], row["batch"], row["dtype"])
        other = by_key.get(key + ("triton",)) if row["batch"] == 1 else \
            by_key.get(key + ("floor",)) if row["batch"] == 256 else None
        ms = _ms(other) if other else None
        if ms is not None:
            t = ms if row["batch"] == 1 else CUDA_VS_FLOOR * ms
            base = GPU_TARGETS_MS.get((row["op"], row["mode"]), {}).get(row["batch"]) if row["dtype"] == "float16" \
                else None
            text = f"<= triton {ms:.4f} ms" if row["batch"] == 1 else f"<= {CUDA_VS_FLOOR} x floor = {t:.4f} ms"
            if base is not None and base < t:
                return f"<= {base:g} ms", base
            return text, t
    if row["dtype"] == "float16":
        t = GPU_TARGETS_MS.get((row["op"], row["mode"]), {}).get(row["batch"])
        return (f"<= {t:g} ms", t) if t is not None else ("", None)
    if row["dtype"] == "bfloat16" and f16_ms is not None:
        t = BF16_VS_F16 * f16_ms
        return f"<= {BF16_VS_F16:.2f} x f16 = {t:.4f} ms", t
    return "", None


def fmt(v, spec, missing="-"):
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", choices=ALL_OPS,
                    help=f"default: CPU {' '.join(OPS)}; GPU the ops of the issue's cases")
    ap.add_argument("--modes", nargs="+", choices=MODES,
                    help="given: every op x every mode; default: CPU both modes, GPU the issue's cases "
                         + ", ".join(f"{o}:{m}" for o, m in GPU_CASES))
    ap.add_argument("--batches", nargs="+", type=int,
                    help=f"default: CPU {' '.join(map(str, BATCHES))} (quick: 1), "
                         f"GPU {' '.join(map(str, GPU_BATCHES))} (quick: 1 256)")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                    help=f"default: CPU float32, GPU {' '.join(GPU_DTYPES)}")
    ap.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS,
                    help="default: CPU reference + cpu; GPU reference, reference+compile, the live GPU "
                         "backends, floor")
    ap.add_argument("--quick", action="store_true", help="fewer batches and shorter measurements")
    ap.add_argument("--min-run-time", type=float, help="seconds per CPU measurement (default 0.5, quick 0.1)")
    ap.add_argument("--warmup", type=int, help="do_bench warm-up in ms (default 25, quick 10)")
    ap.add_argument("--rep", type=int, help="do_bench repetition time in ms (default 100, quick 40)")
    ap.add_argument("--compile-dtypes", nargs="+", choices=tuple(DTYPES),
                    help="dtypes compiled for reference+compile (default: the first of --dtypes)")
    ap.add_argument("--compile-batches", nargs="+", type=int,
                    help="batches compiled for reference+compile (default: 1 and the largest of --batches)")
    ap.add_argument("--compile-max", type=int, help="at most this many compiled variants (default 10, quick 4)")
    ap.add_argument("--compile-budget", type=float, default=120.0,
                    help="stop compiling new variants after this many seconds of compiling (default 120)")
    ap.add_argument("--copy-mib", type=int, help="size of the bandwidth-measuring copy (default GPU 1024, CPU 256)")
    ap.add_argument("--max-seconds", type=float,
                    help="start no new measurement after this many seconds (the rest get a 'skipped' row)")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "results.csv"))
    ap.add_argument("--no-csv", action="store_true", help="print the table only")
    args = ap.parse_args(argv)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.ops is None:
        args.ops = sorted({o for o, _ in GPU_CASES}, key=ALL_OPS.index) if gpu else list(OPS)
    if args.modes is None:
        args.cases = [c for c in GPU_CASES if c[0] in args.ops] if gpu else \
            [(o, m) for o in args.ops for m in MODES]
    else:
        args.cases = [(o, m) for o in args.ops for m in args.modes]
    # the matchings have no gradient: no forward+backward row for tome_match / tome_match_rows
    args.cases = [c for c in args.cases if c[0] not in ("tome_match", "tome_match_rows") or c[1] == "forward"]
    if args.batches is None:
        args.batches = ([1, 256] if gpu else [1]) if args.quick else list(GPU_BATCHES if gpu else BATCHES)
    args.dtypes = args.dtypes or (list(GPU_DTYPES) if gpu else ["float32"])
    args.providers = args.providers or table_providers(args.device)
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 0.5
    if args.warmup is None:
        args.warmup = 10 if args.quick else 25
    if args.rep is None:
        args.rep = 40 if args.quick else 100
    args.compile_dtypes = args.compile_dtypes or args.dtypes[:1]
    args.compile_batches = args.compile_batches or sorted({1, max(args.batches)})
    if args.compile_max is None:
        args.compile_max = 4 if args.quick else 10
    if args.copy_mib is None:
        args.copy_mib = 1024 if gpu else 256
    # The extended table: on GPU, or when a provider or dtype beyond the CPU table's was asked for.
    args.full = gpu or any(p not in providers("cpu") for p in args.providers) or args.dtypes != ["float32"]
    return args


QUICK_NOTE = ("QUICK RUN (--quick): fewer batches and shorter measurements than the recorded tables "
              "(docs/benchmarks.md): a check that every op runs; its timings are noisier and not comparable "
              "with those tables.")


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = args.device
    t_start = time.perf_counter()
    if args.quick:
        print(QUICK_NOTE, file=sys.stderr)
    name, rev = device_name(dev), git_rev()
    backends = fk.backends()
    fused = [p for p in args.providers if p not in ("reference", "reference+compile", "floor")]
    if not any(is_live(p, dev) for p in fused):
        print(f"warning: no fused kernel is live for {dev} (live: {backends['live']}); "
              "timing the reference only", file=sys.stderr)
    print(f"# {name}, torch {torch.__version__}, triton {triton_version() or '-'}, fpet_kernels {fk.__version__} "
          f"({rev}), {'/'.join(args.dtypes)}, N=197 C=768 D=64 r=16, class token; live backends: "
          f"{[k for k, v in backends['live'].items() if v]}", file=sys.stderr)

    copy_gbps = None
    if args.full:
        try:
            copy_gbps, ms = copy_bandwidth(dev, args.copy_mib, args.min_run_time, args.warmup, args.rep)
            print(f"# copy bandwidth: {copy_gbps:.0f} GB/s ({args.copy_mib} MiB device-to-device copy, "
                  f"read + write, {ms:.3f} ms)", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the table still runs, without the % column
            print(f"warning: measuring the copy bandwidth failed: {exc}", file=sys.stderr)

    jobs = [(op, mode, b, dt, p) for op, mode in args.cases for b in args.batches for dt in args.dtypes
            for p in args.providers]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows, n_compiled, compile_s = [], 0, 0.0
    for k, (op, mode, b, dt, p) in enumerate(jobs, 1):
        row = dict(date=stamp, device=name, torch=torch.__version__, version=fk.__version__, commit=rev, op=op,
                   mode=mode, batch=b, provider=p, dtype=dt, median_ms="", triton=triton_version(), note="",
                   device_type=dev, copy_gbps=f"{copy_gbps:.1f}" if copy_gbps else "")
        rows.append(row)
        if p == "reference+compile":
            if dt not in args.compile_dtypes or b not in args.compile_batches:
                rows.pop()  # not asked for: no row
                continue
            if n_compiled >= args.compile_max or compile_s >= args.compile_budget:
                row["note"] = (f"skipped: compile cap ({n_compiled} variants, {compile_s:.0f} s; "
                               "--compile-max / --compile-budget)")
                continue
        if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
            row["note"] = "skipped: --max-seconds reached"
            continue
        if not is_live(p, dev, op):
            row["note"] = (f"backend {p!r} is not live here" if not is_live(p, dev) else
                           f"backend {p!r} has no kernels for {op} in this build")
            continue
        print(f"[{k}/{len(jobs)}] {op} {mode} {dt} B={b} {p} ...", end="", flush=True, file=sys.stderr)
        call, t_make = None, time.perf_counter()
        try:
            call = make_call(op, p, mode, b, dev, DTYPES[dt])  # compiles (reference+compile)
            t_make = time.perf_counter() - t_make
            row["note"] = call.note
            row["min_bytes"] = call.min_bytes
            ms = median_ms(call, dev, args.min_run_time, args.warmup, args.rep)
            row["median_ms"] = f"{ms:.4f}"
            print(f" {ms:.4f} ms {call.note}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a failing provider is a row with a note, not a crash
            msg = " ".join(f"{type(exc).__name__}: {exc}".split())
            row["note"] = "FAILED: " + (msg if len(msg) <= 200 else msg[:197] + "...")
            print(f" {row['note']}", file=sys.stderr)
        finally:
            if p == "reference+compile":  # failed attempts count against the budget too
                n_compiled += 1
                compile_s += t_make if call is not None else time.perf_counter() - t_make
            del call
            if dev == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a sticky CUDA error is already in the row's note
                    pass

    derive(rows, copy_gbps)
    if args.quick:
        print(f"\n{QUICK_NOTE}")
    print_table(rows, args.full, copy_gbps)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if not args.no_csv and rows:
        append_csv(args.csv, rows, CSV_FIELDS)
        print(f"appended {len(rows)} rows to {os.path.relpath(args.csv)}", file=sys.stderr)
    return 0


def _ms(row):
    return float(row["median_ms"]) if row["median_ms"] else None


def derive(rows, copy_gbps) -> None:
    """Fill GB/s, % of the copy bandwidth, speed-up over the reference and the targets of each row."""
    by_key = {(r["op"], r["mode"], r["batch"], r["dtype"], r["provider"]): r for r in rows}
    for r in rows:
        ms = _ms(r)
        key = (r["op"], r["mode"], r["batch"], r["dtype"])
        ref = by_key.get(key + ("reference",))
        ref_ms = _ms(ref) if ref else None
        f16 = by_key.get((r["op"], r["mode"], r["batch"], "float16", r["provider"]))
        text, target = target_of(r, _ms(f16) if f16 else None, by_key)
        r["target"] = text
        if "min_bytes" not in r:
            r["min_bytes"] = bytes_moved(r["op"], r["batch"], DTYPES[r["dtype"]], r["mode"])
        if ms is None:
            r.update(gbps="", pct_copy="", speedup="", target_met="" if target is None else "not measured")
            continue
        gbps = r["min_bytes"] / ms / 1e6
        r["gbps"] = f"{gbps:.1f}"
        r["pct_copy"] = f"{100 * gbps / copy_gbps:.1f}" if copy_gbps else ""
        r["speedup"] = f"{ref_ms / ms:.2f}" if ref_ms else ""
        r["_speedup"] = ref_ms / ms if ref_ms else None
        r["target_met"] = "" if target is None else ("met" if ms <= target else "NOT met")


def print_table(rows, full: bool, copy_gbps) -> None:
    if not full:  # the CPU table, as it always was
        print("\n| op | mode | B | provider | median ms | vs reference | vs published anchor | GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            ms = _ms(r)
            anchor = CPU_ANCHORS_MS.get((r["op"], r["mode"]), {}).get(r["batch"])
            vs_anchor = f"{anchor / ms:.1f}x ({anchor} ms)" if anchor and ms else "-"
            gbs = r["gbps"] if r["mode"] == "forward" and r["gbps"] else "-"
            speed = f"{r['_speedup']:.1f}x" if r.get("_speedup") else "-"
            print(f"| {r['op']} | {r['mode']} | {r['batch']} | {r['provider']} | {fmt(ms, '.3f')} | "
                  f"{speed} | {vs_anchor} | {gbs} |")
        for r in rows:
            if r["note"]:
                print(f"note: {r['op']} {r['mode']} B={r['batch']} {r['provider']}: {r['note']}")
        return
    print(f"\nCopy bandwidth (device-to-device, read + write): {fmt(copy_gbps, '.0f')} GB/s. GB/s = the op's "
          "minimum memory traffic / median time; floor = a copy moving that traffic.\n")
    print("| op | mode | dtype | B | provider | median ms | GB/s | % copy BW | vs reference | target | met | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['_speedup']:.2f}x" if r.get("_speedup") else "-"
        print(f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['provider']} | "
              f"{fmt(_ms(r), '.4f')} | {r['gbps'] or '-'} | {r['pct_copy'] or '-'} | {speed} | "
              f"{r['target'] or '-'} | {r['target_met'] or '-'} | {r['note'].replace('|', '/')} |")
    judged = [r for r in rows if r["target_met"]]
    if judged:
        met = sum(r["target_met"] == "met" for r in judged)
        print(f"\ntargets: {met}/{len(judged)} met")
        for r in judged:
            if r["target_met"] != "met":
                print(f"  {r['target_met']}: {r['op']} {r['mode']} {r['dtype']} B={r['batch']} {r['provider']}: "
                      f"{fmt(_ms(r), '.4f')} ms vs {r['target']}")


if __name__ == "__main__":
    sys.exit(main())
