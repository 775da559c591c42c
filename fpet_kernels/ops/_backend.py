"""Which kernels are live, and which one an op call uses.

Backends:
  "reference"  the pure-PyTorch implementation of the spec (any device, any float dtype);
  "cpu"        the C++ kernels of the extension ``fpet_kernels._C`` on CPU tensors (OpenMP);
  "cuda"       the CUDA C++ kernels of the extension on CUDA tensors;
  "triton"     the Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

The choice per call (:func:`resolve`, called by ``library.dispatch`` once per public call): the
op's ``backend=`` argument, else the environment variable ``FPET_BACKEND``, else "auto". An
explicitly requested backend that cannot run the call raises; the automatic choice takes the
fastest live backend for the tensors' device and falls back to the reference (saying so once)
when no kernel is live.

The automatic choice per op:
  CPU tensors   "cpu" (the only compiled CPU backend; Triton on CPU is the interpreter, for tests);
  CUDA tensors  the fastest of the live GPU backends ("cuda", "triton") *for that op*, from the
                benchmark results recorded in the package (``fpet_kernels/tuning/*.json``, written
                by ``bench/record_dispatch.py`` on a GPU; the ranking is ``ops/_tuning.py``'s).
                Without recorded results for this GPU: the default order
                ``_tuning.DEFAULT_GPU_ORDER`` (cuda, then triton). ``backends()["auto_source"]``
                says which of the two decided.
"cuda" is live for an op on a device when the extension registers CUDA kernels for the op's forward
and backward (the record's ``kernels``, :func:`op_kernels`) and holds code that device can run
(``cuda_image``): a build without code for the GPU's architecture makes the automatic choice fall
back to Triton, saying so once, and an explicit ``backend="cuda"`` raise.

The op records (``library.Op``, in :data:`OPS`) drive the rest of the rule: an op without C++
kernels (``cpp=False``: ``attention_inputs``, a permute and a copy on CPU) runs PyTorch on CPU
tensors, automatically and silently, and where ``backend="cpu"`` / ``"cuda"`` is asked for, saying
so once; ``library.dispatch`` runs the reference where a gradient is needed from an op whose
kernels have no backward (``inference_only``), saying so once.

Nothing here runs at import: the extension is loaded by ``fpet_kernels.ops`` once the schemas exist,
and CUDA and Triton are probed at their first use. What is learnt once per process (liveness, the
kernels the extension registers, the recorded results, the choices, the warnings given) is kept in
one object, :data:`STATE`; ``STATE.reset()`` forgets it (tests pretend a GPU through its fields).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from . import _tuning
from ._tuning import DEFAULT_GPU_ORDER, TUNING_DIR, load_results

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "FPET_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_BACKENDS = ("cuda", "triton")
FAMILY_NAMES = {"cpu": "C++", "cuda": "CUDA", "triton": "Triton"}

# name -> ``library.Op``, in registration order: the one list of ops (``library.OPS`` is this dict;
# ``library.register`` adds to it). Read here only at calls, after every family has registered.
OPS: dict = {}


def op_kernels() -> dict:
    """The public ops whose automatic choice ranks compiled kernels (those with C++ kernels), and the
    registered ops (``torch.ops.fpet.*``) each needs: its forward first, then those its autograd calls
    with the same kernel family (``Op.kernels``)."""
    return {name: op.kernels for name, op in OPS.items() if op.public and op.cpp}


def raw_kernels() -> tuple:
    """The registered ops the extension may hold C++ kernels for (``torch.ops.fpet.<name>``)."""
    return tuple(name for name, op in OPS.items() if op.cpp)


class BackendState:
    """What the backend choice learns once per process, in one place. ``reset()`` forgets all of it,
    ``reset_choices()`` the recorded results and the automatic choices only (after a test changed
    ``live``, ``kernels`` or ``tuning_dir``).

    ``live``          backend -> probed liveness;
    ``cpu_takes``     op -> the C++ CPU kernels take its automatic calls (live, and the op has them);
    ``kernels``       dispatch key ("CPU", "CUDA") -> {registered op: the extension holds its kernel};
    ``cuda_image``    CUDA device index -> binary version of the extension's code it runs (-1: none);
    ``gpu_identity``  CUDA device index (-1: current) -> (name, "major.minor");
    ``tuning_dir``    where the recorded results are read (default ``_tuning.TUNING_DIR``);
    ``results``       the recorded results loaded from it (None: not read yet);
    ``auto_cuda``     (op, device index) -> (the automatic backend on CUDA tensors, where it came from);
    ``warned``        the keys of the warnings given once.
    """

    def __init__(self):
        self.reset()

    def reset(self, tuning_dir: str | None = None) -> None:
        self.live: dict = {}
        self.kernels: dict = {}
        self.cuda_image: dict = {}
        self.gpu_identity: dict = {}
        self.warned: set = set()
        self.tuning_dir = TUNING_DIR if tuning_dir is None else tuning_dir
        self.reset_choices()

    def reset_choices(self) -> None:
        self.results = None
        self.auto_cuda: dict = {}
        self.cpu_takes: dict = {}


STATE = BackendState()


# ----------------------------------------------------------------------------- the extension
_EXT = None
_EXT_ERROR: str | None = "fpet_kernels._C was not loaded yet"


_EXT_NAME = __name__.rsplit(".", 2)[0] + "._C"  # fpet_kernels._C


def load_extension() -> None:
    """Load ``fpet_kernels._C``: its C++ kernels register as the CPU/CUDA implementations of the ops
    ``torch.ops.fpet.*``. Called once by ``fpet_kernels.ops`` after every op family defined its
    schemas. The extension is optional: without it the package runs the Triton and reference paths."""
    global _EXT, _EXT_ERROR
    if _EXT is not None:
        return
    from .._version import check_extension_torch
    try:
        from .. import _C
        _EXT = _C
        _EXT_ERROR = None
    except ImportError as exc:  # pragma: no cover - depends on the install
        other_torch = check_extension_torch()  # a build for another torch fails to load: say so
        if other_torch:
            _EXT_ERROR = other_torch
            warnings.warn(other_torch, RuntimeWarning, stacklevel=2)
        elif isinstance(exc, ModuleNotFoundError) or exc.name != _EXT_NAME:  # no file: an ImportError of the package
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


def _kernels(key: str) -> dict:
    """{registered op: the extension holds its kernel for dispatch key ``key``} ("CPU", "CUDA"; the
    CUDA kernels are known whether or not a GPU is present)."""
    got = STATE.kernels.get(key)
    if got is None:
        got = STATE.kernels[key] = {k: _has_kernel(k, key) for k in raw_kernels()}
    return got


def _constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (which imports Triton)
    when the package is imported: the mark it sets, read by dynamo when it traces a call of ``fn``."""
    fn._dynamo_marked_constant = True
    return fn


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
    got = STATE.live.get(name)
    if got is None:
        got = STATE.live[name] = _probe(name)
    return got


def _has_cpp(op: str | None) -> bool:
    """Whether op ``op`` has C++ kernels (its record's ``cpp``; an unknown or unnamed op: yes)."""
    rec = OPS.get(op)
    return rec is None or rec.cpp


# The automatic choice on CPU tensors, per op: one cached lookup, as cheap as ``_is_live("cpu")``.
@_constant_result
def _cpu_takes(op: str | None) -> bool:
    """Whether the C++ CPU kernels take the automatic calls of ``op``: "cpu" is live and the op has them."""
    got = STATE.cpu_takes.get(op)
    if got is None:
        got = STATE.cpu_takes[op] = _is_live("cpu") and _has_cpp(op)
    return got


def live() -> dict:
    """Which backends can run here (the device being present for GPU backends)."""
    return {name: _is_live(name) for name in BACKENDS}


def cuda_image(index: int) -> int:
    """The binary version of the extension's CUDA code that CUDA device ``index`` runs (e.g. 90), or
    -1 when the build holds no code for that device's architecture (then ``cuda`` is not live there)."""
    got = STATE.cuda_image.get(index)
    if got is None:
        fn = getattr(_EXT, "cuda_image_version", None)
        got = STATE.cuda_image[index] = int(fn(index)) if fn is not None and _is_live("cuda") else -1
    return got


def op_live(op: str | None, name: str, index: int | None = None) -> bool:
    """Whether backend ``name`` can run public op ``op`` with its backward (``op=None``: any op), on
    CUDA device ``index`` for ``cuda`` when given: the backend is live and, for a compiled family,
    the op's record has its kernels (``cpu``, ``cuda``: every registered op of ``Op.kernels`` holds a
    kernel of the extension; ``triton``: the record names a Triton module)."""
    if not _is_live(name):
        return False
    if name == "cuda" and index is not None and cuda_image(index) < 0:
        return False
    rec = OPS.get(op)
    if name == "reference" or rec is None:
        return True
    if name == "triton":
        return rec.triton is not None
    have = _kernels("CPU" if name == "cpu" else "CUDA")
    return all(have.get(k, False) for k in rec.kernels)


# ----------------------------------------------------------------------------- the automatic choice on GPU
def choose_gpu_backend(op: str | None, gpu: str, capability: str, results: list,
                       index: int | None = None) -> tuple[str | None, str]:
    """(the automatic backend of ``op`` on CUDA tensors of GPU ``gpu`` (device ``index``), where the
    choice came from): the live GPU backends of the op ranked by ``_tuning.choose``. None when no
    GPU backend can run the op (the caller falls back to the reference)."""
    cands = [b for b in DEFAULT_GPU_ORDER if op_live(op, b, index)]
    if "cuda" not in cands and "cuda" in DEFAULT_GPU_ORDER and index is not None and op_live(op, "cuda"):
        warn_once(f"cuda-image-{index}",
                  f"fpet_kernels: the extension's CUDA kernels hold no code for {gpu} (sm {capability}); "
                  f"using {cands[0] if cands else 'the reference'} instead. Rebuild with "
                  f"TORCH_CUDA_ARCH_LIST={capability} to use them.")
    return _tuning.choose(op, cands, gpu, capability, results)


def _results() -> list:
    if STATE.results is None:
        STATE.results = load_results(STATE.tuning_dir)
    return STATE.results


def _gpu_identity(index: int) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``index`` (-1: the current device)."""
    got = STATE.gpu_identity.get(index)
    if got is None:
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index < 0 else index)
        got = STATE.gpu_identity[index] = (props.name, f"{props.major}.{props.minor}")
    return got


def _auto_cuda_choice(op: str | None, index: int) -> tuple[str | None, str]:
    key = (op, index)
    got = STATE.auto_cuda.get(key)
    if got is None:
        gpu, cap = _gpu_identity(index)
        dev = torch.cuda.current_device() if index < 0 else index
        got = STATE.auto_cuda[key] = choose_gpu_backend(op, gpu, cap, _results(), dev)
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
    cuda_k = _kernels("CUDA")
    ops = op_kernels()
    per_op = {"cpu": {op: ("cpu" if op_live(op, "cpu") else "reference") for op in ops}}
    source = {"cpu": {op: ("the C++ kernels (the only compiled CPU backend)" if per_op["cpu"][op] == "cpu"
                           else "no compiled CPU kernel is live") for op in ops}}
    info_cuda = None
    if torch.cuda.is_available():
        gpu, cap = _gpu_identity(-1)
        info_cuda = {"name": gpu, "capability": cap, "extension_image": cuda_image(torch.cuda.current_device())}
        per_op["cuda"], source["cuda"] = {}, {}
        for op in ops:
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
        "tuning_dir": STATE.tuning_dir,
        "results_files": [f"{d['_file']} ({d['gpu']}, {d['date']})" for d in _results()],
    }
    if _EXT_ERROR:
        info["extension_error"] = _EXT_ERROR
    return info


def warn_once(key: str, msg: str) -> None:
    """A RuntimeWarning, the first time ``key`` is given in this process (``STATE.warned``)."""
    if key not in STATE.warned:
        STATE.warned.add(key)
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
    float16 and bfloat16 only: another dtype raises a TypeError naming the tensor. An op without C++
    kernels (its record's ``cpp``) runs the reference where "cpu" or "cuda" is asked for (saying so
    once) and, automatically, on every device but CUDA."""
    if backend is None:
        name = env_backend()
        if name is None or name == "auto":  # the common case, kept short: it runs on every op call
            for d in (dtypes.values() if isinstance(dtypes, dict) else dtypes):
                if d not in KERNEL_DTYPES:  # float64 and friends: only the reference computes them
                    return "reference"
            if device.type == "cpu":
                takes = STATE.cpu_takes.get(op)  # _cpu_takes, inlined: this runs on every op call
                if takes or (takes is None and _cpu_takes(op)):
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
        if device.type == "cpu" and _cpu_takes(op):
            return "cpu"
        return _resolve_auto(device, op)
    if name == "reference":
        return name
    if name in ("cpu", "cuda") and not _has_cpp(op):
        rec = OPS[op]
        grad = " where no gradient is needed" if rec.inference_only else ""
        warn_once(f"{op}-{name}",
                  f"fpet_kernels: {op} has no {name} kernel (backend={name!r}): it runs {rec.fallback}; the "
                  f"merge ops still run {name}. On GPU, backend='triton' or None runs its Triton kernel{grad}.")
        return "reference"
    if not kernel_ok:
        bad = ", ".join(f"{k} is {d}" for k, d in named.items() if d not in KERNEL_DTYPES)
        raise TypeError(f"{src}={name!r} computes float32, float16 and bfloat16; {bad} "
                        "(use backend='reference' for other dtypes)")
    lv = live()
    if not lv[name]:
        cuda_k = _kernels("CUDA")
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
    if name == "cuda" and op is not None and not _kernels("CUDA").get(op, False):
        raise RuntimeError(f"{src}='cuda' was requested for {op}, but the extension has no CUDA kernel "
                           f"for fpet::{op} (CUDA kernels in this build: "
                           f"{[k for k, v in _kernels('CUDA').items() if v]}); use backend='triton'")
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
    """The automatic choice on kernel dtypes when the C++ CPU kernels do not take the call. An op
    without C++ kernels runs the reference on every device but CUDA, silently (it is the op's
    implementation there: ``attention_inputs`` is a permute and a copy)."""
    has_cpp = _has_cpp(op)
    if device.type == "cuda":
        chosen = _auto_cuda(op or "", -1 if device.index is None else device.index)
        if chosen:
            return chosen
        if not has_cpp:
            warn_once(f"{op}-no-triton",
                      f"fpet_kernels: the Triton kernel of {op} is not live (Triton is not installed); it runs "
                      f"{OPS[op].fallback}")
            return "reference"
    elif not has_cpp:
        return "reference"
    why = f" ({_EXT_ERROR})" if _EXT_ERROR else ""
    warn_once(
        f"fallback-{device.type}-{op}",
        f"fpet_kernels: no compiled kernel is live for {op or 'this op'} on {device.type} tensors{why}; "
        "using the pure-PyTorch reference (fpet_kernels.backends() tells what is live).",
    )
    return "reference"
