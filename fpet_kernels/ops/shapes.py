"""Shape and dtype rules shared by the references, the kernels' Python launchers and the fake kernels.

A leaf module: it imports only ``_checks`` (another leaf), so every other module may import it."""
import torch
from torch import Tensor

from .._checks import map_range, r_cap

NORM_EPS = 1e-12  # metric rows: m / max(||m||, 1e-12), as F.normalize (a zero row stays zero)


def compute_dtype(*ts) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def size_dtype(x: Tensor, size) -> torch.dtype:
    """Merged sizes are float32 (float64 when x or size is float64, for gradcheck)."""
    return compute_dtype(x, size)


def cap_r(r: int, n: int, class_token: bool, distill_token: bool) -> int:
    """Spec 1.1: ``r = min(r, cap)``, never below 0 (the cap counts valid destinations: ``_checks.r_cap``)."""
    return max(0, min(r, r_cap(n, class_token, distill_token)))


def grid_sizes(num_prefix: int, h: int, w: int) -> tuple:
    """(Na, Nb) of FPET's checkerboard split (spec 2.2): A = (even, even) + (odd, odd) cells; B = the
    prefix tokens + the other cells."""
    na = ((h + 1) // 2) * ((w + 1) // 2) + (h // 2) * (w // 2)
    return na, num_prefix + h * w - na


def check_map_range(token_map: Tensor, n_out: int, op: str = "token map") -> None:
    """Entries must be in [-1, n_out) (a data check: one host sync, skipped while tracing or capturing)."""
    map_range(op, "token_map", token_map, n_out)
