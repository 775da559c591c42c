"""Layers that the model patches and the PET methods both use: argument checks, FPET's 1-bit
(binary) layers and the zero-initialised bottleneck. Plain ``nn.Module``s and functions on torch only.

Import direction: ``ops`` <- ``integrations`` <- this module <- ``patch/`` (FPET's refinement adapter is
a bottleneck, 1-bit by default) <- ``pet/`` (LoRA, AdaptFormer, X-PEFT build on these layers).

Read top to bottom:
  1. argument checks: ``check_pos_int``, ``check_real``, ``check_prob``, ``check_bool`` (the messages name
     the argument);
  2. binarisation: ``binarize`` (straight-through), ``BinaryLinear``, ``pack_binary`` / ``unpack_binary``;
  3. ``Bottleneck``: ``up(dropout(relu(down(x))))`` with ``up`` starting at zero.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BINARY_LEVEL", "binarize", "BinaryLinear", "pack_binary", "unpack_binary", "make_linear", "Bottleneck",
           "check_pos_int", "check_real", "check_prob", "check_bool"]

#: The two optimal 1-bit quantisation levels of a standard normal are +-sqrt(2/pi) (= E|z|).
BINARY_LEVEL = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------- argument checks
def check_pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be a positive int, got {type(v).__name__} {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {v}")
    return v


def check_real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite real number, got {type(v).__name__} {v!r}")
    return float(v)


def check_prob(name: str, v) -> float:
    p = check_real(name, v)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return p


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")
    return v


# ----------------------------------------------------------------------------- binarisation
def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-layer mean and (unbiased) std of ``w`` (float32, float64 for float64 weights); std is 0,
    never NaN, for a single element."""
    wf = w.detach().to(_stat_dtype(w.dtype))
    mu = wf.mean()
    sigma = wf.std() if wf.numel() > 1 else torch.zeros_like(mu)
    return mu, torch.nan_to_num(sigma, nan=0.0)


def _levels(bits: Tensor, mu: Tensor, sigma: Tensor, dtype: torch.dtype) -> Tensor:
    """``mu + sqrt(2/pi) sigma`` where ``bits`` else ``mu - sqrt(2/pi) sigma``. The single place the
    levels are computed, so ``binarize`` and ``unpack_binary`` agree bit for bit."""
    hi = mu + BINARY_LEVEL * sigma
    lo = mu - BINARY_LEVEL * sigma
    return torch.where(bits, hi, lo).to(dtype)


def binarize(w: Tensor) -> Tensor:
    """FPET's 1-bit weight: ``sign(w - mu) * sqrt(2/pi) * sigma + mu`` with the layer's mean ``mu``
    and std ``sigma`` (statistics in float32, float64 for float64 ``w``; result in ``w.dtype``; ``w == mu`` counts as +1).

    The forward value is exactly one of the two levels; the gradient is the identity to ``w``
    (straight-through estimator). Written as ``w_q + (w - w.detach())`` rather than
    ``w + (w_q - w).detach()``: same gradient, but the forward value is ``w_q`` exactly (the second
    form can be off by one rounding). A constant ``w`` gives ``sigma = 0`` and ``w_q = mu``, no NaN."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating torch.Tensor, got {type(w).__name__}")
    if w.numel() == 0:
        raise ValueError("w must have at least one element")
    mu, sigma = _stats(w)
    w_q = _levels(w.detach().to(mu.dtype) >= mu, mu, sigma, w.dtype)
    return w_q + (w - w.detach()) if w.requires_grad else w_q


class BinaryLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``binarize(weight)``; the bias stays full precision. The
    latent full-precision weight is what the optimiser updates (straight-through)."""

    binary = True
    #: ``(mu, sigma)`` fixed by ``pet.load`` for a layer restored from its packed bits (then the latent
    #: weight holds the two levels and the forward reproduces the saved weight bit for bit); None: the
    #: statistics of the latent weight, as in training.
    binary_stats: Optional[Tuple[float, float]] = None

    def binary_weight(self) -> Tensor:
        """The weight the forward uses (differentiable, straight-through)."""
        if self.binary_stats is not None:
            w = self.weight
            dt = _stat_dtype(w.dtype)
            mu = torch.tensor(self.binary_stats[0], dtype=dt, device=w.device)
            sigma = torch.tensor(self.binary_stats[1], dtype=dt, device=w.device)
            w_q = _levels(w.detach().to(dt) >= mu, mu, sigma, w.dtype)
            return w_q + (w - w.detach()) if w.requires_grad else w_q
        return binarize(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.binary_weight(), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BinaryLinear":
        """A BinaryLinear sharing nothing with ``linear`` but holding a copy of its parameters."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out


def make_linear(in_features: int, out_features: int, bias: bool, binary: bool) -> nn.Linear:
    """An ``nn.Linear``, or a :class:`BinaryLinear` when ``binary``."""
    return (BinaryLinear if binary else nn.Linear)(in_features, out_features, bias=bias)


def pack_binary(linear: nn.Linear) -> dict:
    """Storage form of a binary layer: ``bits`` (uint8, 8 sign bits per byte, MSB first, the last
    byte zero-padded), ``mu``/``sigma`` (Python floats holding the statistics exactly),
    ``shape``, ``dtype`` and ``bias`` (a detached copy or None). ``unpack_binary`` gives back the
    forward weight of ``BinaryLinear`` bit for bit. Any ``nn.Linear`` is accepted: its weight is
    binarised as a BinaryLinear would."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear (e.g. BinaryLinear), got {type(linear).__name__}")
    w = linear.weight.detach()
    fixed = getattr(linear, "binary_stats", None)
    if fixed is not None:
        mu = torch.tensor(fixed[0], dtype=_stat_dtype(w.dtype), device=w.device)
        sigma = torch.tensor(fixed[1], dtype=_stat_dtype(w.dtype), device=w.device)
    else:
        mu, sigma = _stats(w)
    bits = (w.to(mu.dtype) >= mu).flatten().to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    packed = (bits.view(-1, 8) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return dict(bits=packed, mu=float(mu), sigma=float(sigma), shape=tuple(w.shape), dtype=w.dtype, bias=bias)


def unpack_binary(d: dict) -> Tensor:
    """The weight tensor stored by ``pack_binary`` (equal to ``binarize(linear.weight)``)."""
    if not isinstance(d, dict) or not {"bits", "mu", "sigma", "shape"} <= d.keys():
        raise TypeError("d must be a dict from pack_binary with keys bits, mu, sigma, shape")
    packed, shape = d["bits"], tuple(d["shape"])
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError("d['bits'] must be a uint8 tensor")
    n = math.prod(shape)
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"d['bits'] holds {packed.numel()} bytes, shape {shape} needs {(n + 7) // 8}")
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = ((packed.view(-1, 1) >> shifts) & 1).flatten()[:n].view(shape).bool()
    dtype = d.get("dtype", torch.float32)
    mu = torch.tensor(d["mu"], dtype=_stat_dtype(dtype), device=packed.device)
    sigma = torch.tensor(d["sigma"], dtype=_stat_dtype(dtype), device=packed.device)
    return _levels(bits, mu, sigma, dtype)


# ----------------------------------------------------------------------------- bottleneck
class Bottleneck(nn.Module):
    """``up(dropout(relu(down(x))))``, ``dim -> hidden -> dim``; ``up`` zero-initialised (weight and
    bias) so a fresh bottleneck outputs zeros; ``binary=True``: BinaryLinear layers (FPET 1-bit)."""

    def __init__(self, dim: int, hidden: int, dropout: float, binary: bool, hidden_name: str):
        super().__init__()
        self.dim, hidden = check_pos_int("dim", dim), check_pos_int(hidden_name, hidden)
        self.binary = check_bool("binary", binary)
        self.down = make_linear(dim, hidden, True, binary)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(check_prob("dropout", dropout))
        self.up = make_linear(hidden, dim, True, binary)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x))))
