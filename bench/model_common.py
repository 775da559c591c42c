"""Whole-model pieces of bench/bench_model.py: the timm ViT, its variants, timers, launch counts, CSV, plot.

Variants of one ``timm`` ViT (``Variant``), each applied to the model in place and undone afterwards:
  "as shipped"       the unpatched timm model;
  "zero-cost bound"  the same blocks dropping the tokens a method would merge away, right after
                     attention, with no matching and no proportional attention (``zero_cost``): the
                     speed-up a merge could give if it cost nothing;
  "reference patch"  ``fk.patch.timm(model, ..., backend="reference")``: the pure-PyTorch ops;
  "fused"            ``fk.patch.timm(model, ..., backend=None)``: the automatic choice (C++ "cpu" on
                     CPU, "triton"/"cuda" on GPU).
Methods: ToMe (r per layer, proportional attention on), FPET (one merge at block 6: 197 -> 99
tokens), PYRA (r = [16] * 11 + [10]).
"""
from __future__ import annotations

import importlib
import math
import os
import statistics
import tempfile
import time
import types
from dataclasses import dataclass

import torch

from common import append_csv, fk  # noqa: F401 (append_csv re-exported); common.py puts this checkout first on sys.path

MODEL = "vit_base_patch16_224"
VARIANTS = ("as shipped", "zero-cost bound", "reference patch", "fused")
PATCHED = ("reference patch", "fused")
METHODS = ("tome", "fpet", "pyra")
TOME_R = 16
FPET_MERGE_LAYER = 6  # 0-based: the merge runs after the attention of block 6
PYRA_R = (16,) * 11 + (10,)
SWEEP_R = (0, 4, 8, 12, 16, 20)
QUICK_SWEEP_R = (0, 16)
PATCH_BACKEND = {"reference patch": "reference", "fused": None}

# The whole-model targets: H100, float16, fused patch. (method, r, batch, mode) -> minimum
# speed-up over "as shipped" in the same dtype, batch and mode.
TARGETS = {
    ("tome", TOME_R, 256, "eager"): (1.60, ">= 1.60x as shipped"),
    ("fpet", None, 256, "eager"): (1.20, ">= 1.20x as shipped"),
    ("tome", TOME_R, 1, "graph"): (1.00, "latency <= 1.00x as shipped (graph)"),
}


@dataclass(frozen=True)
class Variant:
    variant: str           # one of VARIANTS
    method: str = "-"      # "-" (as shipped), "tome", "fpet", "pyra"
    r: object = None       # ToMe: int; PYRA: tuple per layer; None otherwise

    @property
    def patched(self) -> bool:
        return self.variant in PATCHED

    @property
    def r_text(self) -> str:
        if self.method == "tome":
            return str(self.r)
        if self.method == "fpet":
            return f"50% @ blk {FPET_MERGE_LAYER}"
        if self.method == "pyra":
            return _schedule_text(self.r)
        return "-"

    @property
    def label(self) -> str:
        return self.variant if self.method == "-" else f"{self.variant} {self.method} r={self.r_text}"


def _schedule_text(r) -> str:
    r = list(r)
    head = r[0]
    n = next((i for i, v in enumerate(r) if v != head), len(r))
    rest = r[n:]
    return f"[{head}]*{n}" + (f"+{rest}" if rest else "")


def main_variants(methods, variants=VARIANTS) -> list:
    """as shipped + (zero-cost bound, reference patch, fused) per method."""
    out = [Variant("as shipped")] if "as shipped" in variants else []
    for m in methods:
        r = {"tome": TOME_R, "fpet": None, "pyra": PYRA_R}[m]
        out += [Variant(v, m, r) for v in VARIANTS[1:] if v in variants]
    return out


def sweep_variants(rs, variants=VARIANTS) -> list:
    """ToMe at every r of the sweep: zero-cost bound and fused."""
    return [Variant(v, "tome", int(r)) for r in rs for v in ("zero-cost bound", "fused") if v in variants]


# ----------------------------------------------------------------------------- the model
def make_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_input(batch: int, device: str, dtype: torch.dtype, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)


def input_size(model) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def signature(model) -> list:
    """What a patch may change and its removal must restore: module classes, instance-level forwards,
    plain attributes (flags such as ``fused_attn``), parameter and buffer names/shapes/dtypes."""
    sig = [("model", type(model))]
    for name, m in model.named_modules():
        plain = sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))))
        sig.append((name, type(m), "forward" in vars(m), tuple(sorted(vars(m))), tuple(plain)))
    sig += [(n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters()]
    sig += [(n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()]
    return sig


def signature_diff(before: list, after: list, limit: int = 3) -> str:
    if len(before) != len(after):
        return f"{len(before)} -> {len(after)} entries (modules/parameters/buffers added or removed)"
    diffs = [f"{a[0]}: {a[1:]} -> {b[1:]}" for a, b in zip(before, after) if a != b]
    return "; ".join(d[:200] for d in diffs[:limit]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > limit else "")


# ----------------------------------------------------------------------------- fk.patch
def load_patch():
    """(the ``fpet_kernels.patch`` module, "") or (None, why) while it does not exist yet.

    Only the module itself being absent (or lacking ``timm``/``remove``) counts as unavailable; an
    ImportError raised from inside an existing module, or any other error, propagates."""
    try:
        mod = importlib.import_module("fpet_kernels.patch")
    except ModuleNotFoundError as exc:
        if exc.name == "fpet_kernels.patch":
            return None, "unavailable: fpet_kernels.patch does not exist yet"
        raise
    missing = [f for f in ("timm", "remove") if not callable(getattr(mod, f, None))]
    if missing:
        return None, f"unavailable: fpet_kernels.patch has no {'/'.join(missing)}()"
    return mod, ""


def patch_kwargs(v: Variant) -> dict:
    if v.method == "tome":
        return dict(method="tome", r=v.r, prop_attn=True, trace_source=False)
    if v.method == "fpet":
        return dict(method="fpet", merge_layer=FPET_MERGE_LAYER, prop_attn=True)
    if v.method == "pyra":
        return dict(method="pyra", r=list(v.r))
    raise ValueError(f"no patch for {v}")


def apply_variant(model, v: Variant, patch_mod=None):
    """Turn ``model`` into variant ``v`` in place; returns the function undoing it."""
    if v.variant == "as shipped":
        return lambda: None
    if v.variant == "zero-cost bound":
        return zero_cost(model, v)
    if v.patched:
        if patch_mod is None:
            raise RuntimeError("fpet_kernels.patch is not available")
        # the same initial values for the modules a patch adds (FPET's refinement adapter, PYRA's
        # modulation) in the reference and the fused patch, so that their logits can be compared
        torch.manual_seed(1)
        patch_mod.timm(model, backend=PATCH_BACKEND[v.variant], **patch_kwargs(v))
        return lambda: patch_mod.remove(model)
    raise ValueError(f"unknown variant {v.variant!r}")


# ----------------------------------------------------------------------------- zero-cost bound
def drop_schedule(v: Variant, depth: int) -> list:
    """Per block: a function of the token count N after attention -> the tokens kept (class token first)."""
    protected = 1  # timm ViT-B: the class token (model.num_prefix_tokens; ToMe protects it)
    if v.method in ("tome", "pyra"):
        rs = fk.parse_r(depth, list(v.r) if isinstance(v.r, tuple) else v.r)
        return [(lambda n, r=r: n - min(r, (n - protected) // 2)) for r in rs]
    if v.method == "fpet":
        # every A cell of the checkerboard merges away: protected + half the patch tokens stay (197 -> 99)
        return [(lambda n: protected + (n - protected) // 2) if i == FPET_MERGE_LAYER else None
                for i in range(depth)]
    raise ValueError(f"no zero-cost schedule for {v}")


def _dropping_forward(keep):
    def forward(self, x, *args, **kwargs):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
        n = keep(x.shape[1])
        if n < x.shape[1]:
            x = x[:, :n]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return forward


def zero_cost(model, v: Variant):
    """Wrap each block's forward (an instance attribute, nothing global) so that it drops the tokens
    the method would merge away after attention; returns the function restoring the blocks."""
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        missing = [a for a in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
                   if not hasattr(blk, a)]
        if missing or "forward" in vars(blk):
            why = f"missing {missing}" if missing else "it already has an instance forward"
            raise TypeError(f"block {i} ({type(blk).__name__}) is not a plain timm Block: {why}")
    wrapped = []
    for blk, keep in zip(blocks, drop_schedule(v, len(blocks))):
        if keep is not None:
            blk.forward = types.MethodType(_dropping_forward(keep), blk)
            wrapped.append(blk)

    def undo():
        for blk in wrapped:
            del blk.forward
    return undo


def tokens_per_block(v: Variant, depth: int = 12, n: int = 197) -> list:
    """Tokens entering each block's MLP under the zero-cost schedule (for notes and checks)."""
    if v.variant == "as shipped":
        return [n] * depth
    out = []
    for keep in drop_schedule(v, depth):
        n = keep(n) if keep is not None else n
        out.append(n)
    return out


# ----------------------------------------------------------------------------- timers
def time_gpu(fn, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of ``fn`` on the GPU: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA
    events around each call), or CUDA events directly without Triton."""
    torch.cuda.synchronize()
    try:
        import triton.testing
    except ImportError:
        triton = None
    if triton is not None:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


class GraphForward:
    """A forward captured into a CUDA graph with a static input: ``replay()`` reruns it with one launch.

    Build it under ``torch.inference_mode()`` (as the eager forward). Capture errors propagate from
    the constructor (the caller reports them); ``close()`` frees the graph and its memory pool."""

    def __init__(self, fn, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, Triton compilation)
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()
        torch.cuda.synchronize()
        self.graph.replay()  # a capture that "succeeds" but cannot run fails here, not in the timing
        torch.cuda.synchronize()

    def replay(self):
        self.graph.replay()

    def close(self):
        self.graph = self.out = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def count_launches(fn) -> dict:
    """Device-side events of one call of ``fn`` under torch.profiler: kernels, memcpy, memset, and the
    kernel names (bench/profile_launches.py's counting, on a chrome trace in a temporary file)."""
    from profile_launches import profile_call

    with tempfile.TemporaryDirectory() as d:
        return profile_call(fn, os.path.join(d, "trace.json"))


def warm_profiler() -> None:
    """A throw-away profiling session: the first one initialises CUPTI and may miss or add events."""
    try:
        count_launches(lambda: torch.ones(1, device="cuda").add_(1))
    except Exception:  # noqa: BLE001 - the real sessions report their own failures
        pass


# ----------------------------------------------------------------------------- spread
# The fused path's logits may differ from the reference patch's by at most this fraction of the
# reference logits' standard deviation (max abs difference); beyond it bench_model.py exits with status 3.
# float32: the kernels sum in another order (observed <= 1e-6 of the std); half precision: rounding of
# the merged tokens and, rarely, a near-tie matched the other way.
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


def spread(values) -> float:
    """Half the range of ``values`` after dropping the highest and the lowest when there are 5 or more
    (one round disturbed by another process does not widen it); 0 for fewer than 2 values.

    A speed-up printed as ``1.61x ±0.03`` means the per-round speed-ups (each the ratio of two
    forwards timed back to back in the same round) lie within 1.58-1.64 (bar the extreme two)."""
    v = sorted(values)
    if len(v) >= 5:
        v = v[1:-1]
    return (v[-1] - v[0]) / 2 if len(v) >= 2 else 0.0


def paired_ratios(num: dict, den: dict) -> list:
    """``num[k] / den[k]`` for every round ``k`` both have: ratios of samples taken in the same round."""
    return [num[k] / den[k] for k in sorted(set(num) & set(den)) if den[k] > 0]


def ratio_stats(num: dict, den: dict):
    """(median, spread) of the paired per-round ratios ``num / den``; (None, None) without a common round,
    (median, None) with one (no spread to tell)."""
    r = paired_ratios(num, den)
    if not r:
        return None, None
    return statistics.median(r), (spread(r) if len(r) >= 2 else None)


# ----------------------------------------------------------------------------- CSV and plot
CSV_FIELDS = ["date", "device", "device_type", "torch", "timm", "triton", "version", "commit", "model", "variant",
              "method", "r", "dtype", "batch", "mode", "median_ms", "spread_ms", "min_ms", "images_per_s", "speedup",
              "speedup_spread", "vs_reference_patch", "vs_reference_patch_spread", "bound_ms", "bound_speedup",
              "target", "target_met", "fused_backend", "reps", "max_dlogit", "logit_tolerance", "note"]


def ips_text(batch: int, ms: float) -> str:
    """images/s to 4 significant figures (CPU figures are below 1)."""
    ips = batch * 1e3 / ms
    return f"{ips:.1f}" if ips >= 1000 else f"{ips:.4g}"


def throughput_point(batch: int, ms: float, spread_ms: float | None) -> tuple:
    """(images/s, how far below, how far above) for a median latency ``ms`` with its spread: the
    throughputs of ``ms + spread`` and ``ms - spread`` (no spread: one round, zero-length bars)."""
    ips = batch * 1e3 / ms
    sp = spread_ms or 0.0
    lo = batch * 1e3 / (ms + sp)
    hi = batch * 1e3 / (ms - sp) if ms > sp else float("inf")
    return ips, ips - lo, hi - ips


def _point(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, 0.0, 0.0)


def plot_sweep(series: dict, path: str, title: str) -> dict:
    """One panel per (dtype, B, mode): images/s against r for fused ToMe and the zero-cost bound, as
    shipped as a horizontal line, the reference patch at r=16 as a marker; every point with an error
    bar (as shipped: a band) from the spread of its latency, and r ticks at the measured r only.

    ``series[(dtype, B, mode)] = {"fused": {r: point}, "zero-cost bound": {r: point},
    "as shipped": point or None, "reference patch": {r: point}}``, a point being
    ``throughput_point(...)`` (images/s, minus, plus) or a bare images/s.
    Returns ``{(dtype, B, mode): {"xticks": [r, ...], "yerr": {name: [(minus, plus), ...]}}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(series)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.2 * cols, 6.5), 3.9 * rows + 0.4), squeeze=False)
    drawn = {}
    for ax, key in zip(axes.flat, keys):
        s = series[key]
        info = drawn[key] = {"xticks": [], "yerr": {}}
        for name, style in (("zero-cost bound", dict(ls="--", marker="s", color="tab:gray")),
                            ("fused", dict(ls="-", marker="o", color="tab:blue")),
                            ("reference patch", dict(ls="none", marker="x", ms=9, color="tab:red"))):
            pts = sorted((r, _point(v)) for r, v in s.get(name, {}).items())
            if not pts:
                continue
            err = [(p[1], p[2]) for _, p in pts]
            ys = [p[0] for _, p in pts]
            # a spread as large as the median itself has no finite upper end: drawn up to 2x the median
            ax.errorbar([r for r, _ in pts], ys, yerr=[[e[0] for e in err], [min(e[1], y) for e, y in zip(err, ys)]],
                        capsize=3, label=f"{name} (ToMe)", **style)
            info["yerr"][name] = err
            info["xticks"] += [r for r, _ in pts]
        if s.get("as shipped"):
            ips, minus, plus = _point(s["as shipped"])
            ax.axhline(ips, color="black", lw=1, label="as shipped")
            if minus or plus:
                ax.axhspan(ips - minus, ips + min(plus, ips), color="black", alpha=0.1, lw=0)
            info["yerr"]["as shipped"] = [(minus, plus)]
        info["xticks"] = sorted(set(info["xticks"]))
        if info["xticks"]:
            ax.set_xticks(info["xticks"])
        dtype, b, mode = key
        ax.set_title(f"{dtype}, B={b}, {mode}")
        ax.set_xlabel("r (tokens merged per block)")
        ax.set_ylabel("images / s (bars: spread over rounds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
