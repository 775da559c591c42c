"""Whole-model GPU table for bench/gpu_check.sh: timm ViT-B/16 as shipped vs fk.patch.timm (ToMe r=16,
FPET, PYRA) per GPU backend, at B=256 eager and at B=1 under CUDA-graph replay.

    python bench/bench_model_gpu.py                       # GPU: float16, B=256 eager + B=1 graph replay
    python bench/bench_model_gpu.py --csv "$OUT/model.csv" --max-seconds 120
    python bench/bench_model_gpu.py --device cpu --tiny   # the same code path on CPU (a tiny ViT, host
                                                          # timer, no graphs): CI and the dry run

Model: ``timm.create_model("vit_base_patch16_224", pretrained=False)`` (random init; ``--tiny``: a
3-block ViT on 32x32 images), eval mode, ``torch.inference_mode()``, model and input in the dtype.
Rows, per (B, mode): "as shipped" (timm unchanged), then per method and per backend
(``--backends``, default the live GPU backends: "triton", "cuda"; add "reference" for the
pure-PyTorch ops) the model patched in place by ``fk.patch.timm(model, method, ..., backend=...)``
and unpatched afterwards (``fk.patch.remove``): ToMe r=16 (proportional attention), FPET (one merge
after block 6, 197 -> 99 tokens), PYRA (r = [16]*11 + [10]).

Modes: "eager" (B in ``--eager-batches``, default 256): ``triton.testing.do_bench`` median (CUDA
events, L2 flushed). "graph" (B in ``--graph-batches``, default 1): the forward captured once in a
``torch.cuda.CUDAGraph`` with a static input (warm-up on a side stream first) and replayed; median of
CUDA-event times of single replays. A variant whose capture or replay fails gets a row saying why
(exit status 1). On CPU (``--device cpu``) both modes are a host-timer median of ``--reps`` forwards
and "graph" rows are skipped.

Imports only torch, timm and fpet_kernels (triton lazily for do_bench). Output: a markdown table on
stdout (progress on stderr), rows appended to ``--csv`` when given.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's fpet_kernels (built in place) before any installed one
import fpet_kernels as fk  # noqa: E402
from model_common import GraphForward  # noqa: E402  (bench/ is the script's folder)

MODEL = "vit_base_patch16_224"
METHODS = ("tome", "fpet", "pyra")
TOME_R = 16
FPET_MERGE_LAYER = 6
PYRA_R = [16] * 11 + [10]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CSV_FIELDS = ["date", "device", "torch", "triton", "timm", "commit", "model", "dtype", "batch", "mode", "variant",
              "method", "backend", "median_ms", "images_per_s", "speedup", "tokens_out", "note"]


def patch_kwargs(method: str, depth: int) -> dict:
    if method == "tome":
        return dict(r=TOME_R, prop_attn=True)
    if method == "fpet":
        return dict(merge_layer=min(FPET_MERGE_LAYER, depth - 1), prop_attn=True)
    if method == "pyra":
        r = PYRA_R if depth == len(PYRA_R) else [2] * depth
        return dict(r=list(r))
    raise ValueError(f"unknown method {method!r}")


def make_model(name: str, tiny: bool, device: str, dtype: torch.dtype):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if tiny:
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
        size = 32
    else:
        model = timm.create_model(name, pretrained=False)
        size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), size


def make_input(batch: int, size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + batch)
    return torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- timers
def time_eager(fn, device: str, warmup_ms: float, rep_ms: float, reps: int) -> float:
    """Median ms of ``fn()``: do_bench on CUDA (events, L2 flushed), host timer on CPU."""
    if device == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


# ``fn()`` captured into a CUDA graph with static inputs; ``replay()`` reruns the forward in one launch.
CapturedForward = GraphForward


def time_graph(graph: CapturedForward, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of one replay, each between two CUDA events (no L2 flush: a latency figure)."""
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        graph.replay()
    n = max(10, min(2000, int(rep_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


# ----------------------------------------------------------------------------- rows
def versions() -> dict:
    import timm

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    return dict(torch=torch.__version__, triton=tv, timm=timm.__version__, commit=rev)


def short(exc: BaseException, limit: int = 180) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def run_variant(model, x, method, backend, mode, args):
    """(median ms, tokens after the last block or None, note) of one variant; patches and unpatches."""
    if method != "-":
        fk.patch.timm(model, method, backend=backend, **patch_kwargs(method, len(model.blocks)))
    graph = None
    try:
        with torch.inference_mode():
            def fwd():
                return model(x)
            fwd()
            tokens = None
            if method != "-":
                size = fk.patch.merge_state(model, x[:1])["size"]
                tokens = None if size is None else int(size.shape[1])
            if mode == "graph":
                graph = CapturedForward(fwd)
                ms = time_graph(graph, args.warmup_ms, args.rep_ms)
                # the replayed forward computes what the eager one does (same static input)
                torch.testing.assert_close(graph.out.float(), fwd().float(), atol=1e-2, rtol=1e-2,
                                           msg=lambda m: f"graph replay differs from eager: {m}")
            else:
                ms = time_eager(fwd, args.device, args.warmup_ms, args.rep_ms, args.reps)
        return ms, tokens, ""
    finally:
        if graph is not None:
            graph.close()
        if method != "-":
            fk.patch.remove(model)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--model", default=MODEL, help=f"timm model name (default {MODEL})")
    ap.add_argument("--tiny", action="store_true", help="a 3-block ViT on 32x32 images (CPU checks)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--backends", nargs="+", choices=("triton", "cuda", "cpu", "reference", "auto"),
                    help="patch backends (default: the live GPU backends on CUDA, cpu+reference on CPU; "
                         "auto = backend None)")
    ap.add_argument("--eager-batches", nargs="*", type=int, help="default 256 (CPU: 2)")
    ap.add_argument("--graph-batches", nargs="*", type=int, help="default 1 (CPU: none)")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="GPU warm-up per row (ms, default 25)")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="GPU timed time per row (ms, default 200)")
    ap.add_argument("--reps", type=int, default=3, help="CPU: timed forwards per row (default 3)")
    ap.add_argument("--max-seconds", type=float, help="start no new row after this many seconds")
    ap.add_argument("--csv", help="append the rows to this CSV file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    if args.eager_batches is None:
        args.eager_batches = [256] if gpu else [2]
    if args.graph_batches is None:
        args.graph_batches = [1] if gpu else []
    if args.backends is None:
        live = fk.backends()["live"]
        args.backends = [b for b in (("triton", "cuda") if gpu else ("cpu", "reference"))
                         if b == "reference" or live.get(b)]
        if gpu and not args.backends:
            ap.error(f"no GPU backend is live: {fk.backends()}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = versions()
    model, img = make_model(args.model, args.tiny, args.device, dtype)
    name = "tiny ViT (3 blocks, 32x32)" if args.tiny else args.model
    print(f"# {name} on {dev_name}, {args.dtype}, torch {meta['torch']}, triton {meta['triton'] or '-'}, timm "
          f"{meta['timm']}, commit {meta['commit']}; live: {[k for k, v in fk.backends()['live'].items() if v]}",
          file=sys.stderr)
    settings = [(b, "eager") for b in args.eager_batches] + [(b, "graph") for b in args.graph_batches]
    variants = [("-", "-")] + [(m, be) for m in args.methods for be in args.backends]
    rows, failed = [], 0
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    for batch, mode in settings:
        x = make_input(batch, img, args.device, dtype)
        base = None
        for method, backend in variants:
            row = dict(date=stamp, device=dev_name, model=name, dtype=args.dtype, batch=batch, mode=mode,
                       variant="as shipped" if method == "-" else f"{method} ({backend})", method=method,
                       backend=backend, median_ms="", images_per_s="", speedup="", tokens_out="", note="", **meta)
            rows.append(row)
            if mode == "graph" and args.device != "cuda":
                row["note"] = "SKIP: CUDA graphs need --device cuda"
                continue
            if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
                row["note"] = "skipped: --max-seconds reached"
                continue
            t0 = time.perf_counter()
            print(f"B={batch} {mode} {row['variant']} ...", end="", flush=True, file=sys.stderr)
            try:
                ms, tokens, note = run_variant(model, x, method, None if backend == "auto" else backend, mode, args)
            except Exception as exc:  # noqa: BLE001 - one failing variant is a row, not a lost table
                failed += 1
                row["note"] = ("FAILED (graph capture/replay): " if mode == "graph" else "FAILED: ") + short(exc)
                print(f" {row['note']}", file=sys.stderr)
                if args.device == "cuda":
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001 - a sticky CUDA error: the later rows say so
                        pass
                continue
            row.update(median_ms=f"{ms:.4f}", images_per_s=f"{batch * 1e3 / ms:.1f}",
                       tokens_out="" if tokens is None else str(tokens), note=note)
            if method == "-":
                base = ms
            elif base is not None:
                row["speedup"] = f"{base / ms:.2f}"
            print(f" {ms:.4f} ms ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        del x
    print(f"## Whole model: {name}, {args.dtype}, {dev_name} (eager: do_bench median; graph: median of CUDA-graph "
          f"replays; speed-up over as shipped in the same row group)\n")
    print("| B | mode | variant | median ms | images/s | speed-up | tokens out | note |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['variant']} | {r['median_ms'] or '-'} | {r['images_per_s'] or '-'} | "
              f"{r['speedup'] or '-'} | {r['tokens_out'] or '-'} | {r['note']} |")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
    print(f"\n{len(rows)} rows, {failed} failed, {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
