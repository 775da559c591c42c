"""Record the GPU backends' medians per op for the automatic backend choice (fpet_kernels/tuning/).

    python bench/record_dispatch.py                  # on a GPU: writes fpet_kernels/tuning/<gpu>.json
    python bench/record_dispatch.py --out "$OUT"     # elsewhere (bench/gpu_check.sh: into $OUT)
    python bench/record_dispatch.py --quick          # B in {1, 256}, float16 only, shorter timings

Times every live GPU backend ("cuda", "triton") that has kernels for the op on the cases of
``common.DISPATCH_CASES`` (every public op that resolves a backend, forward and, where the op has
one, forward+backward) at ViT-B/16 shapes, with run_table.py's timer (triton.testing.do_bench
median, L2 flushed), and writes the medians with the GPU's name and compute capability, the
torch / triton / CUDA / driver versions, the commit and the date. The file is rewritten after every
cell (atomically), so a run cut short keeps what it measured. ``fpet_kernels.ops._backend`` reads the
file (format in fpet_kernels/tuning/README.md) and, per op, picks the backend with the lowest
geometric mean of the medians over the cells both backends have (an op with one live GPU backend,
such as ``xpeft_adapter`` and ``masked_weight_grad`` without a CUDA C++ kernel, is recorded anyway).
Only measured numbers are written: a failing measurement is listed under "failed", never given a
value. Commit the file to ship it.
"""
import argparse
import datetime
import json
import os
import re
import sys
import time

import torch

from common import DISPATCH_CASES, DTYPES, GPU_BACKENDS, GPU_BATCHES, fk, make_call, versions, versions_line
from run_table import git_rev, median_ms, triton_version

HERE = os.path.dirname(os.path.abspath(__file__))
TUNING_DIR = fk.ops._tuning.TUNING_DIR


def slug(gpu_name: str) -> str:
    """File name of a GPU's results: "NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3.json"."""
    return re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_") + ".json"


def build_record(results: list, failed: list, gpu: str, capability: str, **meta) -> dict:
    """The results document (format fpet_kernels.ops._tuning.RESULTS_FORMAT); ``results`` rows are dicts
    with op, mode, dtype, batch, backend, median_ms. Checked with the package's own validator."""
    doc = {
        "format": fk.ops._tuning.RESULTS_FORMAT,
        "gpu": gpu,
        "capability": capability,
        "torch": meta.pop("torch", torch.__version__),
        "triton": meta.pop("triton", triton_version()),
        "cuda": meta.pop("cuda", torch.version.cuda),
        "fpet_kernels": meta.pop("fpet_kernels", fk.__version__),
        "commit": meta.pop("commit", git_rev()),
        "date": meta.pop("date", datetime.datetime.now().isoformat(timespec="seconds")),
        "shapes": "ViT-B/16: N=197 C=768 D=64 r=16, class token (bench/common.py)",
        "timer": "triton.testing.do_bench median (ms), L2 flushed before each call",
        **meta,
        "results": results,
        "failed": failed,
    }
    fk.ops._tuning.check_results(doc)
    return doc


def write_record(doc: dict, out_dir: str) -> str:
    """Write ``doc`` as ``out_dir/<gpu slug>.json``, atomically (a temporary file renamed over it):
    a run killed while writing leaves the previous complete file, never a truncated one."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, slug(doc["gpu"]))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


class Recorder:
    """The medians of one run, written to the results file after every cell: a run cut short (a
    timeout of bench/gpu_check.sh's record phase, a crash) keeps every median it measured."""

    def __init__(self, out_dir: str, gpu: str, capability: str, **meta):
        meta.setdefault("commit", git_rev())  # once per run, not per write
        meta.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
        self.out_dir, self.gpu, self.capability, self.meta = out_dir, gpu, capability, meta
        self.results, self.failed, self.path = [], [], None

    def add(self, cell: dict, ms: float | None = None, note: str | None = None) -> None:
        """One measured cell (``ms``) or one failed / skipped cell (``note``); rewrites the file once
        anything is measured (a results file without results is not valid)."""
        if ms is not None:
            self.results.append(dict(cell, median_ms=round(ms, 5)))
        else:
            self.failed.append(dict(cell, note=note or "not measured"))
        self.write()

    def write(self) -> str | None:
        if self.results:
            self.path = write_record(build_record(list(self.results), list(self.failed), self.gpu, self.capability,
                                                  **dict(self.meta)), self.out_dir)
        return self.path


def measure_cells(cases, dtypes, batches, live_backends, measure, recorder: Recorder, max_seconds=None,
                  log=print) -> None:
    """Every (op, mode) x dtype x batch x live backend cell through ``measure(op, backend, mode, batch,
    dtype) -> ms``; each result goes to ``recorder`` as it comes. A failing measurement is recorded
    as failed (never as a number); after ``max_seconds`` the remaining cells are recorded as skipped."""
    t0 = time.perf_counter()
    for op, mode in cases:
        backends = live_backends(op)
        if len(backends) < 2:
            log(f"{op}: live GPU backends {backends}: recorded anyway (the choice needs two)")
        for dt in dtypes:
            for b in batches:
                for be in backends:
                    cell = dict(op=op, mode=mode, dtype=dt, batch=b, backend=be)
                    if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                        recorder.add(cell, note="skipped: --max-seconds reached")
                        continue
                    try:
                        ms = measure(op, be, mode, b, dt)
                    except Exception as exc:  # noqa: BLE001 - recorded as failed, never as a number
                        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                        recorder.add(cell, note=msg)
                        log(f"{op} {mode} {dt} B={b} {be}: FAILED {msg}")
                        continue
                    recorder.add(cell, ms=ms)
                    log(f"{op} {mode} {dt} B={b} {be}: {ms:.4f} ms")


def _measure_gpu(warmup: int, rep: int):
    def measure(op, backend, mode, batch, dtype):
        call = None
        try:
            call = make_call(op, backend, mode, batch, "cuda", DTYPES[dtype])
            return median_ms(call, "cuda", 0.0, warmup, rep)
        finally:
            del call
            torch.cuda.synchronize()
    return measure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=TUNING_DIR, help="folder of the results file (default: the package's)")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default float16 bfloat16 float32")
    ap.add_argument("--batches", nargs="+", type=int, help=f"default {' '.join(map(str, GPU_BATCHES))}")
    ap.add_argument("--ops", nargs="+", help="only these ops (default: every op of DISPATCH_CASES)")
    ap.add_argument("--quick", action="store_true", help="B in {1, 256}, float16, shorter timings")
    ap.add_argument("--warmup", type=int, help="do_bench warm-up in ms (default 25, quick 10)")
    ap.add_argument("--rep", type=int, help="do_bench repetition time in ms (default 100, quick 40)")
    ap.add_argument("--max-seconds", type=float, help="start no new measurement after this many seconds")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("record_dispatch.py needs a CUDA device: the results are the GPU backends' timings", file=sys.stderr)
        return 2
    dtypes = args.dtypes or (["float16"] if args.quick else ["float16", "bfloat16", "float32"])
    batches = args.batches or ([1, 256] if args.quick else list(GPU_BATCHES))
    warmup = args.warmup or (10 if args.quick else 25)
    rep = args.rep or (40 if args.quick else 100)
    cases = [c for c in DISPATCH_CASES if not args.ops or c[0] in args.ops]
    gpu = torch.cuda.get_device_name()
    cap = "{}.{}".format(*torch.cuda.get_device_capability())
    info = fk.backends()
    vline = versions_line("cuda")
    print(f"{vline}\n# sm {cap}; live: {[k for k, v in info['live'].items() if v]}; CUDA kernels: "
          f"{info['cuda_kernels']}", file=sys.stderr)

    rec = Recorder(args.out, gpu, cap, driver=versions("cuda")["driver"])
    measure_cells(cases, dtypes, batches, lambda op: [b for b in GPU_BACKENDS if fk.ops._backend.op_live(op, b)],
                  _measure_gpu(warmup, rep), rec, args.max_seconds, log=lambda m: print(m, file=sys.stderr))
    if not rec.results:
        print("nothing measured: no file written", file=sys.stderr)
        return 1
    path = rec.write()
    print(f"wrote {len(rec.results)} medians ({len(rec.failed)} failed or skipped) to {path}", file=sys.stderr)
    # What the package would choose with this file, per op (the versions beside the table).
    with open(path) as f:
        data = dict(json.load(f), _file=os.path.basename(path))
    print(vline)
    for op in fk.ops._backend.op_kernels():
        be, why = fk.ops._backend.choose_gpu_backend(op, gpu, cap, [data])
        print(f"  {op}: {be} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
