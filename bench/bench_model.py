"""Whole-model throughput and latency: timm ViT-B/16 as shipped vs patched with ToMe, FPET and PYRA.

    python bench/bench_model.py              # CPU: float32, B in {1, 8}; GPU: float16 + bfloat16, B 1/64/256
    python bench/bench_model.py --quick      # B=1, ToMe r in {0, 16}, one repetition (tests, CI)
    python bench/bench_model.py --methods tome --batches 256 --dtypes float16
    python bench/bench_model.py --keep-going --max-seconds 480   # GPU machine: one failing variant does
                                                                  # not lose the rest; table within 10 min

Model: ``timm.create_model("vit_base_patch16_224", pretrained=False)`` (random init), eval mode,
``torch.inference_mode()``, model and inputs converted to the dtype. Variants (bench/model_common.py):

  as shipped        the unpatched timm model;
  zero-cost bound   the same blocks simply dropping the tokens the method merges away, right after
                    attention (no matching, no proportional attention): the most a merge can give;
  reference patch   ``fk.patch.timm(model, ..., backend="reference")`` (the pure-PyTorch ops);
  fused             ``fk.patch.timm(model, ..., backend=None)`` (C++ on CPU, Triton/CUDA on GPU);

for ToMe (r=16, proportional attention), FPET (one merge at block 6: 197 -> 99 tokens) and PYRA
(r = [16]*11 + [10]), plus a sweep of ToMe r in {0, 4, 8, 12, 16, 20} (fused and zero-cost bound).

Timing: GPU ``triton.testing.do_bench`` medians (CUDA events, warm-up first); at B=1 (``--graph-batches``)
also the forward captured in a CUDA graph and replayed (eager B=1 is host-bound; a failed capture is
reported in the row). CPU: wall-clock median of ``--reps`` forwards per row (default 3 at B=1, 2 above),
taken in interleaved rounds (each round runs every variant once), after one warm-up forward per batch.
GPU only: kernel launches per forward (torch.profiler) of ToMe r=16 at B=1 eager, as shipped vs the
patches; the issue allows at most one extra launch per merging block.

Output: a markdown table on stdout (progress on stderr); rows appended to ``<out>/model_<device>.csv``
(timestamp, commit, device, torch/timm/triton versions); images/s against r in
``<out>/model_throughput_<device>.png``; GPU launch counts in ``<out>/model_launches_<device>.json``.
``<out>`` is ``--out``, else ``$OUT``, else bench/results.

Until ``fpet_kernels.patch`` exists the patched rows read "unavailable"; once it exists any error in
a patched run propagates (``--keep-going`` records it in the row instead and exits with status 1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DTYPES  # noqa: E402
from model_common import (MODEL, METHODS, QUICK_SWEEP_R, SWEEP_R, TARGETS, TOME_R,  # noqa: E402
                          CSV_FIELDS, VARIANTS, GraphForward, Variant, append_csv, apply_variant, count_launches, fk,
                          input_size, ips_text, load_patch, main_variants, make_input, make_model, plot_sweep,
                          signature, signature_diff, sweep_variants, time_gpu, tokens_per_block, warm_profiler)
from run_table import device_name, fmt, git_rev, triton_version  # noqa: E402


def commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (the numbers are of the working tree)."""
    rev = git_rev()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, text=True,
                               capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return rev
    return rev + ("+dirty" if dirty and rev != "unknown" else "")

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    class tqdm:  # noqa: N801 - the few methods used here
        def __init__(self, total=0, **_):
            self.total, self.n = total, 0

        def update(self, n=1):
            self.n += n

        def set_description_str(self, s):
            pass

        def write(self, s, file=None):
            print(s, file=file or sys.stderr)

        def close(self):
            pass


def timm_version() -> str:
    import timm
    return timm.__version__


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                    help="default: GPU float16 bfloat16 (quick: float16), CPU float32")
    ap.add_argument("--batches", nargs="+", type=int, help="default: GPU 1 64 256, CPU 1 8 (quick: 1)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--sweep-r", nargs="*", type=int,
                    help=f"ToMe r of the sweep (default {' '.join(map(str, SWEEP_R))}, quick "
                         f"{' '.join(map(str, QUICK_SWEEP_R))}; none: no sweep)")
    ap.add_argument("--sweep-batches", nargs="+", type=int,
                    help="batches of the sweep (default: GPU all of --batches, CPU the smallest)")
    ap.add_argument("--graph-batches", nargs="*", type=int,
                    help="GPU: batches also timed under CUDA-graph replay (default 1; none: no graphs)")
    ap.add_argument("--reps", type=int,
                    help="CPU: timed forwards per row, one per interleaved round (default 3 at B=1, 2 at "
                         "larger B; quick 1)")
    ap.add_argument("--warmup-ms", type=float, help="GPU do_bench warm-up (default 100, quick 25)")
    ap.add_argument("--rep-ms", type=float, help="GPU do_bench repetition time (default 500, quick 100)")
    ap.add_argument("--no-launches", action="store_true", help="GPU: skip the kernel-launch count")
    ap.add_argument("--model", default=MODEL, help=f"timm model name (default {MODEL})")
    ap.add_argument("--quick", action="store_true", help="B=1, r in {0, 16}, one repetition (tests, CI)")
    ap.add_argument("--max-seconds", type=float,
                    help="start no new measurement after this many seconds (the rest get a 'skipped' row)")
    ap.add_argument("--keep-going", action="store_true",
                    help="record an error of a variant in its rows and go on (exit status 1) instead of raising")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                    help="folder of the CSV, plot and launch counts (default $OUT, else bench/results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.dtypes is None:
        args.dtypes = (["float16"] if args.quick else ["float16", "bfloat16"]) if gpu else ["float32"]
    if args.batches is None:
        args.batches = [1] if args.quick else ([1, 64, 256] if gpu else [1, 8])
    if args.sweep_r is None:
        args.sweep_r = list(QUICK_SWEEP_R if args.quick else SWEEP_R)
    if "tome" not in args.methods:
        args.sweep_r = []
    if args.sweep_batches is None:
        args.sweep_batches = list(args.batches) if gpu else [min(args.batches)]
    if args.graph_batches is None:
        args.graph_batches = [1]
    if not gpu:
        args.graph_batches = []
    if args.reps is None and args.quick:
        args.reps = 1
    if args.warmup_ms is None:
        args.warmup_ms = 25.0 if args.quick else 100.0
    if args.rep_ms is None:
        args.rep_ms = 100.0 if args.quick else 500.0
    if min(args.batches + args.sweep_batches) < 1 or (args.reps is not None and args.reps < 1):
        ap.error("batches and --reps must be positive")
    return args


def plan_of(args) -> "OrderedDict[Variant, list]":
    """Each variant -> the batches it is measured at (main variants: --batches; sweep: --sweep-batches)."""
    plan = OrderedDict()
    for v in main_variants(args.methods, args.variants):
        plan[v] = list(args.batches)
    for v in sweep_variants(args.sweep_r, args.variants):
        plan.setdefault(v, [])
        plan[v] += [b for b in args.sweep_batches if b not in plan[v]]
    if args.sweep_r and "as shipped" in plan:  # the sweep's horizontal line
        plan[Variant("as shipped")] += [b for b in args.sweep_batches if b not in plan[Variant("as shipped")]]
    order = {}
    for b in args.batches + args.sweep_batches:
        order.setdefault(b, len(order))
    return OrderedDict((v, sorted(bs, key=order.get)) for v, bs in plan.items())


def modes_of(batch: int, args) -> list:
    return ["eager"] + (["graph"] if batch in args.graph_batches else [])


def short(exc: BaseException, n: int = 240) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


class Runner:
    def __init__(self, args, patch_mod, patch_why):
        self.args, self.patch_mod, self.patch_why = args, patch_mod, patch_why
        self.dev = args.device
        self.t0 = time.perf_counter()
        self.failed = False
        self.fused_backend = fk.backends()["auto"].get(self.dev, "?")
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        self.common = dict(date=stamp, device=device_name(self.dev), device_type=self.dev, torch=torch.__version__,
                           timm=timm_version(), triton=triton_version(), version=fk.__version__, commit=commit(),
                           model=args.model)
        self.rows = []
        self.outputs = {}  # (variant, method, r, dtype, batch) -> eager logits (float32, CPU)

    def row(self, v: Variant, dtype: str, batch: int, mode: str, **kw) -> dict:
        r = dict(self.common, variant=v.variant, method=v.method, r=v.r_text, dtype=dtype, batch=batch, mode=mode,
                 median_ms="", reps="", note="", fused_backend=self.fused_backend if v.variant == "fused" else "",
                 _v=v, _ms=None)
        r.update(kw)
        self.rows.append(r)
        return r

    def try_apply(self, model, v, limit: int = 240):
        """``(undo, None)`` from ``apply_variant``; with --keep-going a failure comes back as
        ``(None, note)`` (and marks the run failed) instead of propagating."""
        try:
            return apply_variant(model, v, self.patch_mod), None
        except Exception as exc:  # noqa: BLE001 - re-raised unless --keep-going
            if not self.args.keep_going:
                raise
            self.failed = True
            return None, f"FAILED to apply: {short(exc, limit)}"

    def out_of_time(self) -> bool:
        return self.args.max_seconds is not None and time.perf_counter() - self.t0 > self.args.max_seconds

    # ------------------------------------------------------------------ measurements
    def measure(self, fwd, mode: str):
        """(ms, eager output or None) of the forward ``fwd``: on CPU one timed call (the rounds give the
        repetitions), on GPU the do_bench median (eager, or replaying a CUDA graph of the forward)."""
        a = self.args
        if self.dev == "cpu":
            t = time.perf_counter()
            out = fwd()
            return (time.perf_counter() - t) * 1e3, out
        if mode == "eager":
            out = fwd()  # first call: lazy init, Triton compilation; its output is checked
            torch.cuda.synchronize()
            return time_gpu(fwd, a.warmup_ms, a.rep_ms), out
        graph = GraphForward(fwd)  # capture errors propagate to the caller, who reports them
        try:
            return time_gpu(graph.replay, a.warmup_ms, a.rep_ms), None
        finally:
            graph.close()

    def reps_of(self, batch: int) -> int:
        """Samples per row: CPU --reps (default 3 at B=1, 2 at larger B), GPU 1 (a do_bench median)."""
        if self.dev != "cpu":
            return 1
        return self.args.reps or (3 if batch <= 1 else 2)

    def rounds(self, plan=None) -> int:
        return max((self.reps_of(b) for bs in (plan or {}).values() for b in bs), default=1)

    def steps(self, batches, rnd: int) -> int:
        """Measurements of one variant in round ``rnd``."""
        return sum(len(modes_of(b, self.args)) for b in batches if rnd < self.reps_of(b))

    def total_steps(self, plan) -> int:
        return len(self.args.dtypes) * sum(self.steps(bs, rnd) for bs in plan.values()
                                           for rnd in range(self.rounds(plan)))

    def run_dtype(self, dtype_name: str, plan, bar) -> None:
        """Every variant of ``plan`` at its batches and modes. On CPU in ``--reps`` interleaved rounds
        (each round times one forward of every variant in turn), so that load from other processes
        spreads over all variants instead of biasing whichever ran during it; on GPU one round of
        do_bench medians."""
        a, dev = self.args, self.dev
        dtype = DTYPES[dtype_name]
        model = make_model(a.model, dev, dtype)
        size = input_size(model)
        clean = signature(model)
        inputs = {b: make_input(b, dev, dtype, size) for bs in plan.values() for b in bs}
        rows = {}
        for v, batches in plan.items():
            for b in batches:
                for mode in modes_of(b, a):
                    note = self.patch_why if v.patched and self.patch_mod is None else ""
                    rows[(v, b, mode)] = self.row(v, dtype_name, b, mode, note=note, _samples=[])
        if dev == "cpu":  # one warm-up forward per batch (lazy init of the CPU kernels, first-touch memory)
            bar.set_description_str(f"{dtype_name} warm-up")
            with torch.inference_mode():
                for x in inputs.values():
                    model(x)
        rounds = self.rounds(plan)
        for rnd in range(rounds):
            for v, batches_all in plan.items():
                batches = [b for b in batches_all if rnd < self.reps_of(b)]
                steps = self.steps(batches, rnd)
                if not steps:
                    continue
                if v.patched and self.patch_mod is None:
                    bar.update(steps)
                    continue
                if self.out_of_time():
                    for b in batches:
                        for mode in modes_of(b, a):
                            r = rows[(v, b, mode)]
                            if not r["_samples"] and not r["note"]:
                                r["note"] = "skipped: --max-seconds reached"
                    bar.update(steps)
                    continue
                rnd_text = f" (round {rnd + 1})" if rounds > 1 else ""
                bar.set_description_str(f"{dtype_name} {v.label}{rnd_text}")
                undo, error = self.try_apply(model, v)
                if error is not None:
                    for b in batches:
                        for mode in modes_of(b, a):
                            rows[(v, b, mode)]["note"] = error
                    bar.update(steps)
                    model = self.check_restored(model, clean, v, dtype_name, dtype)
                    continue
                try:
                    for b in batches:
                        for mode in modes_of(b, a):
                            self.measure_one(rows[(v, b, mode)], model, inputs[b], rnd)
                            bar.update()
                finally:
                    undo()
                model = self.check_restored(model, clean, v, dtype_name, dtype)
        for r in rows.values():
            if r["_samples"]:
                ms = statistics.median(r["_samples"])
                r.update(median_ms=f"{ms:.4f}", _ms=ms, min_ms=f"{min(r['_samples']):.4f}",
                         reps=len(r["_samples"]) if dev == "cpu" else "do_bench")
        del model, inputs
        if dev == "cuda":
            torch.cuda.empty_cache()

    def measure_one(self, row, model, x, rnd: int) -> None:
        """One sample of ``row`` (its note says why not, for failures that do not propagate)."""
        a, v, b, mode = self.args, row["_v"], row["batch"], row["mode"]
        if row["note"].startswith(("FAILED", "graph capture")):
            return  # failed in an earlier round
        if self.out_of_time():
            if not row["_samples"]:
                row["note"] = "skipped: --max-seconds reached"
            return
        try:
            with torch.inference_mode():
                ms, out = self.measure(lambda: model(x), mode)
            row["_samples"].append(ms)
            if out is not None and rnd == 0:
                self.check_output(row, out)
            if len(row["_samples"]) == self.reps_of(b):
                shown = statistics.median(row["_samples"])
                self.bar.write(f"{v.label} {row['dtype']} B={b} {mode}: {shown:.3f} ms ({b * 1e3 / shown:.1f} img/s) "
                               f"{row['note']}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - graph capture: reported; else re-raised unless --keep-going
            if mode == "graph":
                row["note"] = f"graph capture/replay failed: {short(exc)}"
            elif a.keep_going:
                self.failed = True
                row["note"] = f"FAILED: {short(exc)}"
            else:
                raise
            self.bar.write(f"{v.label} {row['dtype']} B={b} {mode}: {row['note']}", file=sys.stderr)
            if self.dev == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a sticky error shows in the next rows
                    pass

    def check_output(self, row, out) -> None:
        logits = out.detach().float().cpu()
        if not torch.isfinite(logits).all():
            row["note"] = (row["note"] + " NON-FINITE output").strip()
        v = row["_v"]
        self.outputs[(v.variant, v.method, v.r, row["dtype"], row["batch"])] = logits

    def check_restored(self, model, clean, v: Variant, dtype_name: str, dtype):
        """``model`` once more as shipped after undoing ``v``; a leftover is an error (or, with
        --keep-going, a note and a fresh model)."""
        diff = signature_diff(clean, signature(model)) if signature(model) != clean else ""
        if not diff:
            return model
        what = "fk.patch.remove" if v.patched else "undoing the zero-cost bound"
        msg = f"{what} did not restore the model after {v.label}: {diff}"
        if not self.args.keep_going:
            raise RuntimeError(msg)
        self.failed = True
        print(f"warning: {msg}; continuing with a fresh model", file=sys.stderr)
        for r in self.rows:
            if r["_v"] == v and r["dtype"] == dtype_name:
                r["note"] = (r["note"] + " (left the model changed after remove)").strip()
        return make_model(self.args.model, self.dev, dtype)

    # ------------------------------------------------------------------ kernel launches
    def launches(self, bar) -> dict | None:
        """Kernel launches per forward of ToMe r=16 at B=1 eager (first dtype), as shipped vs patched."""
        a = self.args
        dtype_name = a.dtypes[0]
        dtype = DTYPES[dtype_name]
        variants = [Variant("as shipped")] + [Variant(n, "tome", TOME_R) for n in VARIANTS[1:]
                                              if n in a.variants]
        bar.set_description_str("kernel launches")
        model = make_model(a.model, self.dev, dtype)
        clean = signature(model)
        x = make_input(1, self.dev, dtype, input_size(model))
        n = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        toks = [n] + tokens_per_block(Variant("zero-cost bound", "tome", TOME_R), len(model.blocks), n)
        merging = sum(1 for n0, n1 in zip(toks, toks[1:]) if n1 < n0)  # blocks whose r survives the cap
        result = {"model": a.model, "dtype": dtype_name, "batch": 1, "method": "tome", "r": TOME_R,
                  "merging_blocks": merging, "variants": {}}
        warm_profiler()
        for v in variants:
            if v.patched and self.patch_mod is None:
                result["variants"][v.variant] = {"error": self.patch_why}
                continue
            undo, error = self.try_apply(model, v, 300)
            if error is not None:
                result["variants"][v.variant] = {"error": error}
                model = self.check_restored(model, clean, v, dtype_name, dtype)
                continue
            try:
                with torch.inference_mode():
                    res = count_launches(lambda: model(x))
            except Exception as exc:  # noqa: BLE001 - a profiler failure is reported, not fatal
                res = {"error": short(exc, 300)}
            finally:
                undo()
            model = self.check_restored(model, clean, v, dtype_name, dtype)
            res.pop("trace", None)
            names = res.pop("kernel_names", None)
            if names is not None:
                hist = {}
                for n in names:
                    hist[n] = hist.get(n, 0) + 1
                res["kernel_histogram"] = dict(sorted(hist.items(), key=lambda kv: -kv[1]))
            result["variants"][v.variant] = res
        bar.update()
        return result

    # ------------------------------------------------------------------ derived columns
    def derive(self) -> None:
        by = {(r["variant"], r["method"], r["_v"].r, r["dtype"], r["batch"], r["mode"]): r for r in self.rows}
        for r in self.rows:
            v, ms = r["_v"], r["_ms"]
            base = by.get(("as shipped", "-", None, r["dtype"], r["batch"], r["mode"]))
            bound = by.get(("zero-cost bound", v.method, v.r, r["dtype"], r["batch"], r["mode"]))
            base_ms = base["_ms"] if base else None
            bound_ms = bound["_ms"] if bound and v.patched else None
            r["images_per_s"] = ips_text(r["batch"], ms) if ms else ""
            r["_speedup"] = base_ms / ms if ms and base_ms else None
            r["speedup"] = f"{r['_speedup']:.3f}" if r["_speedup"] else ""
            r["bound_ms"] = f"{bound_ms:.4f}" if bound_ms else ""
            r["_bound_speedup"] = base_ms / bound_ms if bound_ms and base_ms else None
            r["bound_speedup"] = f"{r['_bound_speedup']:.3f}" if r["_bound_speedup"] else ""
            r["target"] = r["target_met"] = ""
            if self.dev == "cuda" and r["dtype"] == "float16" and v.variant == "fused":
                key = (v.method, v.r if v.method == "tome" else None, r["batch"], r["mode"])
                if key in TARGETS:
                    need, text = TARGETS[key]
                    r["target"] = text
                    r["target_met"] = ("not measured" if r["_speedup"] is None
                                       else "met" if r["_speedup"] >= need else "NOT met")
            if v.variant == "fused" and r["mode"] == "eager":
                ref = self.outputs.get(("reference patch", v.method, v.r, r["dtype"], r["batch"]))
                out = self.outputs.get((v.variant, v.method, v.r, r["dtype"], r["batch"]))
                if ref is not None and out is not None:
                    d = (out - ref).abs().max().item()
                    r["note"] = (f"max abs dlogit vs reference patch {d:.2g} (logit std {ref.std().item():.2g}) "
                                 + r["note"]).strip()

    # ------------------------------------------------------------------ output
    def print_table(self) -> None:
        a = self.args
        print(f"\n### {a.model}, {self.common['device']}: images/s and latency\n")
        print("speed-up = as shipped ms / ms (same dtype, B, mode); zero-cost bound = the same model dropping "
              "the merged tokens after attention at no cost (its speed-up, its ms).\n")
        print("| variant | method | r | dtype | B | mode | median ms | images/s | vs as shipped | "
              "zero-cost bound | target | met | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        main = {v: i for i, v in enumerate(main_variants(a.methods, a.variants))}
        b_order = {b: i for i, b in enumerate(dict.fromkeys(r["batch"] for r in self.rows))}
        shown = sorted((r for r in self.rows if r["_v"] in main),  # grouped by dtype, B, mode
                       key=lambda r: (a.dtypes.index(r["dtype"]), b_order[r["batch"]], r["mode"] == "graph",
                                      main[r["_v"]]))
        for r in shown:
            bound = (f"{r['_bound_speedup']:.2f}x ({float(r['bound_ms']):.3f} ms)" if r["_bound_speedup"] else "-")
            print(f"| {r['variant']} | {r['method']} | {r['r']} | {r['dtype']} | {r['batch']} | {r['mode']} | "
                  f"{fmt(r['_ms'], '.3f')} | {r['images_per_s'] or '-'} | "
                  f"{fmt(r['_speedup'], '.2f')}{'x' if r['_speedup'] else ''} | {bound} | {r['target'] or '-'} | "
                  f"{r['target_met'] or '-'} | {r['note'].replace('|', '/')} |")
        self.print_sweep()
        judged = [r for r in self.rows if r["target_met"]]
        if judged:
            met = sum(r["target_met"] == "met" for r in judged)
            print(f"\ntargets (float16, the issue's H100 figures): {met}/{len(judged)} met")

    def sweep_series(self) -> dict:
        a = self.args
        series = OrderedDict()
        for r in self.rows:
            v = r["_v"]
            if r["batch"] not in a.sweep_batches or r["_ms"] is None or not a.sweep_r:
                continue
            key = (r["dtype"], r["batch"], r["mode"])
            s = series.setdefault(key, {"fused": {}, "zero-cost bound": {}, "reference patch": {}, "as shipped": None})
            ips = r["batch"] * 1e3 / r["_ms"]
            if v.variant == "as shipped":
                s["as shipped"] = ips
            elif v.method == "tome" and (v.r in a.sweep_r or v.variant == "reference patch"):
                s[v.variant][v.r] = ips
        return OrderedDict((k, s) for k, s in series.items() if s["fused"] or s["zero-cost bound"])

    def print_sweep(self) -> None:
        a = self.args
        if not a.sweep_r:
            return
        by = {(r["variant"], r["_v"].r, r["dtype"], r["batch"], r["mode"]): r for r in self.rows
              if r["method"] in ("tome", "-")}
        print("\n#### ToMe r sweep (proportional attention): images/s (speed-up vs as shipped)\n")
        print("| dtype | B | mode | r | as shipped | zero-cost bound | fused | fused / bound |")
        print("|---|---|---|---|---|---|---|---|")

        def cell(r):
            if r is None:
                return "-"
            if r["_ms"] is None:
                return "unavailable" if r["note"].startswith("unavailable") else (r["note"][:40] or "-")
            return f"{r['images_per_s']} ({r['_speedup']:.2f}x)" if r["_speedup"] else r["images_per_s"]

        for dt in a.dtypes:
            for b in a.sweep_batches:
                for mode in modes_of(b, a):
                    base = by.get(("as shipped", None, dt, b, mode))
                    for rr in a.sweep_r:
                        z, f = by.get(("zero-cost bound", rr, dt, b, mode)), by.get(("fused", rr, dt, b, mode))
                        ratio = f"{z['_ms'] / f['_ms']:.2f}" if z and f and z["_ms"] and f["_ms"] else "-"
                        print(f"| {dt} | {b} | {mode} | {rr} | {cell(base)} | {cell(z)} | {cell(f)} | {ratio} |")

    def print_launches(self, res: dict) -> None:
        print(f"\n#### Kernel launches per forward: ToMe r={res['r']}, B=1 eager, {res['dtype']} "
              f"(target: fused <= as shipped + 1 per merging block = + {res['merging_blocks']})\n")
        print("| variant | kernels | memcpy | memset | extra launches vs as shipped | target | met |")
        print("|---|---|---|---|---|---|---|")
        base = res["variants"].get("as shipped", {})
        total = (lambda d: d["kernels"] + d["memcpy"] + d["memset"]) if "kernels" in base else None
        for name, d in res["variants"].items():
            if "kernels" not in d:
                print(f"| {name} | - | - | - | - | - | {d.get('error', '-')} |")
                continue
            extra = total(d) - total(base) if total else None
            target = met = "-"
            if name == "fused" and extra is not None:
                target = f"<= +{res['merging_blocks']}"
                met = "met" if extra <= res["merging_blocks"] else "NOT met"
                res["target_met"] = met
            print(f"| {name} | {d['kernels']} | {d['memcpy']} | {d['memset']} | "
                  f"{'-' if extra is None else f'{extra:+d}'} | {target} | {met} |")
        print("\n(launches = kernels + memcpy + memset; kernel names per variant in the JSON file)")


def main(argv=None) -> int:
    args = parse_args(argv)
    patch_mod, patch_why = load_patch()
    runner = Runner(args, patch_mod, patch_why)
    plan = plan_of(args)
    c = runner.common
    auto = runner.fused_backend
    print(f"# {c['device']}, torch {c['torch']}, timm {c['timm']}, triton {c['triton'] or '-'}, "
          f"fpet_kernels {c['version']} ({c['commit']}), {args.model}; fused = backend=None -> {auto!r}"
          f"{' (FPET_BACKEND=' + fk.backends()['env'] + ')' if fk.backends()['env'] else ''}; "
          f"patch: {'fpet_kernels.patch' if patch_mod else patch_why}", file=sys.stderr)
    if auto == "reference":
        print("warning: no fused kernel is live here: the 'fused' rows run the reference ops", file=sys.stderr)

    gpu = args.device == "cuda"
    do_launches = gpu and not args.no_launches
    total = runner.total_steps(plan) + do_launches
    bar = runner.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, unit="meas")
    try:
        for dt in args.dtypes:
            runner.run_dtype(dt, plan, bar)
        launches = runner.launches(bar) if do_launches else None
    finally:
        bar.close()

    runner.derive()
    runner.print_table()
    os.makedirs(args.out, exist_ok=True)
    if launches is not None:
        runner.print_launches(launches)
        launches.update({k: c[k] for k in ("date", "device", "torch", "timm", "triton", "version", "commit")})
        path = os.path.join(args.out, f"model_launches_{args.device}.json")
        with open(path, "w") as f:
            json.dump(launches, f, indent=1)
        print(f"launch counts in {path}", file=sys.stderr)
    if not args.no_csv and runner.rows:
        path = os.path.join(args.out, f"model_{args.device}.csv")
        append_csv(path, runner.rows, CSV_FIELDS)
        print(f"appended {len(runner.rows)} rows to {path}", file=sys.stderr)
    series = runner.sweep_series()
    if not args.no_plot and series:
        path = os.path.join(args.out, f"model_throughput_{args.device}.png")
        plot_sweep(series, path, f"{args.model}, {c['device']}\ntorch {c['torch']}, fused = {auto}, "
                                 f"{c['commit']}, {c['date']}")
        print(f"plot in {path}", file=sys.stderr)
    print(f"{len(runner.rows)} rows in {time.perf_counter() - runner.t0:.0f} s", file=sys.stderr)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
