"""Argument validation shared by every op: clear errors naming the argument (spec section 5)."""
from __future__ import annotations

import contextlib
import math
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tokens(name: str, t, *, last: int | None = None) -> None:
    """``t`` must be a floating [B, N, K] tensor (``K == last`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, N, {'C' if last is None else last}], "
                         f"got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {t.dtype}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{name} must have shape [B, N, {last}], got {tuple(t.shape)}")


def same_tokens(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """``t`` must have the batch and token counts and the device of ``ref``."""
    if t.shape[:2] != ref.shape[:2]:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}: "
                         "batch size B and token count N must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def merge_inputs(x, metric, size) -> None:
    tokens("x", x)
    tokens("metric", metric)
    same_tokens("x", x, "metric", metric)
    if size is not None:
        tokens("size", size, last=1)
        same_tokens("x", x, "size", size)


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def count(name: str, r) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be a Python int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"{name} must be >= 0, got {r}")
    return r


def param(name: str, t, shape: tuple, ref: torch.Tensor) -> None:
    """A learned parameter of an exact shape on ``ref``'s device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")


def token_map(name: str, m, y: torch.Tensor | None = None, tokens_name: str = "the tokens") -> None:
    if not isinstance(m, torch.Tensor) or m.dtype != torch.int64 or m.dim() != 2:
        got = (f"a {m.dim()}-D {m.dtype} tensor" if isinstance(m, torch.Tensor) else type(m).__name__)
        raise ValueError(f"{name} must be an int64 tensor [B, N], got {got}")
    if y is not None:
        if m.shape[0] != y.shape[0]:
            raise ValueError(f"{name} has batch {m.shape[0]} but {tokens_name} have batch {y.shape[0]}")
        if m.device != y.device:
            raise ValueError(f"{name} is on {m.device} but {tokens_name} are on {y.device}")


# ----------------------------------------------------------------------------- kernel entry checks
# Every kernel entry function (the Triton launchers in ``ops/*_triton*.py``) checks its own
# arguments with these before it launches: nothing a caller passes may make a kernel read or write
# out of bounds. Messages start with the op's name and name the argument.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The output rows of a map-driven merge (merge_wavg, merge_sum): the same bound on every backend (the
# CUDA and Triton kernels index rows with 32-bit integers), checked before anything is allocated.
MAX_OUT_ROWS = 2 ** 31 - 1
BACKEND_NAMES = ("reference", "cpu", "cuda", "triton", "auto")


def kernel_tensor(op: str, name: str, t, device, shape=None, dtypes=KERNEL_DTYPES) -> None:
    """``t`` is a tensor on ``device`` of one of ``dtypes`` (None: any) and, when given, of ``shape``
    (a tuple; ``None`` entries match any extent)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {want}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or t.shape[i] == s for i, s in enumerate(shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")


def kernel_tokens(op: str, name: str, t, device=None) -> None:
    """A floating [B, N, C] kernel input (``device``: that of the op's first tensor)."""
    kernel_tensor(op, name, t, t.device if device is None and isinstance(t, torch.Tensor) else device,
                  shape=(None, None, None))


def kernel_int(op: str, name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int in ``[lo, hi]`` (either bound optional). A symbolic int (a shape traced with
    dynamic sizes) passes unchecked: the range is checked when real values run."""
    if isinstance(v, torch.SymInt):
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{op}: {name} must be in {rng}, got {v}")
    return v


def kernel_map(op: str, t, device, shape, n_out: int, name: str = "token_map") -> None:
    """An int64 token map of ``shape`` whose entries are in ``[-1, n_out)`` (one host sync)."""
    kernel_tensor(op, name, t, device, shape=shape, dtypes=(torch.int64,))
    map_range(op, name, t, n_out)


def fpet_layout(op: str, n: int, num_prefix, H, W) -> None:
    """FPET's layout as the kernels take it: 0 <= num_prefix <= N, H, W >= 1, num_prefix + H * W == N.
    (The public API also wants two destination cells, ``ops.fpet.resolve_grid``; the kernels handle
    fewer: a row without a second top entry matches its only column.)"""
    kernel_int(op, "num_prefix", num_prefix, 0, n)
    kernel_int(op, "H", H, 1, max(n, 1))
    kernel_int(op, "W", W, 1, max(n, 1))
    if num_prefix + H * W != n:
        raise ValueError(f"{op}: num_prefix + H * W = {num_prefix} + {H} * {W} must equal N = {n}")


def reference_map_args(op: str, x, token_map, n_out: int, size=None, x_name: str = "x") -> None:
    """The arguments of a token-map merge in the reference: the kernels' checks, any float dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"{op}: {x_name} must be a floating [B, N, C] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    kernel_int(op, "n_out", n_out, 0, MAX_OUT_ROWS)
    kernel_tensor(op, "token_map", token_map, x.device, shape=(x.shape[0], None), dtypes=(torch.int64,))
    map_range(op, "token_map", token_map, n_out)
    if size is not None:
        kernel_tensor(op, "size", size, x.device, shape=(x.shape[0], token_map.shape[1], 1), dtypes=FLOAT_DTYPES)


def map_range(op: str, name: str, t: torch.Tensor, n_out: int) -> None:
    """Entries of the token map ``t`` must be in ``[-1, n_out)``. A data check: one host sync, and
    skipped while tracing (fake tensors), on meta tensors (no data), capturing a CUDA graph (the
    kernels that read maps skip out-of-range entries, so even then nothing is read or written out
    of bounds) or inside :func:`trusted_maps` (a backward, whose maps its forward produced or
    checked). ``n_out`` itself must be in ``[0, MAX_OUT_ROWS]`` (checked first: no data needed)."""
    kernel_int(op, "n_out", n_out, 0, MAX_OUT_ROWS)
    if t.numel() == 0 or maps_trusted() or _no_data(t):
        return
    if bool(((t >= -1) & (t < n_out)).all()):  # the one sync
        return
    lo, hi = (int(v) for v in torch.aminmax(t))  # an error: its message
    if lo < -1 or hi >= n_out:
        raise ValueError(f"{op}: {name} entries must be in [-1, {n_out}), got entries in [{lo}, {hi}]")


# Index tensors (token maps, PYRA's src/dst/unm indices) that an op's forward produced, or checked
# when the user gave them, are trusted by its backward: the autograd formulas of the registered ops
# run inside ``trusted_maps()`` (``ops/library.py``), and the data checks above (a host sync each)
# are skipped there. An internal state of the calling thread, never an argument a user passes: a call
# of a public function or of ``torch.ops.fpet.*`` outside a backward is checked as always.
_TRUST = threading.local()


def maps_trusted() -> bool:
    """Whether this thread is inside :func:`trusted_maps` (the backward of a registered op)."""
    return getattr(_TRUST, "depth", 0) > 0


@contextlib.contextmanager
def trusted_maps(native=None):
    """Skip the data checks of index tensors in this thread while inside (see ``maps_trusted``).
    ``native``: the extension's switch of the same state for its CUDA launchers
    (``fpet_kernels._C._trust_maps(bool) -> previous``), or None."""
    _TRUST.depth = getattr(_TRUST, "depth", 0) + 1
    prev = native(True) if native is not None else None
    try:
        yield
    finally:
        if native is not None:
            native(prev)
        _TRUST.depth -= 1


def _no_data(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo must not trace into is_fake
        return True
    if t.is_meta:  # shapes only (a model built on the meta device): nothing to check
        return True
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(t):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def r_cap(n: int, class_token: bool, distill_token: bool) -> int:
    """The largest ToMe r (docs/semantics.md): ``(N - protected) // 2``, and 0 when no B token may be a
    destination (the distillation token is the only B token: N = 3 with a distillation token)."""
    if n // 2 - int(distill_token) <= 0:
        return 0
    return max(0, (n - int(class_token) - int(distill_token)) // 2)


def finite_positive(op: str, name: str, v) -> float:
    """A finite float > 0 (PYRA's LayerNorm eps)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def backend_name(backend) -> None:
    """``backend`` is None or one of the backend names (checked where a closure stores it)."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend.lower() not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r} is not one of {BACKEND_NAMES}")


def closure_input(name: str, t: torch.Tensor, metric: torch.Tensor, n: int) -> None:
    """The input of a merge / unmerge closure: the batch size and device of the ``metric`` it was
    built from (no silent broadcasting of one image over a batch) and ``n`` tokens."""
    if t.shape[0] != metric.shape[0]:
        raise ValueError(f"{name} has batch size {t.shape[0]} but the matching was built for batch size "
                         f"{metric.shape[0]}")
    if t.shape[1] != n:
        raise ValueError(f"{name} has {t.shape[1]} tokens but the matching expects {n}")
    if t.device != metric.device:
        raise ValueError(f"{name} is on {t.device} but the matching is on {metric.device}")



def dtypes(**tensors) -> dict:
    """``{name: dtype}`` of the given tensors (None skipped): what ``_backend.resolve`` names in errors."""
    return {k: t.dtype for k, t in tensors.items() if t is not None}
