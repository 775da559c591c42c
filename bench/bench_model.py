"""The main job: timm ViT-B/16 as shipped vs patched with ToMe, FPET and PYRA, inference and training.

    python bench/bench_model.py              # CPU: float32, B in {1, 8} (a few minutes); GPU: float16 +
                                             #   bfloat16, B 1/64/256
    python bench/bench_model.py --train      # LoRA fine-tuning steps: plain PET vs + ToMe / FPET / PYRA
    python bench/bench_model.py --quick      # B=1, ToMe r in {0, 16}, one round (tests)
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

Timing, in interleaved rounds: each round measures every variant once in turn (CPU: one forward,
wall clock, after a warm-up forward per batch; GPU: a ``triton.testing.do_bench`` median, and at
B=1 also the forward replayed from a CUDA graph). A figure is the median over the rounds, printed
with its spread (half the range of the per-round values, the highest and lowest dropped from 5
rounds on); a speed-up is the median of the per-round ratios (both forwards timed in the same
round, so slow phases of the machine cancel). After ``--min-rounds`` a batch gets more rounds until
every speed-up at it has a spread within ``--target-spread`` (2%), up to ``--max-rounds``; rows
still above it are flagged. GPU only: kernel launches per forward (torch.profiler) of ToMe r=16 at
B=1 eager, as shipped vs the patches.

Correctness: the fused rows' logits are compared with the reference patch's (same weights, same
initial merge modules); beyond ``model_common.LOGIT_TOLERANCE`` x the logits' standard deviation the
job prints the difference and exits with status 3.

``--train``: LoRA (rank 8 on q and v, AdamW, backbone frozen) fine-tuning steps of the plain PET
model against the same PET model with ToMe / FPET / PYRA (reference patch and fused): step time with
its spread, the activation memory autograd saves for the backward, and on GPU the peak memory.

Output: markdown tables on stdout (progress on stderr); rows appended to ``<out>/model_<device>.csv``
(``model_train_<device>.csv`` for --train; timestamp, commit, device, torch/timm/triton versions);
images/s against r in ``<out>/model_throughput_<device>.png`` (error bars from the spreads, r ticks
at the measured r); GPU launch counts in ``<out>/model_launches_<device>.json``. ``<out>`` is ``--out``, else ``$OUT``, else
``bench/results/local`` (untracked); ``--record`` writes into the tracked ``bench/results``.

Exit status: 0; 3 when a fused path's logits differ from the reference patch's; 1 when a variant
failed under ``--keep-going`` (without it, errors propagate).
"""
from __future__ import annotations

import argparse
import copy
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
from model_common import (MODEL, METHODS, PATCHED, PYRA_R, QUICK_SWEEP_R, SWEEP_R, TARGETS, TOME_R,  # noqa: E402
                          CSV_FIELDS, LOGIT_TOLERANCE, paired_ratios, ratio_stats, spread, VARIANTS, GraphForward, Variant, append_csv, apply_variant, count_launches, fk,
                          input_size, ips_text, load_patch, main_variants, make_input, make_model, plot_sweep,
                          signature, signature_diff, sweep_variants, throughput_point, time_gpu, tokens_per_block,
                          warm_profiler)
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
    ap.add_argument("--min-rounds", type=int,
                    help="interleaved rounds always run (default: CPU 3, GPU 2; quick 1)")
    ap.add_argument("--max-rounds", type=int,
                    help="rounds at most: after --min-rounds, a batch gets more rounds until every speed-up "
                         "of its rows has a spread <= --target-spread (default: CPU 9, GPU 4; quick 1)")
    ap.add_argument("--target-spread", type=float, default=0.02,
                    help="the spread (relative, see docs/benchmarks.md) at which a batch stops (default 0.02)")
    ap.add_argument("--reps", type=int, help="exactly this many rounds (sets --min-rounds and --max-rounds)")
    ap.add_argument("--train", action="store_true",
                    help="training mode: step time and activation/peak memory of LoRA fine-tuning, plain PET "
                         "model vs + ToMe / FPET / PYRA (reference patch and fused)")
    ap.add_argument("--warmup-ms", type=float, help="GPU do_bench warm-up (default 100, quick 25)")
    ap.add_argument("--rep-ms", type=float, help="GPU do_bench repetition time (default 500, quick 100)")
    ap.add_argument("--no-launches", action="store_true", help="GPU: skip the kernel-launch count")
    ap.add_argument("--model", default=MODEL, help=f"timm model name (default {MODEL})")
    ap.add_argument("--quick", action="store_true", help="B=1, r in {0, 16}, one repetition (tests, CI)")
    ap.add_argument("--max-seconds", type=float,
                    help="start no new measurement after this many seconds (the rest get a 'skipped' row)")
    ap.add_argument("--keep-going", action="store_true",
                    help="record an error of a variant in its rows and go on (exit status 1) instead of raising")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="folder of the CSV, plot and launch counts (default $OUT, else bench/results/local: "
                         "untracked)")
    ap.add_argument("--record", action="store_true",
                    help="write into bench/results (the tracked results) instead of bench/results/local")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.train:  # one dtype (GPU: bfloat16 autocast over float32 weights), one batch
        args.dtypes = args.dtypes or (["bfloat16"] if gpu else ["float32"])
        args.batches = args.batches or ([2] if args.quick else [64] if gpu else [4])
        args.sweep_r = []
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
    if args.reps is not None:
        args.min_rounds = args.max_rounds = args.reps
    if args.quick:
        args.min_rounds = args.min_rounds or 1
        args.max_rounds = args.max_rounds or args.min_rounds
    args.min_rounds = args.min_rounds or (2 if gpu else 3)
    args.max_rounds = max(args.max_rounds or (4 if gpu else 9), args.min_rounds)
    if args.out is None:
        args.out = os.path.join(HERE, "results") if args.record else os.path.join(HERE, "results", "local")
    if args.warmup_ms is None:
        args.warmup_ms = 25.0 if args.quick else 100.0
    if args.rep_ms is None:
        args.rep_ms = 100.0 if args.quick else 500.0
    if min(args.batches + args.sweep_batches) < 1 or args.min_rounds < 1:
        ap.error("batches, --reps and --min-rounds must be positive")
    if not args.target_spread > 0:
        ap.error("--target-spread must be positive")
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
        self.mismatches = []  # fused logits beyond LOGIT_TOLERANCE of the reference patch's (derive)

    def row(self, v: Variant, dtype: str, batch: int, mode: str, **kw) -> dict:
        r = dict(self.common, variant=v.variant, method=v.method, r=v.r_text, dtype=dtype, batch=batch, mode=mode,
                 median_ms="", reps="", note="", _spread_ms=None, fused_backend=self.fused_backend if v.variant == "fused" else "",
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

    def steps(self, batches) -> int:
        """Measurements of one variant in one round at ``batches``."""
        return sum(len(modes_of(b, self.args)) for b in batches)

    def total_steps(self, plan) -> int:
        """Measurements of the whole run if every batch needs --max-rounds (the bar skips what is not)."""
        return len(self.args.dtypes) * self.args.max_rounds * sum(self.steps(bs) for bs in plan.values())

    def converged(self, rows, batch: int) -> bool:
        """Whether every measured row at ``batch`` has a speed-up (paired per round against as shipped;
        as shipped itself: its time) whose relative spread is at most --target-spread."""
        base = {mode: r for (v, b, mode), r in rows.items() if b == batch and v.variant == "as shipped"}
        for (v, b, mode), r in rows.items():
            if b != batch or not r["_by_round"] or r["note"].startswith(("FAILED", "graph capture")):
                continue
            if v.variant == "as shipped" or mode not in base:
                vals = list(r["_by_round"].values())
            else:
                vals = paired_ratios(base[mode]["_by_round"], r["_by_round"])
            if len(vals) < 2 or spread(vals) > self.args.target_spread * statistics.median(vals):
                return False
        return True

    def run_dtype(self, dtype_name: str, plan, bar) -> None:
        """Every variant of ``plan`` at its batches and modes, in interleaved rounds: each round times
        one forward (CPU) or one do_bench median (GPU) of every variant in turn, so that load from
        other processes falls on all variants alike and every speed-up can be taken per round (paired).
        Rounds go on for a batch until --min-rounds are done and every speed-up at that batch has a
        spread within --target-spread, or --max-rounds are reached."""
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
                    rows[(v, b, mode)] = self.row(v, dtype_name, b, mode, note=note, _by_round={})
        if dev == "cpu":  # one warm-up forward per batch (lazy init of the CPU kernels, first-touch memory)
            bar.set_description_str(f"{dtype_name} warm-up")
            with torch.inference_mode():
                for x in inputs.values():
                    model(x)
        open_batches = list(dict.fromkeys(b for bs in plan.values() for b in bs))
        for rnd in range(a.max_rounds):
            if not open_batches:
                break
            for v, batches_all in plan.items():
                batches = [b for b in batches_all if b in open_batches]
                steps = self.steps(batches)
                if not steps:
                    continue
                if v.patched and self.patch_mod is None:
                    bar.update(steps)
                    continue
                if self.out_of_time():
                    for b in batches:
                        for mode in modes_of(b, a):
                            r = rows[(v, b, mode)]
                            if not r["_by_round"] and not r["note"]:
                                r["note"] = "skipped: --max-seconds reached"
                    bar.update(steps)
                    continue
                bar.set_description_str(f"{dtype_name} {v.label} (round {rnd + 1})")
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
            if rnd + 1 >= a.min_rounds:
                done = [b for b in open_batches if self.converged(rows, b)]
                skipped = sum(self.steps([b for b in bs if b in done]) for bs in plan.values())
                bar.update(skipped * (a.max_rounds - rnd - 1))
                open_batches = [b for b in open_batches if b not in done]
            if self.out_of_time():
                break
        for r in rows.values():
            if r["_by_round"]:
                vals = list(r["_by_round"].values())
                ms = statistics.median(vals)
                r.update(median_ms=f"{ms:.4f}", _ms=ms, min_ms=f"{min(vals):.4f}", reps=len(vals),
                         spread_ms=f"{spread(vals):.4f}" if len(vals) >= 2 else "", _spread_ms=spread(vals))
            if not r["note"] and r["_by_round"] and r["reps"] < 2:
                r["note"] = "one round: no spread"
        del model, inputs
        if dev == "cuda":
            torch.cuda.empty_cache()

    def measure_one(self, row, model, x, rnd: int) -> None:
        """One sample of ``row`` in round ``rnd`` (its note says why not, for failures that do not propagate)."""
        a, v, b, mode = self.args, row["_v"], row["batch"], row["mode"]
        if row["note"].startswith(("FAILED", "graph capture")):
            return  # failed in an earlier round
        if self.out_of_time():
            if not row["_by_round"]:
                row["note"] = "skipped: --max-seconds reached"
            return
        try:
            with torch.inference_mode():
                ms, out = self.measure(lambda: model(x), mode)
            row["_by_round"][rnd] = ms
            if out is not None and rnd == 0:
                self.check_output(row, out)
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
        """Speed-ups as medians of the per-round ratios (paired: both forwards timed in the same round)
        with their spread; the fused rows' logits against the reference patch's (``self.mismatches``)."""
        by = {(r["variant"], r["method"], r["_v"].r, r["dtype"], r["batch"], r["mode"]): r for r in self.rows}
        self.mismatches = []
        for r in self.rows:
            v, ms = r["_v"], r["_ms"]
            base = by.get(("as shipped", "-", None, r["dtype"], r["batch"], r["mode"]))
            bound = by.get(("zero-cost bound", v.method, v.r, r["dtype"], r["batch"], r["mode"]))
            refp = by.get(("reference patch", v.method, v.r, r["dtype"], r["batch"], r["mode"]))
            bound_ms = bound["_ms"] if bound and v.patched else None
            r["images_per_s"] = ips_text(r["batch"], ms) if ms else ""
            r["_speedup"] = r["_speedup_spread"] = None
            if ms and base and base["_ms"]:
                r["_speedup"], r["_speedup_spread"] = ratio_stats(base["_by_round"], r["_by_round"])
            r["speedup"] = f"{r['_speedup']:.3f}" if r["_speedup"] else ""
            r["speedup_spread"] = f"{r['_speedup_spread']:.3f}" if r["_speedup_spread"] is not None else ""
            r["_bound_speedup"] = r["_bound_spread"] = None
            if bound_ms and base and base["_ms"]:
                r["_bound_speedup"], r["_bound_spread"] = ratio_stats(base["_by_round"], bound["_by_round"])
            r["bound_ms"] = f"{bound_ms:.4f}" if bound_ms else ""
            r["bound_speedup"] = f"{r['_bound_speedup']:.3f}" if r["_bound_speedup"] else ""
            r["_vs_ref"] = r["_vs_ref_spread"] = None
            if v.variant == "fused" and ms and refp and refp["_ms"]:
                r["_vs_ref"], r["_vs_ref_spread"] = ratio_stats(refp["_by_round"], r["_by_round"])
            r["vs_reference_patch"] = f"{r['_vs_ref']:.3f}" if r["_vs_ref"] else ""
            r["vs_reference_patch_spread"] = f"{r['_vs_ref_spread']:.3f}" if r["_vs_ref_spread"] is not None else ""
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
                    std = ref.std().item() if ref.numel() > 1 else 1.0
                    tol = LOGIT_TOLERANCE.get(r["dtype"], 1e-3) * max(std, 1e-6)
                    r["max_dlogit"], r["logit_tolerance"] = f"{d:.3g}", f"{tol:.3g}"
                    ok = d <= tol  # NaN fails too
                    r["note"] = (f"max abs dlogit vs reference patch {d:.2g} (tolerance {tol:.2g})"
                                 + ("" if ok else " LOGITS DIFFER") + (" " + r["note"] if r["note"] else ""))
                    if not ok:
                        self.mismatches.append(f"{v.label} {r['dtype']} B={r['batch']}: max abs logit difference "
                                               f"{d:.3g} > tolerance {tol:.3g} "
                                               f"({LOGIT_TOLERANCE.get(r['dtype'], 1e-3):g} x logit std {std:.3g})")
            if r["_speedup_spread"] is not None and r["_speedup_spread"] > self.args.target_spread * r["_speedup"]:
                r["note"] = (r["note"] + f" [spread above {self.args.target_spread:.0%} after {r['reps']} rounds]"
                             ).strip()

    # ------------------------------------------------------------------ output
    @staticmethod
    def _pm(value, sp, suffix="x", digits=2) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}{suffix} ±{sp:.{digits}f}" if sp is not None else f"{value:.{digits}f}{suffix}"

    def print_table(self) -> None:
        a = self.args
        print(f"\n### {a.model}, {self.common['device']}: images/s and latency\n")
        print(f"Each figure is the median over interleaved rounds; ± is its spread (half the range of the per-round "
              f"values, the extreme two dropped from 5 rounds on). Speed-ups are medians of per-round ratios "
              f"(as shipped ms / ms, both timed in the same round). 'vs reference patch' = reference patch ms / "
              f"fused ms; '≈' marks a difference within its spread. Zero-cost bound = the same model dropping the "
              f"merged tokens after attention at no cost.\n")
        print("| variant | method | r | dtype | B | mode | rounds | median ms | images/s | vs as shipped | "
              "zero-cost bound | vs reference patch | target | met | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        main = {v: i for i, v in enumerate(main_variants(a.methods, a.variants))}
        b_order = {b: i for i, b in enumerate(dict.fromkeys(r["batch"] for r in self.rows))}
        shown = sorted((r for r in self.rows if r["_v"] in main),  # grouped by dtype, B, mode
                       key=lambda r: (a.dtypes.index(r["dtype"]), b_order[r["batch"]], r["mode"] == "graph",
                                      main[r["_v"]]))
        for r in shown:
            digits = 1 if r["_ms"] and r["_ms"] >= 10 else 3
            ms = self._pm(r["_ms"], r["_spread_ms"] if r["reps"] and r["reps"] >= 2 else None, "", digits)
            vs = self._pm(r["_vs_ref"], r["_vs_ref_spread"])
            if r["_vs_ref_spread"] is not None and abs(r["_vs_ref"] - 1) <= r["_vs_ref_spread"]:
                vs = "≈ " + vs
            print(f"| {r['variant']} | {r['method']} | {r['r']} | {r['dtype']} | {r['batch']} | {r['mode']} | "
                  f"{r['reps'] or '-'} | {ms} | {r['images_per_s'] or '-'} | "
                  f"{'1.00x' if r['variant'] == 'as shipped' and r['_ms'] else self._pm(r['_speedup'], r['_speedup_spread'])} | "
                  f"{self._pm(r['_bound_speedup'], r['_bound_spread'])} | {vs} | {r['target'] or '-'} | "
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
            ips = throughput_point(r["batch"], r["_ms"], r["_spread_ms"] if r["reps"] and r["reps"] >= 2 else None)
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
            if r["variant"] == "as shipped" or not r["_speedup"]:
                return r["images_per_s"]
            return f"{r['images_per_s']} ({Runner._pm(r['_speedup'], r['_speedup_spread'])})"

        for dt in a.dtypes:
            for b in a.sweep_batches:
                for mode in modes_of(b, a):
                    base = by.get(("as shipped", None, dt, b, mode))
                    for rr in a.sweep_r:
                        z, f = by.get(("zero-cost bound", rr, dt, b, mode)), by.get(("fused", rr, dt, b, mode))
                        med, sp = ratio_stats(z["_by_round"], f["_by_round"]) if z and f else (None, None)
                        ratio = Runner._pm(med, sp, "") if med else "-"
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


# ---------------------------------------------------------------------------------------------- training
TRAIN_PET = dict(method="lora", rank=8)  # pet.apply(model, "lora", rank=8): LoRA on q and v
TRAIN_CSV_FIELDS = ["date", "device", "device_type", "torch", "timm", "triton", "version", "commit", "model",
                    "variant", "method", "r", "dtype", "batch", "pet", "median_ms", "spread_ms", "speedup",
                    "speedup_spread", "saved_mib", "peak_mib", "reps", "max_dlogit", "logit_tolerance", "note"]


class SavedBytes:
    """Bytes of the tensors autograd saves for the backward during a forward (each storage once,
    parameters excluded): the activation memory a training step holds at its peak, on any device."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}

    def pack(self, t):
        if t.layout == torch.strided:
            st = t.untyped_storage()
            if st.data_ptr() not in self.params:
                self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2 ** 20


class TrainRunner:
    """``--train``: LoRA fine-tuning steps (forward, cross-entropy, backward, AdamW) of the plain PET
    model against the same PET model patched with ToMe / FPET / PYRA (reference patch and fused),
    in interleaved rounds as the inference table. Every variant is its own model sharing the frozen
    backbone weights; the trainable ones (LoRA, the merge modules, the head) are its own."""

    def __init__(self, args, patch_mod, common):
        self.args, self.patch_mod, self.common = args, patch_mod, common
        self.dev = args.device
        self.rows, self.mismatches = [], []

    def variants(self):
        out = [Variant("as shipped")]
        for m in self.args.methods:
            r = {"tome": TOME_R, "fpet": None, "pyra": PYRA_R}[m]
            out += [Variant(v, m, r) for v in PATCHED if v in self.args.variants]
        return out

    def build(self, base, v: Variant):
        from fpet_kernels import pet

        model = copy.deepcopy(base, {id(p): p for p in base.parameters()})  # frozen weights shared
        if v.patched:
            apply_variant(model, v, self.patch_mod)  # seeds its new modules identically in both patches
        torch.manual_seed(2)
        pet.apply(model, TRAIN_PET["method"], rank=TRAIN_PET["rank"])
        pet.mark_trainable(model)
        shared = {id(p) for p in base.parameters()}
        for mod in model.modules():  # what trains (the head) must not be shared between the variants
            for name, p in list(mod._parameters.items()):
                if p is not None and p.requires_grad and id(p) in shared:
                    mod._parameters[name] = torch.nn.Parameter(p.detach().clone())
        model.to(self.dev).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, opt

    def step(self, model, opt, x, y, dtype):
        """(ms, logits, saved MiB, peak MiB or None) of one training step."""
        gpu = self.dev == "cuda"
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.autocast(self.dev, dtype=dtype, enabled=dtype != torch.float32), SavedBytes(model) as saved:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20 if gpu else None
        return ms, logits.detach().float().cpu(), saved.mib, peak

    def run(self, bar) -> None:
        a = self.args
        variants = self.variants()
        for dtype_name in a.dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            import timm

            base = timm.create_model(a.model, pretrained=False, num_classes=10).requires_grad_(False)
            size = input_size(base)
            for b in a.batches:
                g = torch.Generator().manual_seed(b)
                x = torch.randn(b, 3, size, size, generator=g).to(self.dev)
                y = torch.randint(0, 10, (b,), generator=g).to(self.dev)
                models, rows, logits = {}, {}, {}
                for v in variants:
                    bar.set_description_str(f"train {dtype_name} B={b} {v.label}: build + first step")
                    models[v] = self.build(base, v)
                    torch.manual_seed(3)  # the same dropout masks in both patches' first step
                    _, logits[v], saved, peak = self.step(*models[v], x, y, dtype)
                    rows[v] = dict(self.common, variant="plain PET" if v.variant == "as shipped" else v.variant,
                                   method=v.method, r=v.r_text, dtype=dtype_name, batch=b,
                                   pet=f"{TRAIN_PET['method']} rank {TRAIN_PET['rank']}", saved_mib=f"{saved:.1f}",
                                   peak_mib=f"{peak:.1f}" if peak is not None else "", note="", _v=v, _by_round={})
                    self.rows.append(rows[v])
                    bar.update()
                for rnd in range(a.max_rounds):
                    for v in variants:
                        bar.set_description_str(f"train {dtype_name} B={b} {v.label} (round {rnd + 1})")
                        rows[v]["_by_round"][rnd] = self.step(*models[v], x, y, dtype)[0]
                        bar.update()
                    base_r = rows[variants[0]]["_by_round"]
                    if rnd + 1 >= a.min_rounds and all(
                            spread(vals) <= a.target_spread * statistics.median(vals)
                            for vals in [list(base_r.values())] + [paired_ratios(base_r, rows[v]["_by_round"])
                                                                   for v in variants[1:]]):
                        bar.update(len(variants) * (a.max_rounds - rnd - 1))
                        break
                for v in variants:
                    r = rows[v]
                    vals = list(r["_by_round"].values())
                    r["_ms"], r["_spread_ms"] = statistics.median(vals), spread(vals)
                    r.update(median_ms=f"{r['_ms']:.3f}", spread_ms=f"{r['_spread_ms']:.3f}", reps=len(vals))
                    r["_speedup"], r["_speedup_spread"] = ratio_stats(rows[variants[0]]["_by_round"], r["_by_round"])
                    r.update(speedup=f"{r['_speedup']:.3f}", speedup_spread="" if r["_speedup_spread"] is None
                             else f"{r['_speedup_spread']:.3f}")
                    if v.variant == "fused" and Variant("reference patch", v.method, v.r) in logits:
                        ref, out = logits[Variant("reference patch", v.method, v.r)], logits[v]
                        d = (out - ref).abs().max().item()
                        tol = LOGIT_TOLERANCE.get(dtype_name, 1e-3) * max(ref.std().item(), 1e-6)
                        r.update(max_dlogit=f"{d:.3g}", logit_tolerance=f"{tol:.3g}")
                        r["note"] = f"first-step max abs dlogit vs reference patch {d:.2g} (tolerance {tol:.2g})"
                        if not d <= tol:
                            r["note"] += " LOGITS DIFFER"
                            self.mismatches.append(f"train {v.label} {dtype_name} B={b}: max abs logit difference "
                                                   f"{d:.3g} > tolerance {tol:.3g}")
                    if r["_speedup_spread"] is not None and r["_speedup_spread"] > a.target_spread * r["_speedup"]:
                        r["note"] = (r["note"] + f" [spread above {a.target_spread:.0%} after {len(vals)} rounds]"
                                     ).strip()
                del models

    def print_table(self) -> None:
        a = self.args
        print(f"\n### {a.model}, {self.common['device']}: PET fine-tuning step "
              f"({TRAIN_PET['method']} rank {TRAIN_PET['rank']}, AdamW, backbone frozen)\n")
        print("Step = forward + cross-entropy + backward + optimizer step. Median over interleaved rounds ± spread "
              "(half the range of the per-round values, the extreme two dropped from 5 rounds on); speed-up = "
              "median of the per-round ratios plain PET ms / ms. Saved MiB = tensors autograd keeps for the "
              "backward (parameters excluded): the activation memory of a step" +
              ("; peak MiB = CUDA peak allocated during the step above what was allocated before." if
               self.dev == "cuda" else ".") + "\n")
        print("| variant | method | r | dtype | B | rounds | step ms | vs plain PET | saved MiB | peak MiB | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            print(f"| {r['variant']} | {r['method']} | {r['r']} | {r['dtype']} | {r['batch']} | {r['reps']} | "
                  f"{Runner._pm(r['_ms'], r['_spread_ms'] if r['reps'] >= 2 else None, '', 1)} | "
                  f"{'1.00x' if r['variant'] == 'plain PET' else Runner._pm(r['_speedup'], r['_speedup_spread'])} | "
                  f"{r['saved_mib']} | {r['peak_mib'] or '-'} | {r['note']} |")


QUICK_NOTE = ("SMOKE RUN (--quick): one round at the smallest batch (ToMe r in {0, 16}): a check that the job runs "
              "and that the fused logits match the reference patch; its timings have no spread and mean nothing. "
              "Drop --quick for the measured tables.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        print(QUICK_NOTE, file=sys.stderr)
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

    if args.train:
        return main_train(args, patch_mod, runner)
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
    if args.quick:
        print(f"\n{QUICK_NOTE}")
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
    return exit_status(runner.mismatches, runner.failed)


def exit_status(mismatches, failed: bool) -> int:
    """3 when a fused path's logits differ from the reference patch's beyond the tolerance (the
    speed-ups of a wrong path mean nothing), 1 when a variant failed under --keep-going, else 0."""
    if mismatches:
        print("\nERROR: the fused path disagrees with the reference patch:\n  " + "\n  ".join(mismatches),
              file=sys.stderr)
        return 3
    return 1 if failed else 0


def main_train(args, patch_mod, runner) -> int:
    if patch_mod is None:
        print(f"error: --train needs fpet_kernels.patch ({runner.patch_why})", file=sys.stderr)
        return 1
    train = TrainRunner(args, patch_mod, runner.common)
    total = len(args.dtypes) * len(args.batches) * len(train.variants()) * (args.max_rounds + 1)
    bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, unit="step")
    try:
        train.run(bar)
    finally:
        bar.close()
    if args.quick:
        print(f"\n{QUICK_NOTE}")
    train.print_table()
    if not args.no_csv and train.rows:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"model_train_{args.device}.csv")
        append_csv(path, train.rows, TRAIN_CSV_FIELDS)
        print(f"appended {len(train.rows)} rows to {path}", file=sys.stderr)
    print(f"{len(train.rows)} rows in {time.perf_counter() - runner.t0:.0f} s", file=sys.stderr)
    return exit_status(train.mismatches, False)


if __name__ == "__main__":
    sys.exit(main())
