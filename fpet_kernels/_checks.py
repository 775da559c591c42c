"""Argument validation shared by every op: clear errors naming the argument (spec section 5)."""
from __future__ import annotations

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


def token_map(name: str, m, y: torch.Tensor | None = None) -> None:
    if not isinstance(m, torch.Tensor) or m.dtype != torch.int64 or m.dim() != 2:
        raise ValueError(f"{name} must be an int64 tensor [B, N]")
    if y is not None:
        if m.shape[0] != y.shape[0]:
            raise ValueError(f"{name} has batch {m.shape[0]} but the tokens have batch {y.shape[0]}")
        if m.device != y.device:
            raise ValueError(f"{name} is on {m.device} but the tokens are on {y.device}")


def dtypes(**tensors) -> dict:
    """``{name: dtype}`` of the given tensors (None skipped): what ``_backend.resolve`` names in errors."""
    return {k: t.dtype for k, t in tensors.items() if t is not None}
