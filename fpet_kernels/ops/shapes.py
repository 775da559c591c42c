"""Shape and dtype rules shared by the references, the kernels' Python launchers and the fake kernels.

A leaf module: it imports nothing from the package, so every other module may import it."""
import torch
from torch import Tensor

NORM_EPS = 1e-12  # metric rows: m / max(||m||, 1e-12), as F.normalize (a zero row stays zero)


def compute_dtype(*ts) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def size_dtype(x: Tensor, size) -> torch.dtype:
    """Merged sizes are float32 (float64 when x or size is float64, for gradcheck)."""
    return compute_dtype(x, size)


def cap_r(r: int, n: int, class_token: bool, distill_token: bool) -> int:
    """Spec 1.1: ``r = min(r, (N - protected) // 2)``, never below 0."""
    return max(0, min(r, (n - int(class_token) - int(distill_token)) // 2))


def grid_sizes(num_prefix: int, h: int, w: int) -> tuple:
    """(Na, Nb) of FPET's checkerboard split (spec 2.2): A = (even, even) + (odd, odd) cells; B = the
    prefix tokens + the other cells."""
    na = ((h + 1) // 2) * ((w + 1) // 2) + (h // 2) * (w // 2)
    return na, num_prefix + h * w - na


def check_map_range(token_map: Tensor, n_out: int) -> None:
    """Entries must be in [-1, n_out) (a data check: done eagerly, never while tracing, where the
    gathers of the reference still refuse out-of-range indices)."""
    if torch.compiler.is_compiling():
        return
    if token_map.numel() and (int(token_map.min()) < -1 or int(token_map.max()) >= n_out):
        raise ValueError(f"token_map entries must be in [-1, {n_out}), got [{int(token_map.min())}, "
                         f"{int(token_map.max())}]")
