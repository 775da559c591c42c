"""Compile every Triton kernel the package can launch for an H100 (sm_90) ahead of time, as a launch would.

No GPU needed. The launchers of ``fpet_kernels/ops/*_triton*.py`` are called on small CPU tensors
(ViT-B/16 shapes and the variants listed in ``SCENARIOS``) with ``JITFunction.run`` replaced by a
recorder: each launch is specialised by the installed Triton's own binder (``specialize_impl``,
``_pack_args``: pointers and ints that are multiples of 16 get ``tt.divisibility = 16``, ints equal
to 1 become constexprs), exactly as ``kernel[grid](...)`` does on a GPU, for
``GPUTarget("cuda", 90, 32)``. Every distinct launch is then compiled to a cubin, and its registers,
stack bytes (spills) and shared memory are read back (``cuobjdump -res-usage`` of Triton's own
toolchain, and the kernel's metadata).

Fails (exit 1) when a kernel does not compile, needs more than 227 KB of shared memory, a scenario
raises, or a kernel launched in an ops module (``name[grid](...)``) is launched by no scenario.

    python bench/aot_check.py                      # the installed Triton
    python bench/aot_check.py --triton-dir DIR     # the Triton installed in DIR
                                                   # (pip install --target DIR triton==3.6.0)
    python bench/aot_check.py --quick              # fewer launches (CI): base cases in every dtype,
                                                   # the flag / shape variants combined, in float16
    python bench/aot_check.py --list               # the launches only (seconds), nothing compiled

A new kernel is covered when it is a ``@triton.jit`` function of an ``ops/*_triton*.py`` module
launched there as ``name[grid](...)`` (found automatically), and some entry of ``SCENARIOS``
drives the launcher that launches it; otherwise the check fails naming the kernel.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 227 * 1024  # an H100's largest shared memory per block (opt-in), bytes


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-dir", help="a folder with another Triton (pip install --target DIR triton==X)")
    ap.add_argument("--quick", action="store_true", help="flag and shape variants combined, in float16 only")
    ap.add_argument("--only", default="", help="regex: run only the scenarios whose name matches")
    ap.add_argument("--out", default=None,
                    help="write the table (markdown) and the records (json) next to this path "
                         "(default bench/results/aot_sm90_triton<version>.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--list", action="store_true", help="record and print the launches, compile nothing")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiling processes")
    return ap.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.triton_dir:
    if not os.path.isdir(os.path.join(ARGS.triton_dir, "triton")):
        sys.exit(f"--triton-dir: no triton package in {ARGS.triton_dir}")
    sys.path.insert(0, os.path.abspath(ARGS.triton_dir))
os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions (decided at import)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = (F16, BF16, F32)


# ----------------------------------------------------------------------------- recording launches
class Recorder:
    """Replaces ``JITFunction.run``: every launch is specialised as the runtime does and kept."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders = {}
        self.launches = {}     # key -> record
        self.scenario = None

    def run(self, fn, args, kwargs):
        knobs = getattr(triton, "knobs", None)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or bool(knobs and knobs.runtime.debug)
        if knobs is not None and hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in self.binders:
            self.binders[fn] = triton_jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = self.binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                    sorted(options.__dict__.items())))
        rec = self.launches.setdefault(key, dict(fn=fn, name=fn.__name__, module=fn.module, signature=signature,
                                                 constexprs=constexprs, attrs=attrs, options=options,
                                                 scenarios=[]))
        if self.scenario not in rec["scenarios"]:
            rec["scenarios"].append(self.scenario)

    def __enter__(self):
        rec = self

        def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - the grid is not needed to compile
            rec.run(self, args, kwargs)
            return None

        self._saved = triton_jit.JITFunction.run
        triton_jit.JITFunction.run = run
        return self

    def __exit__(self, *exc):
        triton_jit.JITFunction.run = self._saved


def launched_kernels():
    """{module: {kernel name: JITFunction}} of every ``name[grid](...)`` launch site in the ops modules."""
    import importlib
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "fpet_kernels", "ops", "*_triton*.py"))):
        modname = "fpet_kernels.ops." + os.path.basename(path)[:-3]
        mod = importlib.import_module(modname)
        src = open(path, encoding="utf-8").read()
        kernels = {}
        for name in sorted(set(re.findall(r"\b(\w+)\s*\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]\s*\(", src))):
            obj = getattr(mod, name, None)
            if isinstance(obj, triton_jit.JITFunction):
                kernels[name] = obj
        for name, obj in vars(mod).items():  # a *_kernel defined here but launched elsewhere
            if isinstance(obj, triton_jit.JITFunction) and name.endswith("_kernel") and obj.module == modname:
                kernels.setdefault(name, obj)
        found[modname] = kernels
    return found


# ----------------------------------------------------------------------------- scenarios
def _rand(*shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _size(b, n, dtype=F32):
    return torch.ones(b, n, 1, dtype=dtype)


def tome(dt=F16, mdt=None, n=197, c=768, d=64, r=16, size=True, sdt=F32, cls=True, distill=False, pyra=False,
         pdt=F32, match=False):
    from fpet_kernels.ops import pyra_triton, tome_triton as tt
    x, m = _rand(2, n, c, dtype=dt), _rand(2, n, d, dtype=mdt or dt, seed=1)
    s = _size(2, n, sdt) if size else None
    if match:
        tt.tome_match(m, r, cls, distill)
    elif pyra:
        pyra_triton.pyra_merge(x, m, r, _rand(r, 1, dtype=pdt), _rand(1, c, dtype=pdt), _rand(c, dtype=pdt),
                               _rand(c, dtype=pdt), s, cls, distill, 1e-5)
    else:
        tt.tome_merge(x, m, r, s, cls, distill)


def match_rows(dt=F16, n=197, d=64, r=16, size=True, sdt=F32, cls=True, distill=False, thr=None):
    """ToMe's per-row matching (padded batches, threshold merging): ``tome_match_rows_triton``."""
    from fpet_kernels.ops import tome_match_rows_triton as tm
    tm.tome_match_rows(_rand(2, n, d, dtype=dt, seed=1), r, cls, distill, _size(2, n, sdt) if size else None, thr)


def reduce(op, dt=F16, n=197, c=768, n_out=181, size=True, sdt=F32):
    from fpet_kernels.ops import tome_triton as tt
    tmap = torch.arange(n).remainder(n_out).expand(2, n).contiguous()
    s = _size(2, n, sdt) if size else None
    if op == "merge_sum":
        tt.merge_sum(_rand(2, n, c, dtype=dt), tmap, n_out)
    elif op == "merge_wavg":
        tt.merge_wavg(_rand(2, n, c, dtype=dt), s, tmap, n_out)
    elif op == "unmerge":
        tt.unmerge(_rand(2, n_out, c, dtype=dt), tmap)
    else:  # merge_wavg_backward
        tt.merge_wavg_backward(_rand(2, n_out, c, dtype=dt), s, _size(2, n_out), tmap)


def fpet(dt=F16, mdt=None, prefix=1, h=14, w=14, c=768, d=64, size=True, sdt=F32, backward=False, gsize=True,
         gdt=None, padded=False):
    """``padded``: the per-row ops (``fpet_merge_rows[_backward]``, the PADDED kernels)."""
    from fpet_kernels.ops import fpet_triton, fpet_triton_backward
    from fpet_kernels.ops.shapes import grid_sizes
    n = prefix + h * w
    x, m = _rand(2, n, c, dtype=dt), _rand(2, n, d, dtype=mdt or dt, seed=1)
    s = _size(2, n, sdt) if size else None
    if not backward:
        (fpet_triton.fpet_merge_rows if padded else fpet_triton.fpet_merge)(x, m, s, prefix, h, w)
        return
    _, nb = grid_sizes(prefix, h, w)
    tmap = torch.arange(n).remainder(nb).expand(2, n).contiguous()
    go = _rand(2, nb, c, dtype=gdt or dt)
    bwd = fpet_triton_backward.fpet_merge_rows_backward if padded else fpet_triton_backward.fpet_merge_backward
    bwd(go, _size(2, nb) if gsize else None, x, m, s, _rand(2, nb, c, dtype=dt), _size(2, nb), tmap, prefix, h, w)


def pyra_backward(dt=F16, n=197, c=768, r=16, size=True, sdt=F32, gsize=True, distill=False, pdt=F32):
    from fpet_kernels.ops import pyra_triton_backward as pb
    na, nb = (n + 1) // 2, n // 2
    b = 2
    src = torch.arange(r).expand(b, r).contiguous()
    dst = (torch.arange(r) % nb).expand(b, r).contiguous()
    unm = torch.arange(r, na).expand(b, na - r).contiguous()
    pb.pyra_merge_backward(_rand(b, n - r, c, dtype=dt), _size(b, n - r) if gsize else None, _rand(b, n, c, dtype=dt),
                           _size(b, n, sdt) if size else None, _rand(b, n - r, c, dtype=dt), _size(b, n - r),
                           src, dst, unm, _rand(r, 1, dtype=pdt), _rand(1, c, dtype=pdt), _rand(c, dtype=pdt),
                           _rand(c, dtype=pdt), 1e-5, distill)


def pyra_rows(dt=F16, n=197, c=768, r=16, size=True, sdt=F32, gsize=True, pdt=F32, threshold=None):
    """PYRA's per-row op (padded batches / threshold merging) and its backward, on a right-padded batch
    (the second row half padding) and its per-row matching."""
    from fpet_kernels.ops import pyra_rows_triton as pr
    from fpet_kernels.ops.tome import static_rows, tome_match_rows_reference
    b = 2
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, n // 2:] = False
    src, dst, _, tmap, _ = tome_match_rows_reference(_rand(b, n, 16), r, True, False, valid, threshold)
    rr, n_out = src.shape[1], static_rows(n, r, threshold, True, False)
    sz = valid[..., None].to(sdt) if size else None
    x = _rand(b, n, c, dtype=dt)
    params = (_rand(rr, 1, dtype=pdt), _rand(1, c, dtype=pdt), _rand(c, dtype=pdt), _rand(c, dtype=pdt))
    pr.pyra_merge_rows(x, sz, src, dst, tmap, *params, n_out, 1e-5)
    pr.pyra_merge_rows_backward(_rand(b, n_out, c, dtype=dt), _size(b, n_out) if gsize else None, x, sz,
                                _rand(b, n_out, c, dtype=dt), _size(b, n_out), src, dst, tmap, *params, 1e-5)


def attention(dt=F16, n=197, heads=12, hd=64, size=True, sdt=F32, pad_value=True):
    from fpet_kernels.ops import attention_triton
    attention_triton.attention_inputs(_rand(2, n, 3 * heads * hd, dtype=dt), _size(2, n, sdt) if size
                                      else None, heads, hd ** -0.5, pad_value)


def masked_grad(dt=F16, m=394, out=768, inp=3072, k=4000, transposed=False):
    from fpet_kernels.ops import sparse_triton
    g = _rand(m, out, dtype=dt)
    x = _rand(inp, m, dtype=dt).t() if transposed else _rand(m, inp, dtype=dt)
    flat = torch.randperm(out * inp, generator=torch.Generator().manual_seed(0))[:k].sort().values
    sparse_triton.masked_weight_grad(g, x, flat // inp, flat % inp)


def xpeft(dt=F16, wdt=None, n=197, d=768, r=16, profiles=4, residual=True):
    from fpet_kernels.ops import xpeft_triton
    wdt = wdt or dt
    xpeft_triton.xpeft_adapter(_rand(2, n, d, dtype=dt), _rand(2, n, d, dtype=dt) if residual else None,
                               torch.tensor([0, profiles - 1]), _rand(profiles, d, r, dtype=wdt),
                               _rand(profiles, r, dtype=wdt), _rand(profiles, r, d, dtype=wdt),
                               _rand(profiles, d, dtype=wdt), 0.5)


def _name(fn, kw):
    return fn.__name__ + "(" + ",".join(f"{k}={str(v).replace('torch.', '')}" for k, v in kw.items()) + ")"


def scenarios(quick: bool) -> list:
    """(name, callable, kwargs): the base case of every launcher in each dtype, then its flag and shape
    variants (what the launch sites can produce: sizes absent / in half precision, the class and
    distillation tokens, r == 1, r not a multiple of 16, other metric widths, half parameters,
    mixed dtypes, other token counts) in every dtype; ``quick``: the variants combined, several per
    launch, in float16 only."""
    base = [
        (tome, {}), (tome, dict(pyra=True)), (match_rows, {}),
        (reduce, dict(op="merge_sum")), (reduce, dict(op="merge_wavg")), (reduce, dict(op="unmerge")),
        (reduce, dict(op="merge_wavg_backward")),
        (fpet, {}), (fpet, dict(backward=True)), (pyra_backward, {}), (attention, {}), (masked_grad, {}),
        (xpeft, {}), (pyra_rows, {}),
    ]
    variants = [
        (tome, dict(size=False)), (tome, dict(cls=False)), (tome, dict(distill=True)), (tome, dict(r=1)),
        (tome, dict(r=13)), (tome, dict(d=40)), (tome, dict(d=128)), (tome, dict(n=256, c=512)),
        (tome, dict(match=True)), (tome, dict(mdt=F32)), (tome, dict(sdt=None)),
        (tome, dict(pyra=True, size=False)), (tome, dict(pyra=True, distill=True)), (tome, dict(pyra=True, r=1)),
        (tome, dict(pyra=True, pdt=None)), (tome, dict(pyra=True, c=100, d=40, n=50, r=5)),
        (match_rows, dict(size=False)), (match_rows, dict(cls=False)), (match_rows, dict(distill=True)),
        (match_rows, dict(r=None, thr=0.5)), (match_rows, dict(thr=-1.0)), (match_rows, dict(r=1)),
        (match_rows, dict(d=40)), (match_rows, dict(d=768)), (match_rows, dict(n=50)), (match_rows, dict(sdt=None)),
        (reduce, dict(op="merge_wavg", size=False)), (reduce, dict(op="merge_wavg", sdt=None)),
        (reduce, dict(op="merge_sum", c=100, n=50, n_out=33)), (reduce, dict(op="merge_sum", c=24)),
        (reduce, dict(op="merge_wavg", c=1)), (reduce, dict(op="merge_wavg_backward", size=False)),
        (reduce, dict(op="unmerge", c=100, n=50, n_out=33)),
        (fpet, dict(size=False)), (fpet, dict(prefix=0)), (fpet, dict(prefix=2)), (fpet, dict(d=40)),
        (fpet, dict(d=128)), (fpet, dict(mdt=F32)), (fpet, dict(h=7, w=9, c=100)),
        (fpet, dict(backward=True, size=False, gsize=False)), (fpet, dict(backward=True, prefix=0)),
        (fpet, dict(backward=True, d=40)), (fpet, dict(backward=True, d=128)),
        (fpet, dict(backward=True, mdt=F32)), (fpet, dict(backward=True, h=7, w=9, c=100)),
        (fpet, dict(backward=True, gdt=F32)),
        # the per-row ops: a padded text batch (grid (1, N - 1), MiniLM's 384 channels), and a padded 2-D grid
        (fpet, dict(padded=True, h=1, w=127, c=384, d=32)), (fpet, dict(padded=True, backward=True, h=1, w=127, c=384, d=32)),
        (fpet, dict(padded=True, size=False)), (fpet, dict(padded=True, backward=True)),
        (tome, dict(d=768)), (fpet, dict(d=768)), (fpet, dict(backward=True, d=768)),  # metric dim chunked
        (pyra_backward, dict(size=False, gsize=False)), (pyra_backward, dict(distill=True)),
        (pyra_backward, dict(r=1)), (pyra_backward, dict(pdt=None)), (pyra_backward, dict(n=50, c=100, r=5)),
        (attention, dict(size=False)), (attention, dict(pad_value=False)), (attention, dict(hd=40, heads=3)),
        (attention, dict(sdt=None)),
        (masked_grad, dict(transposed=True)), (masked_grad, dict(m=1, k=1)),
        (xpeft, dict(residual=False)), (xpeft, dict(r=1)), (xpeft, dict(r=64)), (xpeft, dict(d=100, n=50, r=5)),
        (xpeft, dict(wdt=F32)),
        (pyra_rows, dict(size=False, gsize=False)), (pyra_rows, dict(threshold=0.5)), (pyra_rows, dict(r=1)),
        (pyra_rows, dict(pdt=None)), (pyra_rows, dict(n=50, c=100, r=5)),
    ]
    # --quick: the same constexpr values and int classes, several per launch (each value at least once)
    combined = [
        (tome, dict(size=False, cls=False, r=13, d=40)), (tome, dict(distill=True, r=1, d=128, mdt=F32)),
        (tome, dict(n=256, c=512, sdt=None)), (tome, dict(pyra=True, size=False, distill=True, r=1)),
        (tome, dict(pyra=True, pdt=None, c=100, d=40, n=50, r=5)),
        (match_rows, dict(size=False, cls=False, r=None, thr=0.5, d=40)), (match_rows, dict(distill=True, r=1, d=768)),
        (match_rows, dict(thr=-1.0, n=50, sdt=None)),
        (reduce, dict(op="merge_wavg", size=False, c=100, n=50, n_out=33)), (reduce, dict(op="merge_wavg", sdt=None)),
        (reduce, dict(op="merge_sum", c=24)), (reduce, dict(op="merge_wavg", c=1)),
        (reduce, dict(op="merge_wavg_backward", size=False)), (reduce, dict(op="unmerge", c=100, n=50, n_out=33)),
        (fpet, dict(size=False, prefix=0, d=40)), (fpet, dict(prefix=2, d=128, mdt=F32)),
        (fpet, dict(h=7, w=9, c=100, sdt=None)), (fpet, dict(backward=True, size=False, gsize=False, prefix=0, d=40)),
        (fpet, dict(backward=True, d=128, mdt=F32)), (fpet, dict(backward=True, h=7, w=9, c=100, gdt=F32)),
        (tome, dict(d=768)), (fpet, dict(d=768, mdt=F32)), (fpet, dict(backward=True, d=768)),
        (fpet, dict(padded=True, h=1, w=127, c=384, d=32)), (fpet, dict(padded=True, size=False, d=40)),
        (fpet, dict(padded=True, backward=True, h=1, w=127, c=384, d=32, gdt=F32)),
        (pyra_backward, dict(size=False, gsize=False, distill=True)), (pyra_backward, dict(r=1, pdt=None)),
        (pyra_backward, dict(n=50, c=100, r=5)),
        (attention, dict(size=False)), (attention, dict(pad_value=False, hd=40, heads=3, sdt=None)),
        (masked_grad, dict(transposed=True)), (masked_grad, dict(m=1, k=1)),
        (xpeft, dict(residual=False, r=1)), (xpeft, dict(r=64, wdt=F32)), (xpeft, dict(d=100, n=50, r=5)),
        (pyra_rows, dict(size=False, gsize=False, threshold=0.5, r=1)), (pyra_rows, dict(n=50, c=100, r=5, pdt=None)),
    ]
    out = []
    for fn, kw in base:
        for dt in DTYPES:
            out.append((fn, dict(dt=dt, **kw)))
    for fn, kw in (combined if quick else variants):
        for dt in ((F16,) if quick else DTYPES):
            kw2 = dict(dt=dt, **kw)
            for k in ("sdt", "pdt"):  # None: the same dtype as x
                if k in kw2 and kw2[k] is None:
                    kw2[k] = dt
            out.append((fn, kw2))
    return [(_name(fn, kw), fn, kw) for fn, kw in out]


# ----------------------------------------------------------------------------- compiling
def _resources(cubin: bytes) -> dict:
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    vals = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
    return {k.lower(): int(v) for k, v in vals.items()}


def compile_one(rec: dict) -> dict:
    src = ASTSource(fn=rec["fn"], signature=rec["signature"], constexprs=rec["constexprs"], attrs=rec["attrs"])
    t0 = time.time()
    k = triton.compile(src, target=TARGET, options=rec["options"].__dict__)
    res = _resources(k.asm["cubin"])
    return dict(regs=res.get("reg"), stack=res.get("stack"), local=res.get("local"), smem=k.metadata.shared,
                seconds=round(time.time() - t0, 1))


_RECS: list = []  # the launches to compile, shared with the forked compiling processes


def _compile_index(i: int) -> dict:
    try:
        return compile_one(_RECS[i])
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return dict(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}")


def compile_all(jobs: int):
    """Yields (index, result) in order; ``jobs`` > 1: in that many forked processes."""
    if jobs <= 1 or len(_RECS) <= 1:
        yield from ((i, _compile_index(i)) for i in range(len(_RECS)))
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from enumerate(pool.imap(_compile_index, range(len(_RECS))))


def describe(rec: dict) -> str:
    """The variant: pointer element types (h fp16, b bf16, f fp32, l i64, i i32), constexprs, the int
    arguments that are constant (== 1) or multiples of 16."""
    names = [p.name for p in rec["fn"].params]
    parts = []
    for path, val in sorted(rec["constexprs"].items()):
        name = names[path[0]]
        if rec["fn"].params[path[0]].is_constexpr:
            if val is None:  # an absent constexpr function (ToMe's PYRA_WEIGHTS)
                continue
            val = getattr(val, "__name__", val)  # a constexpr function (PYRA's modulation phase) by its name
            parts.append((name if val else f"!{name}") if isinstance(val, bool) else f"{name}={val}")
        else:  # an int argument specialised to a constant (== 1)
            parts.append(f"{name}=={val}")
    ptrs = "".join(_SHORT.get(t[1:], "?") for t in rec["signature"].values() if isinstance(t, str)
                   and t.startswith("*"))
    div = [names[p[0]] for p, v in sorted(rec["attrs"].items()) if v and rec["signature"][names[p[0]]][:1] != "*"]
    return " ".join([ptrs] + parts + (["%16:" + ",".join(div)] if div else []))


_SHORT = {"fp16": "h", "bf16": "b", "fp32": "f", "i64": "l", "i32": "i"}  # pointer element types, in order


def main() -> int:
    args = ARGS or _parse_args([])
    t_start = time.time()
    version = triton.__version__
    print(f"triton {version} ({os.path.dirname(triton.__file__)}), torch {torch.__version__}, target {TARGET}")
    kernels = launched_kernels()
    failures = []
    rec = Recorder()
    with rec:
        for name, fn, kw in scenarios(args.quick):
            if args.only and not re.search(args.only, name):
                continue
            rec.scenario = name
            try:
                fn(**kw)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, then exit 1
                failures.append(f"scenario {name}: {type(exc).__name__}: {exc}")
    seen = {r["name"] for r in rec.launches.values()}
    if not args.only:
        for mod, ks in kernels.items():
            for k in ks:
                if k not in seen:
                    failures.append(f"kernel {mod}.{k} is launched by no scenario of bench/aot_check.py")
    found = sorted(k for ks in kernels.values() for k in ks)
    print(f"{len(found)} kernels found at launch sites: {', '.join(found)}")
    recs = sorted(rec.launches.values(), key=lambda r: (r["module"], r["name"], describe(r)))
    if args.list:
        for r in recs:
            print(f"launch {r['name']} w{r['options'].num_warps} [{describe(r)}] from {r['scenarios'][0]}")
        for msg in failures:
            print("FAIL", msg)
        print(f"{len(recs)} distinct launches, {len(failures)} failures, {time.time() - t_start:.0f} s")
        return 1 if failures else 0
    rows = []
    print(f"{len(recs)} distinct launches of {len(seen)} kernels; compiling in {args.jobs} process(es)", flush=True)
    _RECS[:] = recs
    for i, res in compile_all(args.jobs):
        r = recs[i]
        row = dict(kernel=r["name"], module=r["module"], variant=describe(r), warps=r["options"].num_warps,
                   stages=r["options"].num_stages, scenario=r["scenarios"][0], **res)
        if "error" in row:
            row["status"] = "FAIL"
            failures.append(f"{r['name']} [{row['variant']}] (from {row['scenario']}): {row['error']}")
        else:
            row["status"] = "ok" if row["smem"] <= SMEM_LIMIT else "SMEM"
            if row["status"] != "ok":
                failures.append(f"{r['name']} [{row['variant']}]: {row['smem']} B of shared memory > {SMEM_LIMIT}"
                                f" (from {row['scenario']})")
        rows.append(row)
        print(f"{row['status']:4s} {row['kernel']:26s} w{row['warps']} regs={row.get('regs')} "
              f"stack={row.get('stack')} smem={row.get('smem')} {row.get('seconds', '')}s  [{row['variant']}]",
              flush=True)
    table = [f"Triton {version}, sm_90 (`GPUTarget(\"cuda\", 90, 32)`), launch specialisation; "
             f"{len(rows)} distinct launches, {'quick' if args.quick else 'full'} scenario set.", "",
             "| kernel | variant | warps | regs | stack B (spills) | smem B | compile s | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        table.append(f"| {row['kernel']} | {row['variant']} | {row['warps']} | {row.get('regs', '')} | "
                     f"{row.get('stack', '')} | {row.get('smem', '')} | {row.get('seconds', '')} | {row['status']} |")
    summary = {}
    for row in rows:
        s = summary.setdefault(row["kernel"], dict(n=0, regs=0, stack=0, smem=0, fail=0))
        s["n"] += 1
        s["fail"] += row["status"] != "ok"
        for k in ("regs", "stack", "smem"):
            s[k] = max(s[k], row.get(k) or 0)
    table += ["", "Per kernel (maximum over its variants):", "",
              "| kernel | variants | max regs | max stack B | max smem B | failed |", "|---|---:|---:|---:|---:|---:|"]
    for k, s in sorted(summary.items()):
        table.append(f"| {k} | {s['n']} | {s['regs']} | {s['stack']} | {s['smem']} | {s['fail']} |")
    print("\n".join(table))
    if not args.no_write and not args.only:
        out = args.out or os.path.join(ROOT, "bench", "results", f"aot_sm90_triton{version}"
                                       + ("_quick" if args.quick else "") + ".md")
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(table) + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(dict(triton=version, rows=rows, failures=failures), f, indent=1)
        print(f"wrote {out}")
    for msg in failures:
        print("FAIL", msg)
    print(f"{len(rows)} launches compiled, {len(failures)} failures, {time.time() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
