"""Count the GPU kernel launches of one ``fk.tome_merge`` call, per backend, under torch.profiler.

    python bench/profile_launches.py                        # B=256, float16, every live GPU backend + reference
    python bench/profile_launches.py --batch 1 --dtype bfloat16 --compile --out /tmp/prof

The Triton issue's check: "a profiler trace of one tome_merge call on the GPU shows one kernel
launch". After a warm-up (kernel compilation, allocator), one call per provider is profiled
(CPU + CUDA activities, a throw-away session first so that CUPTI is initialised) and the
device-side events of its chrome trace are counted: kernels ("cat": "kernel"), memcpy and memset.

Writes to --out (default $OUT, else bench/results/gpu): launches.json (the counts and kernel
names per provider) and trace_tome_merge_<provider>.json (chrome://tracing / Perfetto).
Exit status: 0 when every live GPU backend launches exactly one kernel (memcpy and memset are
reported, not counted as kernels), 1 otherwise (or when no GPU backend is live), 2 without CUDA.
"""
import argparse
import json
import os
import sys

import torch

from common import DTYPES, GPU_BACKENDS, REFERENCE_FNS, fk, fused_fn, fused_providers, make_args

HERE = os.path.dirname(os.path.abspath(__file__))


def _device_events(trace_path: str) -> dict:
    with open(trace_path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    out = {"kernel": [], "gpu_memcpy": [], "gpu_memset": [], "launch_api": []}
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if e.get("ph") != "X":
            continue
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            out[cat].append(e.get("name", "?"))
        elif cat in ("cuda_runtime", "cuda_driver", "runtime", "driver") and "launch" in str(e.get("name", "")).lower():
            out["launch_api"].append(e.get("name", "?"))
    return out


def profile_call(fn, trace_path: str, warmup: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    ev = _device_events(trace_path)
    # Cross-check with the profiler's own event list (device-side events of any kind).
    try:
        n_dev = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - the count from the trace is the one reported
        n_dev = None
    return {
        "kernels": len(ev["kernel"]),
        "memcpy": len(ev["gpu_memcpy"]),
        "memset": len(ev["gpu_memset"]),
        "launch_api_calls": len(ev["launch_api"]),
        "profiler_device_events": n_dev,
        "kernel_names": ev["kernel"],
        "trace": os.path.basename(trace_path),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    ap.add_argument("--backends", nargs="+", choices=GPU_BACKENDS,
                    help="GPU backends to profile (default: the live ones)")
    ap.add_argument("--compile", action="store_true", help="also profile the reference under torch.compile")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results", "gpu"))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to profile", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    live = fused_providers("cuda")
    backends = args.backends or live
    dtype = DTYPES[args.dtype]
    (x, metric), _ = make_args("tome_merge", args.batch, "cuda", dtype)
    calls = {"reference": lambda: REFERENCE_FNS["tome_merge"](x, metric)}
    if args.compile:
        compiled = torch.compile(REFERENCE_FNS["tome_merge"], fullgraph=True, dynamic=False)
        calls["reference+compile"] = lambda: compiled(x, metric)
    for b in backends:
        fn = fused_fn("tome_merge", b)
        calls[b] = lambda fn=fn: fn(x, metric)

    # A throw-away session: the first one initialises CUPTI and may miss or add events.
    try:
        warm = os.path.join(args.out, "trace_warmup.json")
        profile_call(lambda: torch.ones(1, device="cuda").add_(1), warm, 1)
        os.remove(warm)
    except Exception as exc:  # noqa: BLE001 - the real sessions below report their own failures
        print(f"warning: the warm-up profiling session failed: {exc}", file=sys.stderr)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "op": "tome_merge",
              "batch": args.batch, "dtype": args.dtype, "r": 16, "class_token": True, "live": fk.backends()["live"],
              "providers": {}}
    ok = bool(backends)
    print(f"# one fk.tome_merge call, B={args.batch}, {args.dtype}, N=197 C=768 D=64 r=16, "
          f"{torch.cuda.get_device_name()}\n")
    print("| provider | GPU kernels | memcpy | memset | host launch API calls | pass (1 kernel) | kernels |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in calls.items():
        path = os.path.join(args.out, f"trace_tome_merge_{name.replace('+', '_')}.json")
        try:
            with torch.no_grad():
                res = profile_call(fn, path)
        except Exception as exc:  # noqa: BLE001 - a failing provider is reported, not fatal
            res = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
        is_gpu_backend = name in GPU_BACKENDS
        if "error" in res:
            passed = False
            print(f"| {name} | - | - | - | - | {'FAIL' if is_gpu_backend else '-'} | {res['error']} |")
        else:
            passed = res["kernels"] == 1
            if is_gpu_backend and (res["memcpy"] or res["memset"]):
                print(f"note: {name} also issues {res['memcpy']} memcpy and {res['memset']} memset", file=sys.stderr)
            names = sorted(set(res["kernel_names"]))
            shown = ", ".join(n[:60] for n in names[:6]) + (", ..." if len(names) > 6 else "")
            print(f"| {name} | {res['kernels']} | {res['memcpy']} | {res['memset']} | {res['launch_api_calls']} | "
                  f"{('PASS' if passed else 'FAIL') if is_gpu_backend else '-'} | {shown} |")
        res["pass"] = passed if is_gpu_backend else None
        result["providers"][name] = res
        if is_gpu_backend:
            ok = ok and passed
    measured = [r for r in result["providers"].values() if "kernels" in r]
    if measured and all(r["kernels"] == 0 for r in measured):
        print("\nno kernel event in any trace: is CUPTI available to torch.profiler? (see the chrome traces)")
    if not backends:
        print(f"\nno GPU backend is live (live: {fk.backends()['live']}): the one-launch check cannot pass")
    result["ok"] = ok
    with open(os.path.join(args.out, "launches.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'PASS' if ok else 'FAIL'}: one kernel launch per tome_merge call for "
          f"{', '.join(backends) or 'no GPU backend'}; counts in {os.path.join(args.out, 'launches.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
