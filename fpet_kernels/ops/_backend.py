"""Which kernels are live, and which one an op call uses.

Backends:
  "reference"  the pure-PyTorch implementation of the spec (any device, any float dtype);
  "cpu"        the C++ kernels of the extension ``fpet_kernels._C`` on CPU tensors (OpenMP);
  "cuda"       the CUDA C++ kernels of the extension on CUDA tensors;
  "triton"     the Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

The choice per call: the op's ``backend=`` argument, else the environment variable
``FPET_BACKEND``, else "auto". An explicitly requested backend that cannot run the call raises;
the automatic choice takes the fastest live backend for the tensors' device and falls back to
the reference (saying so once) when no kernel is live.

The automatic choice per op:
  CPU tensors   "cpu" (the only compiled CPU backend; Triton on CPU is the interpreter, for tests);
  CUDA tensors  the fastest of the live GPU backends ("cuda", "triton") *for that op*, from the
                benchmark results recorded in the package (``fpet_kernels/tuning/*.json``, written
                by ``bench/record_dispatch.py`` on a GPU): the file recorded on a GPU of the same
                name, else of the same compute capability; the ranking is the geometric mean of
                the medians over the (mode, dtype, batch) cells every live candidate has. Without
                recorded results for this GPU: the default order ``DEFAULT_GPU_ORDER`` (cuda, then
                triton). ``backends()["auto_source"]`` says which of the two decided.
"cuda" is live for an op on a device when the extension registers CUDA kernels for the op's forward
and backward (``OP_KERNELS``) and holds code that device can run (``cuda_image``): a build without
code for the GPU's architecture makes the automatic choice fall back to Triton, saying so once, and
an explicit ``backend="cuda"`` raise. Nothing here runs at import: the extension is loaded by
``fpet_kernels.ops`` once the schemas exist, and CUDA and Triton are probed at their first use.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "FPET_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_BACKENDS = ("cuda", "triton")
# The automatic choice on CUDA tensors when no results were recorded on this GPU: the CUDA C++
# kernels first (no JIT compilation, smallest launch overhead), then Triton.
DEFAULT_GPU_ORDER = ("cuda", "triton")
# The public ops that resolve a backend, and the registered ops (``torch.ops.fpet.*``) each needs:
# its forward first, then those its autograd calls with the same kernel family.
OP_KERNELS = {
    "tome_match": ("tome_match",),
    "tome_merge": ("tome_merge", "merge_wavg_backward"),
    "merge_wavg": ("merge_wavg", "merge_wavg_backward"),
    "unmerge": ("unmerge", "merge_sum"),
    "fpet_merge": ("fpet_merge", "fpet_merge_backward"),
    "pyra_merge": ("pyra_merge", "pyra_merge_backward"),
    "xpeft_adapter": ("xpeft_adapter",),  # its backward is PyTorch on every backend; no CUDA C++ kernel
    "masked_weight_grad": ("masked_weight_grad",),  # PaFi's sparse weight gradient; no CUDA C++ kernel
}
RAW_KERNELS = ("tome_match", "tome_merge", "merge_wavg", "merge_wavg_backward", "unmerge", "merge_sum",
               "fpet_merge", "fpet_merge_backward", "pyra_merge", "pyra_merge_backward", "xpeft_adapter",
               "masked_weight_grad")
# Recorded benchmark results (see the module docstring and fpet_kernels/tuning/README.md).
TUNING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tuning")
RESULTS_FORMAT = 1


# ----------------------------------------------------------------------------- the extension
_EXT = None
_EXT_ERROR: str | None = "fpet_kernels._C was not loaded yet"


def load_extension() -> None:
    """Load ``fpet_kernels._C``: its C++ kernels register as the CPU/CUDA implementations of the ops
    ``torch.ops.fpet.*``. Called once by ``fpet_kernels.ops`` after every op family defined its
    schemas. The extension is optional: without it the package runs the Triton and reference paths."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return
    from .._version import check_extension_torch
    try:
        _EXT = importlib.import_module("fpet_kernels._C")
        _EXT_ERROR = None
    except ImportError as exc:  # pragma: no cover - depends on the install
        other_torch = check_extension_torch()  # a build for another torch fails to load: say so
        if other_torch:
            _EXT_ERROR = other_torch
            warnings.warn(other_torch, RuntimeWarning, stacklevel=2)
        elif isinstance(exc, ModuleNotFoundError):
            _EXT_ERROR = "fpet_kernels._C is not built (pip install --no-build-isolation -e .)"
        else:
            _EXT_ERROR = f"{type(exc).__name__}: {exc}"
        return
    built = getattr(_EXT, "TORCH_VERSION", None)  # compiled into _C: known even without _build_info.py
    running = torch.__version__.split("+")[0]
    msg = check_extension_torch() or (
        f"fpet_kernels._C was compiled against torch {built} but torch {running} is loaded; rebuild it "
        "(pip install --no-build-isolation --no-deps --force-reinstall .)" if built and built != running else None)
    if msg:  # pragma: no cover - depends on the install
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def extension_loaded() -> bool:
    return _EXT is not None


def _has_kernel(op: str, key: str) -> bool:
    if _EXT is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{op}", key))
    except RuntimeError:
        return False


_CUDA_KERNELS: dict | None = None


def _cuda_kernels() -> dict:
    """Registered ops with a CUDA kernel compiled into the extension (whether or not a GPU is present)."""
    global _CUDA_KERNELS
    if _CUDA_KERNELS is None:
        _CUDA_KERNELS = {k: _has_kernel(k, "CUDA") for k in RAW_KERNELS}
    return _CUDA_KERNELS


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (which imports Triton)
    when the package is imported: the mark it sets, read by dynamo when it traces a call of ``fn``."""
    fn._dynamo_marked_constant = True
    return fn


_LIVE: dict = {}


def _probe(name: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return _has_kernel("tome_merge", "CPU")
    if name == "cuda":
        return _has_kernel("tome_merge", "CUDA") and torch.cuda.is_available()
    # Triton: importable, and a GPU present or its CPU interpreter on (imported only when asked).
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# Constant for the process; probed at its first use (importing the package initialises neither CUDA
# nor Triton) and evaluated eagerly, never traced, by torch.compile.
@_constant_result
def _is_live(name: str) -> bool:
    got = _LIVE.get(name)
    if got is None:
        got = _LIVE[name] = _probe(name)
    return got


def live() -> dict:
    """Which backends can run here (the device being present for GPU backends)."""
    return {name: _is_live(name) for name in BACKENDS}


_CUDA_IMAGE: dict = {}


def cuda_image(index: int) -> int:
    """The binary version of the extension's CUDA code that CUDA device ``index`` runs (e.g. 90), or
    -1 when the build holds no code for that device's architecture (then ``cuda`` is not live there)."""
    got = _CUDA_IMAGE.get(index)
    if got is None:
        fn = getattr(_EXT, "cuda_image_version", None)
        got = _CUDA_IMAGE[index] = int(fn(index)) if fn is not None and _is_live("cuda") else -1
    return got


def op_live(op: str | None, name: str, index: int | None = None) -> bool:
    """Whether backend ``name`` can run public op ``op`` with its backward (``op=None``: any op), on
    CUDA device ``index`` for ``cuda`` when given."""
    if not _is_live(name):
        return False
    if name != "cuda":
        return True
    if index is not None and cuda_image(index) < 0:
        return False
    if op is None:
        return True
    return all(_cuda_kernels().get(k, False) for k in OP_KERNELS.get(op, ()))


# ----------------------------------------------------------------------------- recorded results
def load_results(directory: str | None = None) -> list[dict]:
    """The recorded results files of ``directory`` (default ``TUNING_DIR``) that are well formed;
    a malformed file is skipped with a warning (it must never break an op call)."""
    directory = TUNING_DIR if directory is None else directory
    out = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    except OSError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                data = json.load(f)
            check_results(data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"fpet_kernels: ignoring recorded results {path}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        data["_file"] = name
        out.append(data)
    return out


def check_results(data) -> None:
    """Raise ValueError unless ``data`` is a recorded-results document of format ``RESULTS_FORMAT``."""
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"not a format-{RESULTS_FORMAT} results file")
    for key in ("gpu", "capability", "torch", "date", "results"):
        if key not in data:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(data["results"], list) or not data["results"]:
        raise ValueError("no results")
    for row in data["results"]:
        for key in ("op", "mode", "dtype", "batch", "backend", "median_ms"):
            if key not in row:
                raise ValueError(f"a result row lacks {key!r}: {row}")
        ms = row["median_ms"]
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"median_ms must be a positive number: {row}")


def rank_backends(data: dict, op: str, candidates) -> tuple[list, str] | None:
    """Rank ``candidates`` for ``op`` by the recorded medians: (fastest first, how), or None when
    the file has no cell where every candidate was measured. Score: the geometric mean of the
    medians over the (mode, dtype, batch) cells that all candidates have; ties keep the order of
    ``candidates``."""
    cells: dict = {}
    for row in data["results"]:
        if row["op"] == op and row["backend"] in candidates:
            cells.setdefault((row["mode"], row["dtype"], row["batch"]), {})[row["backend"]] = float(row["median_ms"])
    common = [c for c in cells.values() if all(b in c for b in candidates)]
    if not common:
        return None
    score = {b: sum(math.log(c[b]) for c in common) / len(common) for b in candidates}
    order = sorted(candidates, key=lambda b: (score[b], list(candidates).index(b)))
    if len(order) > 1:
        ratio = math.exp(score[order[0]] - score[order[1]])
        how = f"{order[0]} {ratio:.2f}x the time of {order[1]} (geometric mean of {len(common)} cells)"
    else:
        how = f"{order[0]} ({len(common)} cells)"
    return order, how


def _find_results(gpu: str, capability: str, results: list) -> tuple[dict | None, str]:
    for data in results:
        if data["gpu"] == gpu:
            return data, "same GPU"
    for data in results:
        if str(data["capability"]) == capability:
            return data, f"same compute capability {capability}"
    return None, ""


def choose_gpu_backend(op: str | None, gpu: str, capability: str, results: list,
                       index: int | None = None) -> tuple[str | None, str]:
    """(the automatic backend of ``op`` on CUDA tensors of GPU ``gpu`` (device ``index``), where the
    choice came from). None when no GPU backend can run the op (the caller falls back to the reference)."""
    cands = [b for b in DEFAULT_GPU_ORDER if op_live(op, b, index)]
    if "cuda" not in cands and "cuda" in DEFAULT_GPU_ORDER and index is not None and op_live(op, "cuda"):
        _warn_once(f"cuda-image-{index}",
                   f"fpet_kernels: the extension's CUDA kernels hold no code for {gpu} (sm {capability}); "
                   f"using {cands[0] if cands else 'the reference'} instead. Rebuild with "
                   f"TORCH_CUDA_ARCH_LIST={capability} to use them.")
    if not cands:
        return None, f"no GPU backend is live for {op or 'this op'}"
    if op is None:
        return cands[0], f"default order {'/'.join(DEFAULT_GPU_ORDER)} (no op named)"
    data, match = _find_results(gpu, capability, results)
    if data is None:
        return cands[0], f"default order {'/'.join(DEFAULT_GPU_ORDER)}: no recorded results for {gpu} (sm {capability})"
    if len(cands) == 1:
        return cands[0], f"only live GPU backend for {op}"
    ranked = rank_backends(data, op, cands)
    where = (f"{data['_file']} ({data['gpu']}, {match}; torch {data['torch']}, triton "
             f"{data.get('triton') or '-'}, {data['date']})")
    if ranked is None:
        return cands[0], (f"default order {'/'.join(DEFAULT_GPU_ORDER)}: {where} has no results of "
                          f"{op} for {' and '.join(cands)}")
    order, how = ranked
    return order[0], f"recorded: {where}: {how}"


_RESULTS: list | None = None
_GPU_IDENTITY: dict = {}
_AUTO_CUDA: dict = {}


def _results() -> list:
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = load_results()
    return _RESULTS


def _gpu_identity(index: int) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``index`` (-1: the current device)."""
    got = _GPU_IDENTITY.get(index)
    if got is None:
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index < 0 else index)
        got = _GPU_IDENTITY[index] = (props.name, f"{props.major}.{props.minor}")
    return got


def _reset_auto() -> None:
    """Forget the loaded results and the choices made (tests point ``TUNING_DIR`` elsewhere)."""
    global _RESULTS
    _RESULTS = None
    _GPU_IDENTITY.clear()
    _AUTO_CUDA.clear()


def _auto_cuda_choice(op: str | None, index: int) -> tuple[str | None, str]:
    key = (op, index)
    got = _AUTO_CUDA.get(key)
    if got is None:
        gpu, cap = _gpu_identity(index)
        dev = torch.cuda.current_device() if index < 0 else index
        got = _AUTO_CUDA[key] = choose_gpu_backend(op, gpu, cap, _results(), dev)
    return got


# Constant for the process and evaluated eagerly (never traced) by torch.compile: its first call
# reads files and queries the device, which a trace could not contain.
@_constant_result
def _auto_cuda(op: str, index: int) -> str:
    be, _ = _auto_cuda_choice(op or None, index)
    return be or ""


def _summary(per_op: dict) -> str:
    names = set(per_op.values())
    if len(names) == 1:
        return names.pop()
    return ",".join(f"{op}={be}" for op, be in per_op.items())


def backends() -> dict:
    """What is live in this install and what the automatic choice picks, per device and op.

    Keys: ``live`` (backend -> bool), ``auto`` (device -> the chosen backend, or ``op=backend,...``
    when the ops differ), ``auto_per_op`` (device -> op -> backend), ``auto_source`` (device -> op
    -> where the choice came from), ``cuda_device`` (name, compute capability and the binary version
    of the extension's code it runs, -1 for none, when a GPU is present), ``extension``,
    ``extension_cuda`` (the extension holds CUDA kernels, GPU or not), ``cuda_kernels`` (the ops
    with a compiled CUDA kernel), ``env`` (the value of ``FPET_BACKEND``), ``env_var``,
    ``tuning_dir`` and ``results_files`` (recorded results shipped in the package).

    >>> import fpet_kernels as fk; fk.backends()["live"]["reference"]
    True
    """
    lv = live()
    cuda_k = _cuda_kernels()
    per_op = {"cpu": {op: ("cpu" if op_live(op, "cpu") else "reference") for op in OP_KERNELS}}
    source = {"cpu": {op: ("the C++ kernels (the only compiled CPU backend)" if per_op["cpu"][op] == "cpu"
                           else "no compiled CPU kernel is live") for op in OP_KERNELS}}
    info_cuda = None
    if torch.cuda.is_available():
        gpu, cap = _gpu_identity(-1)
        info_cuda = {"name": gpu, "capability": cap, "extension_image": cuda_image(torch.cuda.current_device())}
        per_op["cuda"], source["cuda"] = {}, {}
        for op in OP_KERNELS:
            be, why = _auto_cuda_choice(op, -1)
            per_op["cuda"][op] = be or "reference"
            source["cuda"][op] = why
    info = {
        "live": lv,
        "auto": {dev: _summary(ops) for dev, ops in per_op.items()},
        "auto_per_op": per_op,
        "auto_source": source,
        "cuda_device": info_cuda,
        "extension": _EXT is not None,
        "extension_cuda": any(cuda_k.values()),
        "cuda_kernels": [k for k, v in cuda_k.items() if v],
        "env": env_backend(),
        "env_var": ENV_VAR,
        "tuning_dir": TUNING_DIR,
        "results_files": [f"{d['_file']} ({d['gpu']}, {d['date']})" for d in _results()],
    }
    if _EXT_ERROR:
        info["extension_error"] = _EXT_ERROR
    return info


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _env_reader():
    """A reader of ``FPET_BACKEND`` for every op call: ``os.environ``'s own dict (it stays current under
    ``os.environ[...] =`` and ``monkeypatch.setenv``) without the encode/decode of ``os.environ.get``."""
    data, key = getattr(os.environ, "_data", None), None
    if isinstance(data, dict):
        try:
            key = os.environ.encodekey(ENV_VAR)
        except Exception:  # pragma: no cover - another os.environ implementation
            key = None
    if key is None or not isinstance(data, dict):  # pragma: no cover
        return lambda: os.environ.get(ENV_VAR)
    decode = os.environ.decodevalue

    def read():
        v = data.get(key)
        return None if v is None else decode(v)
    return read


env_backend = _constant_result(_env_reader())  # read once per trace under torch.compile


def resolve(backend: str | None, device: torch.device, dtypes=(), op: str | None = None) -> str:
    """Pick the backend for one call of public op ``op`` on tensors of ``device`` and ``dtypes``
    (a sequence of dtypes, or a dict ``{argument name: dtype}`` so that errors name the tensor).

    A compiled backend asked for explicitly (``backend=`` or ``FPET_BACKEND``) computes float32,
    float16 and bfloat16 only: another dtype raises a TypeError naming the tensor."""
    if backend is None:
        name = env_backend()
        if name is None or name == "auto":  # the common case, kept short: it runs on every op call
            for d in (dtypes.values() if isinstance(dtypes, dict) else dtypes):
                if d not in KERNEL_DTYPES:  # float64 and friends: only the reference computes them
                    return "reference"
            if device.type == "cpu" and _is_live("cpu"):
                return "cpu"
            return _resolve_auto(device, op)
        src = ENV_VAR
    else:
        name, src = backend, "backend"
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    name = name.lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{src}={name!r} is not one of {BACKENDS + ('auto',)}")
    named = dtypes if isinstance(dtypes, dict) else {f"input {i}": d for i, d in enumerate(dtypes)}
    kernel_ok = all(d in KERNEL_DTYPES for d in named.values())
    if name == "auto":
        if not kernel_ok:
            return "reference"
        if device.type == "cpu" and _is_live("cpu"):
            return "cpu"
        return _resolve_auto(device, op)
    if name == "reference":
        return name
    if not kernel_ok:
        bad = ", ".join(f"{k} is {d}" for k, d in named.items() if d not in KERNEL_DTYPES)
        raise TypeError(f"{src}={name!r} computes float32, float16 and bfloat16; {bad} "
                        "(use backend='reference' for other dtypes)")
    lv = live()
    if not lv[name]:
        cuda_k = _cuda_kernels()
        if name == "cuda" and any(cuda_k.values()) and not torch.cuda.is_available():
            why = ": the extension holds CUDA kernels but no CUDA device is present"
        elif _EXT_ERROR and name in ("cpu", "cuda"):
            why = f": the extension failed to load ({_EXT_ERROR})"
        elif name == "cuda" and _EXT is not None:
            why = ": the extension was built without CUDA kernels (see docs/backends.md)"
        else:
            why = ""
        raise RuntimeError(f"{src}={name!r} was requested but is not live in this install{why}; "
                           f"live backends: {[k for k, v in lv.items() if v]}")
    if name == "cuda" and op is not None and not _cuda_kernels().get(OP_KERNELS[op][0], False):
        raise RuntimeError(f"{src}='cuda' was requested for {op}, but the extension has no CUDA kernel "
                           f"for fpet::{OP_KERNELS[op][0]} (CUDA kernels in this build: "
                           f"{[k for k, v in _cuda_kernels().items() if v]}); use backend='triton'")
    if name == "cuda" and device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if cuda_image(index) < 0:
            gpu, cap = _gpu_identity(index)
            raise RuntimeError(f"{src}='cuda' was requested, but the extension's CUDA kernels hold no code for "
                               f"{gpu} (sm {cap}); rebuild with TORCH_CUDA_ARCH_LIST={cap} or use backend='triton'")
    want = "cpu" if name == "cpu" else "cuda"
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        want = "cpu"
    if device.type != want:
        raise ValueError(f"{src}={name!r} runs on {want} tensors, but the inputs are on {device}")
    return name


def _resolve_auto(device: torch.device, op: str | None) -> str:
    """The automatic choice on kernel dtypes when the C++ CPU kernels do not take the call."""
    if device.type == "cuda":
        chosen = _auto_cuda(op or "", -1 if device.index is None else device.index)
        if chosen:
            return chosen
    why = f" ({_EXT_ERROR})" if _EXT_ERROR else ""
    _warn_once(
        f"fallback-{device.type}-{op}",
        f"fpet_kernels: no compiled kernel is live for {op or 'this op'} on {device.type} tensors{why}; "
        "using the pure-PyTorch reference (fpet_kernels.backends() tells what is live).",
    )
    return "reference"
