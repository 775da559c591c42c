"""Diagnose HiWi training on all-MiniLM-L6-v2 with real reviews: per step, how many of the adapters' ReLU
units are active and how large the deltas ``f(P)`` are, for a few AdamW learning rates.

    python python/hiwi_units.py                       # lr 1e-2 and 1e-3, 20 steps of 16 reviews
    python python/hiwi_units.py --lr 1e-4 1e-3 1e-2 --steps 50 --targets ffn
    python python/hiwi_units.py --plain               # the un-normalised adapter, for comparison

A unit is active when its pre-activation is positive (for a weight target: on at least one row); an
inactive ReLU unit passes no gradient, so a target whose units are all inactive never changes again.
Per step the script prints the loss, the active units over all targets (of rank x targets), the targets
whose delta is non-zero, and the smallest / median / largest delta norm ``||f(P)||`` over the targets and
how far the deltas moved in that step (median over targets of ``||f_t(P) - f_{t-1}(P)||``).

``--plain`` swaps in the adapter HiWi had before it normalised its input,
``f(v) = ReLU(v @ W_down) @ W_up`` with ``W_down`` uniform +-1/sqrt(n) and no bias: on the same data it
shows the collapse (see docs/pafi_hiwi.md). Data and model: python/text_data.py (offline, pip packages).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from text_data import batches, encode, load_minilm, load_rotten_tomatoes  # noqa: E402

from fpet_kernels import pet  # noqa: E402


def make_plain(adapter: pet.HiWiAdapter) -> None:
    """Turn ``adapter`` into the earlier, un-normalised ``ReLU(v @ down) @ up`` (no bias, down +-1/sqrt(n))."""
    with torch.no_grad():
        bound = 1.0 / math.sqrt(adapter.dim)
        adapter.down.uniform_(-bound, bound)
        adapter.down_bias.zero_()  # frozen after mark_trainable (see run)
    adapter.hidden = types.MethodType(lambda self, v: v @ self.down, adapter)
    adapter.forward = types.MethodType(lambda self, v: F.relu(v @ self.down) @ self.up, adapter)


def snapshot(model: nn.Module):
    """``(active units, units, {target: delta})`` over every HiWi target of ``model``."""
    active, total, deltas = 0, 0, {}
    for name, mod in pet.hiwi.hiwi_modules(model):
        for which, k in mod.active_units().items():
            active += k
            total += getattr(mod, f"hiwi_{which}").rank
        for which, d in mod.deltas().items():
            deltas[f"{name}.{which}"] = d.clone()
    return active, total, deltas


def run(lr: float, base_model: nn.Module, data, args) -> list:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base_model)
    pet.apply(model, "hiwi", rank=args.rank, targets=args.targets)
    for _, mod in pet.hiwi.hiwi_modules(model) if args.plain else ():
        for ad in (mod.hiwi_weight, mod.hiwi_bias):
            if ad is not None:
                make_plain(ad)
    pet.mark_trainable(model)
    for _, mod in pet.hiwi.hiwi_modules(model) if args.plain else ():
        for ad in (mod.hiwi_weight, mod.hiwi_bias):
            if ad is not None:
                ad.down_bias.requires_grad_(False)
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": head, "lr": args.head_lr}, {"params": body, "lr": lr}],
                            weight_decay=args.weight_decay)
    enc, labels = data
    model.train()
    rows = []
    active, total, prev = snapshot(model)
    print(f"\nlr {lr:g} ({'plain adapter' if args.plain else 'HiWi'}, targets={args.targets!r}, rank {args.rank}, "
          f"{len(prev)} targets, batch {args.batch_size})")
    print(f"{'step':>4} {'loss':>7} {'active units':>13} {'non-zero deltas':>16} {'min |f(P)|':>11} "
          f"{'median':>9} {'max':>9} {'median step':>12}")
    print(f"{0:>4} {'':>7} {f'{active}/{total}':>13} {f'{sum(bool(d.any()) for d in prev.values())}/{len(prev)}':>16}")
    stream = batches(enc, labels, args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        ids, mask, y = next(stream)
        loss = F.cross_entropy(model(ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        active, total, now = snapshot(model)
        norms = [float(d.norm()) for d in now.values()]
        moved = [float((now[k] - prev[k]).norm()) for k in now]
        nonzero = sum(bool(d.any()) for d in now.values())
        rows.append(dict(lr=lr, step=step, loss=float(loss.detach()), active=active, units=total, nonzero=nonzero,
                         targets=len(now), min_norm=min(norms), median_norm=statistics.median(norms),
                         max_norm=max(norms), median_moved=statistics.median(moved), min_moved=min(moved)))
        print(f"{step:>4} {float(loss.detach()):>7.4f} {f'{active}/{total}':>13} {f'{nonzero}/{len(now)}':>16} "
              f"{min(norms):>11.3e} {statistics.median(norms):>9.3e} {max(norms):>9.3e} "
              f"{statistics.median(moved):>12.3e}")
        prev = now
    last = rows[-1]
    print(f"after {args.steps} steps: {last['active']}/{last['units']} units active, {last['nonzero']}/"
          f"{last['targets']} deltas non-zero, {sum(m > 0 for m in moved)}/{len(moved)} deltas moved in the last step")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-2, 1e-3], help="AdamW learning rates of the adapters")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train", type=int, default=1600, help="training reviews (batches are drawn from these)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="ffn_bias", help="HiWi targets: a preset or one regex")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="the earlier un-normalised adapter, for comparison")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.steps * args.batch_size > args.train:
        ap.error(f"--steps must be >= 1 and steps x batch size ({args.steps * args.batch_size}) at most --train")
    torch.set_num_threads(args.threads)
    split = load_rotten_tomatoes(seed=args.seed, max_train=args.train, max_test=1)
    tokenizer, base_model = load_minilm(num_labels=2, seed=args.seed)
    data = (encode(tokenizer, split.train_texts, args.max_length), split.train_labels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; all-MiniLM-L6-v2, "
          f"{len(split.train_texts)} Rotten Tomatoes reviews")
    return [row for lr in args.lr for row in run(lr, base_model, data, args)]


if __name__ == "__main__":
    main()
