"""Shapes, inputs and providers shared by the microbenchmarks (bench_ops.py), the table (run_table.py),
the recorded dispatch results (record_dispatch.py) and the launch count (profile_launches.py).

A provider is a zero-argument callable made for one (op, mode, B, dtype):
  "reference"          the project's pure-PyTorch reference (``fk.reference.*``), eager;
  "reference+compile"  the same reference under ``torch.compile`` (mode default, fullgraph when it works);
  "cpu"/"cuda"/"triton" the fused ops (``fk.<op>(..., backend=...)``);
  "floor"              a device-to-device copy moving the op's minimum memory traffic (``bytes_moved``).
"""
import csv
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fpet_kernels as fk  # noqa: E402
from fpet_kernels.ops import sparse, xpeft  # noqa: E402

# ViT-B/16 at 224: 196 patches + class token, C = 768, metric = keys averaged over heads (D = 64).
N, C, D, R = 197, 768, 64, 16
FPET_OUT = 99  # FPET keeps the class token and the 98 B cells of the 14 x 14 checkerboard
BATCHES = (1, 8, 64)  # CPU default
GPU_BATCHES = (1, 64, 256)
# X-PEFT's mixed-profile adapter at one ViT-B/16 site: rank 16 (pet.apply's default), 8 profiles, row b
# with profile b % 8. PaFi's masked weight gradient of ViT-B/16's fc1 (W [3072, 768]) at density 0.5%
# (pet.apply's default), M = B * N tokens.
XPEFT_RANK, XPEFT_PROFILES, XPEFT_SCALE = 16, 8, 0.1
PAFI_OUT, PAFI_IN, PAFI_DENSITY = 3072, 768, 0.005
PAFI_K = round(PAFI_DENSITY * PAFI_OUT * PAFI_IN)
OPS = ("tome_merge", "fpet_merge")  # the CPU table and the CPU microbenchmarks
# Every public op with compiled kernels, from the op records (``fpet_kernels.ops.library.OPS``), in
# registration order.
ALL_OPS = tuple(fk.ops._backend.op_kernels())
MODES = ("forward", "forward+backward")
# Ops without a forward+backward case: the matching has no gradient; the masked weight gradient is
# itself a backward (PaFi's), its own gradient is never taken in training.
FORWARD_ONLY = ("tome_match", "tome_match_rows", "masked_weight_grad")
# What the GPU table times by default (the Triton issue's list, then the PET ops): (op, mode)
GPU_CASES = (("tome_merge", "forward"), ("fpet_merge", "forward"), ("fpet_merge", "forward+backward"),
             ("pyra_merge", "forward"), ("unmerge", "forward"), ("xpeft_adapter", "forward"),
             ("xpeft_adapter", "forward+backward"), ("masked_weight_grad", "forward"))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_DTYPES = ("float16", "bfloat16")
GPU_BACKENDS = ("triton", "cuda")
FUSED = ("cpu",) + GPU_BACKENDS
EXTRA_PROVIDERS = ("reference+compile", "floor")
ALL_PROVIDERS = ("reference",) + EXTRA_PROVIDERS + FUSED

# ../shared/anchors.md, CPU (2 cores, float32, torch 2.14.1): the published reference implementations.
CPU_ANCHORS_MS = {
    ("tome_merge", "forward"): {1: 0.27, 8: 8.9, 64: 63.8},
    ("fpet_merge", "forward"): {1: 0.46, 8: 4.8, 64: 42.3},
}
# The Triton issue's targets for the fused kernels, H100, float16, median of do_bench (ms).
GPU_TARGETS_MS = {
    ("tome_merge", "forward"): {1: 0.020, 256: 0.065},
    ("fpet_merge", "forward"): {256: 0.060},
    ("fpet_merge", "forward+backward"): {1: 0.10, 256: 0.30},
}
BF16_VS_F16 = 1.10  # and: bfloat16 within 10% of float16 (same op, mode, B, provider)
# What bench/record_dispatch.py measures for the automatic backend choice (fpet_kernels/tuning/):
# every public op that resolves a backend, the modes a model uses (inference and training).
DISPATCH_CASES = (("tome_match", "forward"), ("tome_match_rows", "forward"), ("tome_merge", "forward"), ("tome_merge", "forward+backward"),
                  ("merge_wavg", "forward"), ("merge_wavg", "forward+backward"), ("unmerge", "forward"),
                  ("unmerge", "forward+backward"), ("fpet_merge", "forward"), ("fpet_merge", "forward+backward"),
                  ("pyra_merge", "forward"), ("pyra_merge", "forward+backward"), ("pyra_merge_rows", "forward"),
                  ("pyra_merge_rows", "forward+backward"), ("fpet_merge_rows", "forward"),
                  ("fpet_merge_rows", "forward+backward"), ("xpeft_adapter", "forward"),
                  ("xpeft_adapter", "forward+backward"), ("masked_weight_grad", "forward"))


def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi), or "-" where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "-"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "-"


def versions(device: str = "cuda") -> dict:
    """What a table's numbers depend on: GPU name, torch, Triton, CUDA (torch's build), driver."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "-"
    on_gpu = device == "cuda" and torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name() if on_gpu else "none (CPU)", "torch": torch.__version__,
            "triton": tv, "cuda": torch.version.cuda or "-", "driver": driver_version() if on_gpu else "-"}


def versions_line(device: str = "cuda") -> str:
    """One line printed beside every table: ``# GPU ... | torch ... | Triton ... | CUDA ... | driver ...``."""
    v = versions(device)
    return (f"# GPU {v['gpu']} | torch {v['torch']} | Triton {v['triton']} | CUDA {v['cuda']} | "
            f"driver {v['driver']}")


def make_inputs(batch: int, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, C, generator=g).to(device, dtype).requires_grad_(requires_grad)
    metric = torch.randn(batch, N, D, generator=g).to(device, dtype).requires_grad_(requires_grad)
    return x, metric


def fused_providers(device: str = "cpu") -> list:
    """The live fused backends that run on ``device`` tensors ("cpu" on CPU; "triton", "cuda" on CUDA)."""
    live = fk.backends()["live"]
    return [b for b in FUSED if live.get(b, False) and (b == "cpu") == (device == "cpu")]


def providers(device: str = "cpu") -> list:
    """Reference + the live fused backends for ``device`` (the CPU table's providers)."""
    return ["reference"] + fused_providers(device)


def table_providers(device: str = "cpu") -> list:
    """Default providers of run_table.py: CPU as before; CUDA adds the compiled reference and the floor."""
    if device == "cpu":
        return providers(device)
    return ["reference", "reference+compile"] + fused_providers(device) + ["floor"]


def is_live(provider: str, device: str, op: str = None) -> bool:
    """Whether ``provider`` runs on ``device`` (and, given ``op``, has kernels for that op: the CUDA
    kernels arrive op by op)."""
    if provider in ("reference",) + EXTRA_PROVIDERS:
        return True
    return provider in fused_providers(device) and (op is None or fk.ops._backend.op_live(op, provider))


# ----------------------------------------------------------------------------- op inputs and calls
def _randn(shape, device, dtype, seed, scale=1.0):
    """Normal draws made on ``device`` (the PaFi gradients are hundreds of MB at B = 256)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, device=device, dtype=torch.float32)).to(dtype)


def pafi_positions(device="cpu", seed=0):
    """(rows, cols): PAFI_K distinct positions of W [PAFI_OUT, PAFI_IN], ascending flat index (as
    pet.pafi_indices returns them), drawn uniformly."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(PAFI_OUT * PAFI_IN, generator=g)[:PAFI_K].sort().values
    return (flat // PAFI_IN).to(device), (flat % PAFI_IN).to(device)


def padded_size(batch: int, device="cpu"):
    """The sizes of a right-padded batch (the per-row ops' cases): image b keeps N - 8 * (b % 4) tokens,
    size 0 after them."""
    size = torch.ones(batch, N, 1, device=device)
    for b in range(batch):
        size[b, N - 8 * (b % 4):] = 0
    return size


def make_args(op: str, batch: int, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    """(positional arguments of the op, the tensors a backward differentiates)."""
    if op == "xpeft_adapter":
        x = _randn((batch, N, C), device, dtype, seed).requires_grad_(requires_grad)
        profile = (torch.arange(batch) % XPEFT_PROFILES).to(device)
        p, r = XPEFT_PROFILES, XPEFT_RANK
        w = [_randn((p, C, r), device, dtype, seed + 1, C ** -0.5), _randn((p, r), device, dtype, seed + 2, 0.1),
             _randn((p, r, C), device, dtype, seed + 3, r ** -0.5), _randn((p, C), device, dtype, seed + 4, 0.1)]
        w = [t.requires_grad_(requires_grad) for t in w]
        return (x, profile, *w), [x] + w
    if op == "masked_weight_grad":
        grad_out = _randn((batch * N, PAFI_OUT), device, dtype, seed).requires_grad_(requires_grad)
        inp = _randn((batch * N, PAFI_IN), device, dtype, seed + 1).requires_grad_(requires_grad)
        return (grad_out, inp, *pafi_positions(device, seed)), [grad_out, inp]
    x, metric = make_inputs(batch, device, dtype, requires_grad=requires_grad, seed=seed)
    if op == "tome_merge":
        return (x, metric), [x]
    if op == "fpet_merge":
        return (x, metric), [x, metric]
    if op == "fpet_merge_rows":  # FPET on a padded batch of sequences: the grid (1, N - 1)
        return (x, metric, padded_size(batch, device)), [x, metric]
    if op in ("pyra_merge", "pyra_merge_rows"):
        metric.requires_grad_(False)
        g = torch.Generator().manual_seed(seed + 1)
        params = [0.5 * torch.randn(R, 1, generator=g), 0.5 * torch.randn(1, C, generator=g),  # a, b nonzero
                  1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)]  # LayerNorm
        params = [p.to(device, dtype).requires_grad_(requires_grad) for p in params]
        if op == "pyra_merge_rows":  # on a padded batch
            return (x, metric, padded_size(batch, device), *params), [x] + params
        return (x, metric, *params), [x] + params
    if op == "unmerge":
        with torch.no_grad():
            y, _, matching = fk.reference.tome_merge(x.detach(), metric.detach(), R, class_token=True)
        y = y.contiguous().requires_grad_(requires_grad)
        return (y, matching), [y]
    if op == "tome_match":
        return (metric.detach(),), []
    if op == "tome_match_rows":  # a padded batch
        return (metric.detach(), padded_size(batch, device)), []
    if op == "merge_wavg":
        matching = fk.tome_match(metric.detach(), R, class_token=True, backend="reference")
        return (x, matching), [x]
    raise ValueError(f"unknown op {op!r}")


# The reference of each op as a module-level function of tensors (a stable target for torch.compile).
# Every function returns all the outputs of the public call, so the compiler cannot drop any of them.
def _ref_tome(x, metric):
    return fk.reference.tome_merge(x, metric, R, class_token=True)


def _ref_fpet(x, metric):
    return fk.reference.fpet_merge(x, metric, class_token=True)


def _ref_pyra(x, metric, a, b, ln_weight, ln_bias):
    return fk.reference.pyra_merge(x, metric, R, a, b, ln_weight, ln_bias, class_token=True)


def _ref_fpet_rows(x, metric, size):
    return fk.fpet_merge(x, metric, size, class_token=True, grid=(1, N - 1), backend="reference", padded=True)


def _ref_pyra_rows(x, metric, size, a, b, ln_weight, ln_bias):
    return fk.pyra_merge(x, metric, R, a, b, ln_weight, ln_bias, size, class_token=True, backend="reference",
                         padded=True)


def _ref_unmerge(y, matching):
    return fk.reference.unmerge(y, matching.token_map)


def _ref_match(metric):
    return fk.reference.tome_match(metric, R, True)


def _ref_match_rows(metric, size):
    return fk.tome_match(metric, R, True, backend="reference", size=size, padded=True)


def _ref_wavg(x, matching):
    return fk.reference.merge_wavg_reference(x, None, matching.token_map, N - R)


def _ref_xpeft(x, profile, down, down_bias, up, up_bias):
    return xpeft.xpeft_adapter_reference(x, profile, down, down_bias, up, up_bias, XPEFT_SCALE)


def _ref_masked(grad_out, inp, rows, cols):
    return sparse.masked_weight_grad_reference(grad_out, inp, rows, cols)


REFERENCE_FNS = {"tome_merge": _ref_tome, "fpet_merge": _ref_fpet, "pyra_merge": _ref_pyra, "unmerge": _ref_unmerge,
                 "tome_match": _ref_match, "tome_match_rows": _ref_match_rows, "merge_wavg": _ref_wavg, "xpeft_adapter": _ref_xpeft,
                 "masked_weight_grad": _ref_masked, "fpet_merge_rows": _ref_fpet_rows, "pyra_merge_rows": _ref_pyra_rows}


def fused_fn(op: str, backend: str):
    if op == "tome_merge":
        return lambda x, metric: fk.tome_merge(x, metric, R, class_token=True, backend=backend)
    if op == "fpet_merge":
        return lambda x, metric: fk.fpet_merge(x, metric, class_token=True, backend=backend)
    if op == "pyra_merge":
        return lambda x, metric, a, b, w, bias: fk.pyra_merge(x, metric, R, a, b, w, bias, class_token=True,
                                                              backend=backend)
    if op == "fpet_merge_rows":  # the public call of a padded batch dispatches fpet_merge_rows
        return lambda x, metric, size: fk.fpet_merge(x, metric, size, class_token=True, grid=(1, N - 1),
                                                     backend=backend, padded=True)
    if op == "pyra_merge_rows":  # tome_match_rows, then pyra_merge_rows
        return lambda x, metric, size, a, b, w, bias: fk.pyra_merge(x, metric, R, a, b, w, bias, size, class_token=True,
                                                                    backend=backend, padded=True)
    if op == "unmerge":
        return lambda y, matching: fk.unmerge(y, matching, backend=backend)
    if op == "tome_match":
        return lambda metric: fk.tome_match(metric, R, class_token=True, backend=backend)
    if op == "tome_match_rows":  # the per-row matching of a padded batch
        return lambda metric, size: fk.tome_match(metric, R, class_token=True, backend=backend, size=size, padded=True)
    if op == "merge_wavg":  # ToMe's closure API: merge_wavg recognises the merge and runs the fused op
        return lambda x, matching: fk.merge_wavg(fk.ToMeMerge(matching, False, backend), x)
    if op == "xpeft_adapter":
        return lambda x, profile, *w: xpeft.xpeft_adapter(x, profile, *w, scale=XPEFT_SCALE, backend=backend)
    if op == "masked_weight_grad":
        return lambda grad_out, inp, rows, cols: sparse.masked_weight_grad(grad_out, inp, rows, cols, backend=backend)
    raise ValueError(f"unknown op {op!r}")


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _closure(fn, args, grad_inputs, backward: bool):
    def fwd():
        return _first(fn(*args))

    if not backward:
        def call():
            with torch.no_grad():
                return fwd()
        return call
    grad = torch.randn_like(fwd().detach())

    def call_bwd():
        return torch.autograd.grad(fwd(), grad_inputs, grad)
    return call_bwd


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _short(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


class CompileFailed(RuntimeError):
    pass


def _compiled_call(fn, args, grad_inputs, backward: bool, device):
    """torch.compile(fn): fullgraph=True first, then with graph breaks allowed. The first call (the
    compilation, forward and backward) runs here, so a failure surfaces here; ``call.note`` says
    which variant ran and ``call.compile_s`` how long compiling took. Dynamo's caches are reset
    first: one compiled variant is alive at a time (no recompile limit, no stale guards)."""
    errors = []
    for fullgraph in (True, False):
        torch._dynamo.reset()
        cfn = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
        t0 = time.perf_counter()
        try:
            call = _closure(cfn, args, grad_inputs, backward)
            call()
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a note in the table
            errors.append(f"fullgraph={fullgraph}: {_short(exc)}")
            continue
        call.compile_s = time.perf_counter() - t0
        call.note = (f"compiled in {call.compile_s:.1f} s" if fullgraph else
                     f"graph breaks (fullgraph failed: {errors[0]}); compiled in {call.compile_s:.1f} s")
        return call
    torch._dynamo.reset()
    raise CompileFailed("torch.compile failed: " + " | ".join(errors))


def make_call(op: str, provider: str, mode: str, batch: int, device="cpu", dtype=torch.float32):
    """A closure running one op once (and its backward for mode "forward+backward"). It carries
    ``.note`` (a remark for the table, "" when none) and ``.min_bytes`` (``bytes_moved``)."""
    backward = mode == "forward+backward"
    nbytes = bytes_moved(op, batch, dtype, mode)
    if provider == "floor":
        call = make_copy_call(nbytes, device)
        call.note = f"copy of {nbytes / 2 ** 20:.1f} MiB read + write"
    else:
        args, grad_inputs = make_args(op, batch, device, dtype, requires_grad=backward)
        if provider in ("reference", "reference+compile"):
            fn = REFERENCE_FNS[op]
        else:
            fn = fused_fn(op, provider)
        if provider == "reference+compile":
            call = _compiled_call(fn, args, grad_inputs, backward, device)
        else:
            call = _closure(fn, args, grad_inputs, backward)
            call.note = ""
    call.min_bytes = nbytes
    return call


# ----------------------------------------------------------------------------- memory traffic
def bytes_moved(op: str, batch: int, dtype=torch.float32, mode: str = "forward") -> int:
    """The minimum memory traffic of one call (each tensor read or written once; sizes float32).

    forward:  merges read x and metric (PYRA also a, b and the LayerNorm) and write the merged
              tokens and their sizes; unmerge reads y and the int64 token map and writes N tokens.
    backward: read the output gradient and write the gradient of each differentiated input
              (a lower bound: the kernels may re-read x or the metric).
    tome_match reads the metric and writes the int64 indices and token map; merge_wavg reads x and the
    token map and writes the merged tokens and their sizes.
    xpeft_adapter reads x and the P profiles' weights and writes the output; its backward reads the
    output gradient and writes the gradients of x and the weights. masked_weight_grad reads
    grad_out [M, 3072] and input [M, 768] (at density 0.5% nearly every row and column of W holds a
    position) and the int64 positions and writes K values.
    The calls here pass no ``size``: a call with sizes would also read ``B * N * 4`` bytes (< 0.2%).
    """
    e = torch.finfo(dtype).bits // 8
    if op == "xpeft_adapter":
        weights = XPEFT_PROFILES * (2 * C * XPEFT_RANK + XPEFT_RANK + C) * e
        fwd = batch * 2 * N * C * e + weights
        return fwd + (fwd if mode == "forward+backward" else 0)
    if op == "masked_weight_grad":
        fwd = batch * N * (PAFI_OUT + PAFI_IN) * e + PAFI_K * (16 + e)
        bwd = PAFI_K * (16 + e) + batch * N * (PAFI_OUT + PAFI_IN) * e * 2  # read K values, write both grads
        return fwd + (bwd if mode == "forward+backward" else 0)
    tok = C * e
    params = (R + C + 2 * C) * e  # PYRA a [r, 1], b [1, C], LayerNorm weight and bias [C]
    if op == "tome_match":
        na = (N + 1) // 2
        return batch * (N * D * e + (2 * R + (na - R) + N) * 8)  # no backward
    if op == "tome_match_rows":  # also reads the sizes, writes unm_idx [B, Na] and kept [B]
        na = (N + 1) // 2
        return batch * (N * D * e + N * 4 + (2 * R + na + N + 1) * 8)
    if op == "merge_wavg":
        fwd = batch * (N * tok + N * 8 + (N - R) * tok + (N - R) * 4)
        bwd = batch * ((N - R) * tok + N * 8 + N * tok)
    elif op == "unmerge":
        fwd = batch * ((N - R) * tok + N * 8 + N * tok)
        bwd = batch * (N * tok + N * 8 + (N - R) * tok)
    else:
        fpet, pyra = op in ("fpet_merge", "fpet_merge_rows"), op in ("pyra_merge", "pyra_merge_rows")
        n_out = FPET_OUT if fpet else N - R  # (1, N - 1) is 99 outputs too
        fwd = batch * (N * tok + N * D * e + n_out * tok + n_out * 4) + (params if pyra else 0)
        bwd = batch * (n_out * tok + N * tok)
        if fpet:
            bwd += batch * N * D * e
        elif pyra:
            bwd += params
        if op.endswith("_rows"):  # the sizes (and PYRA's matching: its indices and map, written then read)
            fwd += batch * N * 4 + (batch * (2 * R + N) * 8 * 2 if pyra else 0)
    return fwd + (bwd if mode == "forward+backward" else 0)


def make_copy_call(nbytes: int, device="cpu"):
    """A device-to-device copy whose read + write traffic is ``nbytes``."""
    n = max(1, nbytes // 2)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def call():
        return dst.copy_(src)
    return call


def append_csv(path: str, rows: list, fields: list) -> None:
    """Append ``rows``; a file with an older header is first rewritten with the added columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = None
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header and any(k not in header for k in fields):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        header = header + [k for k in fields if k not in header]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or fields, restval="", extrasaction="ignore")
        if not header:
            w.writeheader()
        w.writerows(rows)
