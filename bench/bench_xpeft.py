"""X-PEFT mixed-profile serving: a batch of B rows from P distinct profiles through one adapter site.

    python bench/bench_xpeft.py                       # CPU, float32, ViT-B and MiniLM shapes
    python bench/bench_xpeft.py --device cuda --dtype float16

Providers (each computes out = x + s * (relu(x @ down[p] + a[p]) @ up[p] + b[p]) per row, p its profile):
  fused        ``xpeft_adapter`` (the C++ kernel on CPU, Triton on CUDA): one op for the mixed batch;
  one-profile  the same op, every row with the same profile (P = 1): the speed of a single adapter;
  loop         PEFT's mixed-adapter batches: a loop over the profiles present, index masks
               selecting each profile's rows, one adapter call per sub-batch, scattered back;
  einsum       Poly/MHR's mixed-task batches: per-example weights materialised (down[idx], up[idx])
               and applied with batched matrix products;
  torch-1      plain PyTorch single adapter (two BLAS matmuls), P = 1, for the absolute scale.
The combined adapters of the profiles are precomputed (cached per batch composition in the model);
the cost of that combination over an N-adapter bank is printed beside (``combine``).
Target: fused at P = 64 within 1.25x of one-profile (``ratio`` column).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fpet_kernels.ops.xpeft import xpeft_adapter  # noqa: E402

SHAPES = {"vit-b": (197, 768), "minilm": (128, 384)}  # (tokens per row, d)
TARGET = 1.25


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


STAT = {"median": statistics.median, "min": min}


def time_all(fns: dict, dev, repeats: int, stat: str = "median", warmup: int = 2) -> dict:
    """Wall time in ms of each ``fns[name]()``, median or minimum of ``repeats`` rounds. The
    providers run interleaved, one call each per round, so that a shared machine's drifting load
    hits all of them alike (the ratios are what the targets are about)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(dev)
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(dev)
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: STAT[stat](v) for k, v in ts.items()}


def loop_over_profiles(x, idx, down, db, up, ub, s):
    """PEFT's approach: per profile, the rows selected by an index mask through that adapter."""
    out = x.clone()
    for p in torch.unique(idx).tolist():
        rows = (idx == p).nonzero().squeeze(1)
        sub = x[rows]
        out[rows] = sub + s * (torch.relu(sub @ down[p] + db[p]) @ up[p] + ub[p])
    return out


def einsum_per_example(x, idx, down, db, up, ub, s):
    """Poly/MHR's approach: per-example weights materialised, then batched products."""
    h = torch.relu(torch.einsum("bnd,bdr->bnr", x, down[idx]) + db[idx].unsqueeze(1))
    return x + s * (torch.einsum("bnr,brd->bnd", h, up[idx]) + ub[idx].unsqueeze(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--batch", type=int, default=64, help="rows B")
    ap.add_argument("--profiles", default="1,8,64", help="P values")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bank", type=int, default=64, help="bank size N (for the combine cost)")
    ap.add_argument("--shapes", default="vit-b,minilm")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--backend", default=None, help="fused op backend (default: automatic)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--stat", default="median", choices=tuple(STAT),
                    help="median, or min (best of the repeats: steadier on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="B=8, P in 1,8, 3 repeats (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.profiles, args.repeats = 8, "1,8", 3
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    rep = dict(repeats=args.repeats, stat=args.stat)
    ps = [int(p) for p in args.profiles.split(",")]
    r, s = args.rank, 0.1
    print(f"device {dev}, {args.dtype}, B={args.batch}, rank {r}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    hdr = f"{'shape':<8} {'P':>3} {'fused':>9} {'one-prof':>9} {'ratio':>6} {'loop':>9} {'loop/1':>7} " \
          f"{'einsum':>9} {'torch-1':>9} {'combine':>9}  (ms, {args.stat} of {args.repeats})"
    print(hdr)
    worst = {}
    for shape in args.shapes.split(","):
        n, d = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, n, d, generator=g).to(dev, dt)
        pmax = max(ps)
        down = (torch.randn(pmax, d, r, generator=g) / math.sqrt(d)).to(dev, dt)
        db = (0.1 * torch.randn(pmax, r, generator=g)).to(dev, dt)
        up = (torch.randn(pmax, r, d, generator=g) / math.sqrt(r)).to(dev, dt)
        ub = (0.1 * torch.randn(pmax, d, generator=g)).to(dev, dt)
        bank = torch.randn(args.bank, d, r, generator=g).to(dev, dt)
        idx1 = torch.zeros(args.batch, dtype=torch.int64, device=dev)
        with torch.inference_mode():
            for p in ps:
                idx = (torch.arange(args.batch, device=dev) % p)[torch.randperm(args.batch, generator=g).to(dev)]
                w = torch.softmax(torch.randn(p, args.bank, generator=g), -1).to(dev, dt)
                t = time_all({
                    "fused": lambda: xpeft_adapter(x, idx, down[:p], db[:p], up[:p], ub[:p], s, backend=args.backend),
                    "one": lambda: xpeft_adapter(x, idx1, down[:1], db[:1], up[:1], ub[:1], s, backend=args.backend),
                    "loop": lambda: loop_over_profiles(x, idx, down, db, up, ub, s),
                    "loop1": lambda: loop_over_profiles(x, idx1, down, db, up, ub, s),
                    "einsum": lambda: einsum_per_example(x, idx, down, db, up, ub, s),
                    "torch1": lambda: x + s * (torch.relu(x @ down[0] + db[0]) @ up[0] + ub[0]),
                    # combination of P profiles' down and up projections over the bank, one layer
                    "combine": lambda: (torch.einsum("pn,ndr->pdr", w, bank), torch.einsum("pn,ndr->pdr", w, bank)),
                }, dev, **rep)
                ratio = t["fused"] / t["one"]
                worst[(shape, p)] = ratio
                print(f"{shape:<8} {p:>3} {t['fused']:>9.3f} {t['one']:>9.3f} {ratio:>5.2f}x {t['loop']:>9.3f} "
                      f"{t['loop'] / t['loop1']:>6.2f}x {t['einsum']:>9.3f} {t['torch1']:>9.3f} {t['combine']:>9.3f}")
    big = [(k, v) for k, v in worst.items() if k[1] == max(ps)]
    for (shape, p), v in big:
        print(f"target {shape}: fused P={p} / one profile = {v:.2f}x (target <= {TARGET}x): "
              f"{'met' if v <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
