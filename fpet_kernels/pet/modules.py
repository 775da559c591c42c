"""Parameter-efficient tuning modules for timm ViTs: LoRA, AdaptFormer, FPET's refinement adapter,
PYRA's modulation parameters, and FPET's 1-bit (binary) layers. Plain ``nn.Module``s.

    from fpet_kernels import pet
    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    pet.apply(model, "lora", rank=8)                 # or "adaptformer", bottleneck=64, binary=True
    pet.mark_trainable(model)                        # PET parameters + head train, the rest is frozen
    print(pet.format_report(pet.parameter_report(model)))

Read top to bottom:
  1. binarisation: ``binarize`` (straight-through), ``BinaryLinear``, ``pack_binary``/``unpack_binary``;
  2. the PET modules: ``AdaptFormerAdapter``, ``LoRAQKV``, ``RefinementAdapter``, ``PyraModulation``;
  3. model-level helpers: ``apply``, ``merge_lora``, ``mark_trainable``, ``parameter_report``, ``format_report``.
"""
from __future__ import annotations

import importlib
import math
from numbers import Real
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..integrations import peft as _peft

__all__ = [
    "BINARY_LEVEL", "binarize", "BinaryLinear", "pack_binary", "unpack_binary", "AdaptFormerAdapter", "LoRAQKV",
    "RefinementAdapter", "PyraModulation", "PET_MODULES", "METHODS", "apply", "merge_lora", "mark_trainable",
    "pet_parameters", "parameter_report", "format_report", "register_method", "methods", "HEAD_NAMES",
    "register_pet_module", "is_pet_module", "register_folder", "fold", "heads",
]

#: The two optimal 1-bit quantisation levels of a standard normal are +-sqrt(2/pi) (= E|z|).
BINARY_LEVEL = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------- argument checks
def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be a positive int, got {type(v).__name__} {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {v}")
    return v


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite real number, got {type(v).__name__} {v!r}")
    return float(v)


def _prob(name: str, v) -> float:
    p = _real(name, v)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return p


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")
    return v


# ----------------------------------------------------------------------------- 1. binarisation
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


def _linear(in_features: int, out_features: int, bias: bool, binary: bool) -> nn.Linear:
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


# ----------------------------------------------------------------------------- 2. PET modules
class _Bottleneck(nn.Module):
    """``up(dropout(relu(down(x))))``, ``dim -> hidden -> dim``; ``up`` zero-initialised (weight and
    bias) so a fresh bottleneck outputs zeros; ``binary=True``: BinaryLinear layers (FPET 1-bit)."""

    def __init__(self, dim: int, hidden: int, dropout: float, binary: bool, hidden_name: str):
        super().__init__()
        self.dim, hidden = _pos_int("dim", dim), _pos_int(hidden_name, hidden)
        self.binary = _bool("binary", binary)
        self.down = _linear(dim, hidden, True, binary)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(_prob("dropout", dropout))
        self.up = _linear(hidden, dim, True, binary)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class AdaptFormerAdapter(_Bottleneck):
    """AdaptFormer's parallel bottleneck adapter: ``scale * up(dropout(relu(down(x))))``.

    The block adds it beside the MLP, ``x + mlp(norm2(x)) + adapter(x)``; ``forward`` returns only the
    adapter branch. ``up`` is zero-initialised (weight and bias), so a fresh adapter outputs zeros and
    the model starts unchanged. ``binary=True`` makes ``down``/``up`` BinaryLinear (FPET 1-bit)."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0,
                 binary: bool = False):
        super().__init__(dim, bottleneck, dropout, binary, "bottleneck")
        self.bottleneck = bottleneck
        self.scale = _real("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) * self.scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={self.scale}, binary={self.binary}"


class LoRAQKV(nn.Module):
    """LoRA on a timm Attention's fused ``qkv`` linear (out = 3 * attn_dim), query and value only:
    ``q += scale * B_q A_q x``, ``v += scale * B_v A_v x``; keys are untouched.

    ``A`` is kaiming-uniform (nn.Linear's default), ``B`` zero, so the wrapped layer starts unchanged.
    The wrapped linear stays reachable as ``.base``; ``weight``/``bias``/``in_features``/
    ``out_features`` delegate to it, so code reading ``attn.qkv.weight`` still works (that is the
    frozen base weight; ``merged_weight()`` is the effective one). ``merge()`` folds the deltas into a
    plain ``nn.Linear`` for latency-free deployment."""

    def __init__(self, qkv: nn.Linear, rank: int = 8, scale: float = 1.0, binary: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(qkv, nn.Linear) or isinstance(qkv, LoRAQKV):
            raise TypeError(f"qkv must be an nn.Linear (a timm Attention's fused qkv), got {type(qkv).__name__}")
        if qkv.out_features % 3:
            raise ValueError(f"qkv must have out_features = 3 * attn_dim, got out_features={qkv.out_features}")
        self.rank, self.scale = _pos_int("rank", rank), _real("scale", scale)
        self.binary = _bool("binary", binary)
        self.base = qkv
        d, c = qkv.out_features // 3, qkv.in_features
        self.attn_dim = d
        self.lora_dropout = nn.Dropout(_prob("dropout", dropout))
        self.lora_A_q = _linear(c, rank, False, binary)
        self.lora_B_q = _linear(rank, d, False, binary)
        self.lora_A_v = _linear(c, rank, False, binary)
        self.lora_B_v = _linear(rank, d, False, binary)
        dd = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        for lin in (self.lora_A_q, self.lora_B_q, self.lora_A_v, self.lora_B_v):
            lin.to(**dd)
        nn.init.kaiming_uniform_(self.lora_A_q.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A_v.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B_q.weight)
        nn.init.zeros_(self.lora_B_v.weight)
        self._register_load_state_dict_pre_hook(self._load_plain_keys)

    def _load_plain_keys(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
        """A plain checkpoint (``qkv.weight``/``qkv.bias``, as timm saves it) loads into the wrapped
        ``base``; LoRA parameters absent from it keep their current values."""
        plain = [k for k in ("weight", "bias") if prefix + k in state_dict and prefix + "base." + k not in state_dict]
        if not plain:
            return
        for k in plain:
            state_dict[prefix + "base." + k] = state_dict.pop(prefix + k)
        for name, p in self.named_parameters():
            if not name.startswith("base.") and prefix + name not in state_dict:
                state_dict[prefix + name] = p.detach()

    # delegation to the wrapped linear
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield p

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        h = self.lora_dropout(x)
        d = self.attn_dim
        dq = self.lora_B_q(self.lora_A_q(h)) * self.scale
        dv = self.lora_B_v(self.lora_A_v(h)) * self.scale
        return torch.cat([out[..., :d] + dq, out[..., d:2 * d], out[..., 2 * d:] + dv], dim=-1)

    def delta_weight(self) -> Tensor:
        """``[3d, C]``: ``scale * B A`` in the q and v rows, zeros in the k rows (forward weights,
        i.e. binarised when ``binary``)."""
        def w(lin):
            return lin.binary_weight() if isinstance(lin, BinaryLinear) else lin.weight
        dq = (w(self.lora_B_q) @ w(self.lora_A_q)) * self.scale
        dv = (w(self.lora_B_v) @ w(self.lora_A_v)) * self.scale
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=0)

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new ``nn.Linear`` with the LoRA deltas folded into the weight (bias copied)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        out.weight.copy_(self.merged_weight())
        if b.bias is not None:
            out.bias.copy_(b.bias)
        out.weight.requires_grad_(b.weight.requires_grad)
        if b.bias is not None:
            out.bias.requires_grad_(b.bias.requires_grad)
        return out

    fold = merge

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, binary={self.binary}"


class RefinementAdapter(_Bottleneck):
    """FPET's refinement of the token-similarity metric at a merging layer: ``m + f(m)`` with
    ``m = metric.detach()`` (no gradient flows back into the backbone through the metric) and
    ``f = up(dropout(relu(down(m))))``, ``dim -> hidden -> dim``, 1-bit by default. ``up`` starts at
    zero, so the refined metric starts equal to the metric."""

    def __init__(self, dim: int = 64, hidden: int = 32, dropout: float = 0.1, binary: bool = True):
        super().__init__(dim, hidden, dropout, binary, "hidden")
        self.hidden = hidden

    def forward(self, metric: Tensor) -> Tensor:
        if not isinstance(metric, Tensor) or metric.dim() < 1 or metric.shape[-1] != self.dim:
            got = tuple(metric.shape) if isinstance(metric, Tensor) else type(metric).__name__
            raise ValueError(f"metric must be a tensor of shape [..., {self.dim}], got {got}")
        m = metric.detach()
        return m + self.branch(m)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, binary={self.binary}"


class PyraModulation(nn.Module):
    """PYRA's learned parameters for one merging layer: ``a`` ``[r, 1]`` (kaiming-uniform with
    ``a=sqrt(5)``, i.e. U(-1, 1) for fan-in 1), ``b`` ``[1, dim]`` (zeros) and ``norm`` =
    ``LayerNorm(dim)`` (``ln_weight``/``ln_bias``). ``forward`` runs ``fpet_kernels.pyra_merge``."""

    def __init__(self, r: int, dim: int, eps: float = 1e-5):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        self.r, self.dim = r, _pos_int("dim", dim)
        self.a = nn.Parameter(torch.empty(r, 1))
        self.b = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim, eps=_real("eps", eps))
        if r:
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    @property
    def ln_weight(self) -> Tensor:
        return self.norm.weight

    @property
    def ln_bias(self) -> Tensor:
        return self.norm.bias

    def forward(self, x: Tensor, metric: Tensor, size: Optional[Tensor] = None, class_token: bool = False,
                distill_token: bool = False, backend: Optional[str] = None, return_matching: bool = False):
        from ..ops.pyra import pyra_merge
        return pyra_merge(x, metric, self.r, self.a, self.b, self.norm.weight, self.norm.bias, size=size,
                          class_token=class_token, distill_token=distill_token, eps=self.norm.eps,
                          backend=backend, return_matching=return_matching)

    def extra_repr(self) -> str:
        return f"r={self.r}, dim={self.dim}"


#: Module types whose parameters are PET parameters (for LoRAQKV: all but the wrapped ``.base``).
PET_MODULES = (LoRAQKV, AdaptFormerAdapter, RefinementAdapter, PyraModulation)
#: Types added by other method modules (PaFi, HiWi, ...) through :func:`register_pet_module`.
_EXTRA_PET_TYPES: List[type] = []


def register_pet_module(cls: type) -> type:
    """Declare ``cls`` a PET module type. Its PET parameters are ``cls.pet_named_parameters(self)``
    when it defines that method (e.g. a linear layer whose own weight stays frozen), else all of them."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if cls not in _EXTRA_PET_TYPES and cls not in PET_MODULES:
        _EXTRA_PET_TYPES.append(cls)
    return cls


def _pet_types() -> tuple:
    return PET_MODULES + tuple(_EXTRA_PET_TYPES)


def is_pet_module(mod: nn.Module) -> bool:
    """True for an instance of a PET module type (built-in or registered)."""
    return isinstance(mod, _pet_types())


# ----------------------------------------------------------------------------- 3. model-level helpers
METHODS = ("lora", "adaptformer")
_METHOD_KW = {"lora": {"rank", "scale", "binary", "dropout"},
              "adaptformer": {"bottleneck", "scale", "binary", "dropout"}}


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The model's transformer blocks, checking they look like timm ``Block``s."""
    blocks = getattr(model, "blocks", None) if isinstance(model, nn.Module) else None
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"model must be a timm VisionTransformer (a module with .blocks of timm Blocks), "
                        f"got {type(model).__name__}")
    for i, blk in enumerate(blocks):
        qkv = getattr(getattr(blk, "attn", None), "qkv", None)
        if not isinstance(qkv, (nn.Linear, LoRAQKV)) or not hasattr(blk, "mlp") or not hasattr(blk, "norm2"):
            raise TypeError(f"model is not supported: model.blocks[{i}] ({type(blk).__name__}) needs .attn.qkv "
                            "(nn.Linear), .mlp and .norm2 like a timm Block")
    return list(blocks)


def _ensure_block():
    try:
        patch = importlib.import_module("fpet_kernels.patch")
    except ImportError as e:
        raise RuntimeError("method='adaptformer' needs fpet_kernels.patch.ensure_block, which is not available") from e
    fn = getattr(patch, "ensure_block", None)
    if fn is None:
        raise RuntimeError("method='adaptformer' needs fpet_kernels.patch.ensure_block, which is not available")
    return fn


#: Methods defined in other modules of this package (PaFi, HiWi, X-PEFT, ...): name -> (apply function,
#: accepted keyword arguments). Each such module calls :func:`register_method` when imported.
_REGISTERED: Dict[str, Tuple[object, frozenset]] = {}


def register_method(name: str, fn, accepted_kw) -> None:
    """Make ``pet.apply(model, name, **kw)`` call ``fn(model, **kw)`` (kw checked against ``accepted_kw``)."""
    if name in METHODS or name in _REGISTERED:
        raise ValueError(f"PET method {name!r} is already registered")
    _REGISTERED[name] = (fn, frozenset(accepted_kw))


def methods() -> Tuple[str, ...]:
    """Every method name :func:`apply` accepts."""
    return METHODS + tuple(_REGISTERED)


def apply(model: nn.Module, method: str, **kw) -> nn.Module:
    """Add PET modules to a timm VisionTransformer in place and return it.

    * ``method="lora"``: every ``blk.attn.qkv`` becomes a :class:`LoRAQKV` (kw: rank=8, scale=1.0,
      binary=False, dropout=0.0);
    * ``method="adaptformer"``: every block gets ``blk.fk_adapter = AdaptFormerAdapter(dim, ...)`` (kw:
      bottleneck=64, scale=0.1, binary=False, dropout=0.0) and is patched by
      ``fpet_kernels.patch.ensure_block`` to add it beside the MLP.

    Does not change ``requires_grad``: call :func:`mark_trainable` next."""
    if isinstance(method, str) and method in _REGISTERED:
        fn, accepted = _REGISTERED[method]
        unknown = set(kw) - accepted
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) for method={method!r}: {sorted(unknown)}; "
                            f"accepted: {sorted(accepted)}")
        return fn(model, **kw)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {methods()}, got {method!r}")
    unknown = set(kw) - _METHOD_KW[method]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for method={method!r}: {sorted(unknown)}; "
                        f"accepted: {sorted(_METHOD_KW[method])}")
    blocks = _blocks(model)
    if method == "lora":
        if any(isinstance(blk.attn.qkv, LoRAQKV) for blk in blocks):
            raise ValueError("model already has LoRA (attn.qkv is a LoRAQKV); method='lora' was applied twice")
        held = [i for i, blk in enumerate(blocks) if any(is_pet_module(m) for m in blk.attn.qkv.modules())
                or type(blk.attn.qkv).__name__ == "HiWiLinear"]
        if held:  # wrapping a PaFi / HiWi layer would leave its trained state untrained and unsaved
            raise ValueError(f"method='lora' would wrap blocks[{held[0]}].attn.qkv, which another PET method holds "
                             f"({type(blocks[held[0]].attn.qkv).__name__}): PET methods do not stack on one layer; "
                             "pet.fold(model) first")
        new = [LoRAQKV(blk.attn.qkv, **kw) for blk in blocks]  # build all first: no half-applied model on error
        for blk, q in zip(blocks, new):
            blk.attn.qkv = q
    else:
        if any(hasattr(blk, "fk_adapter") for blk in blocks):
            raise ValueError("model already has adapters (blk.fk_adapter); method='adaptformer' was applied twice")
        ensure_block = _ensure_block()
        ref = blocks[0].attn.qkv.weight
        new = [AdaptFormerAdapter(blk.attn.qkv.in_features, **kw).to(device=ref.device, dtype=ref.dtype)
               for blk in blocks]
        for blk, ad in zip(blocks, new):
            blk.fk_adapter = ad
            ensure_block(blk)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRAQKV` in ``model`` by its folded ``nn.Linear`` (in place); returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, LoRAQKV)]
    for parent, name, child in targets:
        setattr(parent, name, child.merge())
    return model


def _pet_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Outermost PET modules of ``model`` (a PET module nested in another is covered by its parent)."""
    types = _pet_types()
    if isinstance(model, types):
        yield "", model
        return
    found: List[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, types) and not any(name.startswith(f + ".") for f in found) \
                and not _peft.is_frozen_copy(name):  # PEFT's frozen original of a modules_to_save copy
            found.append(name)
            yield name, mod


def _own_parameters(mod: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """A PET module's own parameters: all of them, except a LoRAQKV's wrapped base (and what a
    registered type's ``pet_named_parameters`` leaves out)."""
    if hasattr(mod, "pet_named_parameters"):
        yield from mod.pet_named_parameters()
        return
    for name, p in mod.named_parameters():
        if isinstance(mod, LoRAQKV) and name.startswith("base."):
            continue
        yield name, p


def pet_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The PET parameters of ``model`` (identified by module type, see ``PET_MODULES``), deduplicated."""
    seen, out = set(), []
    for _, mod in _pet_modules(model):
        for _, p in _own_parameters(mod):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


#: The task heads :func:`mark_trainable` trains and ``pet.save`` stores: timm's ``head``, ``head_dist``
#: (DeiT distilled), ``attn_pool`` (SigLIP / MAP pooling) and ``fc_norm`` (what ``reset_classifier``
#: replaces), and Hugging Face's ``classifier`` (BERT/RoBERTa/ViT ``*ForSequenceClassification`` /
#: ``*ForImageClassification``) and ``score``. Attributes of the model itself only; a pre-trained
#: ``pooler`` is part of the backbone and stays frozen.
HEAD_NAMES = ("head", "head_dist", "attn_pool", "fc_norm", "classifier", "score")


def heads(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` for the heads of ``model`` among :data:`HEAD_NAMES` that hold parameters."""
    out = {}
    for name in HEAD_NAMES:
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module) and any(True for _ in mod.parameters()):
            out[name] = mod
    return out


def mark_trainable(model: nn.Module, train_head: bool = True) -> nn.Module:
    """Freeze everything except the PET parameters (LoRA, adapters, PaFi's deltas, HiWi's adapters, ...)
    and, when ``train_head``, every head of the model (:data:`HEAD_NAMES`); returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _bool("train_head", train_head)
    found = heads(model)
    if train_head and not found:
        raise ValueError(f"train_head=True but model ({type(model).__name__}) has none of the heads {HEAD_NAMES}; "
                         "pass train_head=False")
    model.requires_grad_(False)
    for p in pet_parameters(model) + _peft.peft_trainable_parameters(model):  # + a PeftModel's adapters
        p.requires_grad_(True)
    if train_head:
        for mod in found.values():
            mod.requires_grad_(True)
    return model


#: Functions that write one method's trained state into the backbone's own modules (see :func:`fold`).
_FOLDERS: List[object] = []


def register_folder(fn) -> None:
    """Make :func:`fold` call ``fn(model)`` (PaFi, HiWi and other weight-side methods register one)."""
    if fn not in _FOLDERS:
        _FOLDERS.append(fn)


def fold(model: nn.Module) -> nn.Module:
    """Write every foldable PET method into the backbone's weights, in place: LoRA (``merge_lora``), PaFi
    deltas, HiWi adapters. Afterwards those layers are plain ``nn.Linear`` again: the module types and
    the forward are the backbone's. Returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for fn in _FOLDERS:
        fn(model)
    return merge_lora(model)


def parameter_report(model: nn.Module) -> Dict[str, object]:
    """Parameter counts and the storage size of the PET part.

    Keys: ``total_params``, ``trainable_params``, ``pet_params``, ``binary_params`` (PET weights stored
    at 1 bit), ``pet_bytes`` (stored size: a BinaryLinear weight is ``ceil(n/8)`` bytes of sign bits
    plus two float32 (mu, sigma), everything else, binary biases included, 4 bytes a parameter),
    ``pet_bytes_fp32`` (the same parameters at 4 bytes each), ``head_params``, and ``by_type``
    ({module type: (count, params, bytes)})."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    seen = set()
    pet_params = binary_params = pet_bytes = 0
    by_type: Dict[str, List[int]] = {}
    for _, mod in _pet_modules(model):
        binary_w = {id(m.weight) for m in mod.modules() if isinstance(m, BinaryLinear)}
        n_mod = b_mod = 0
        for _, p in _own_parameters(mod):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n_mod += p.numel()
            if id(p) in binary_w:
                binary_params += p.numel()
                b_mod += (p.numel() + 7) // 8 + 2 * 4
            else:
                b_mod += 4 * p.numel()
        pet_params += n_mod
        pet_bytes += b_mod
        entry = by_type.setdefault(type(mod).__name__, [0, 0, 0])
        entry[0] += 1
        entry[1] += n_mod
        entry[2] += b_mod
    for name, (count, n_mod, b_mod) in _peft.peft_report(model, seen).items():  # a PeftModel's LoRA etc.
        pet_params, pet_bytes = pet_params + n_mod, pet_bytes + b_mod
        by_type[name] = [count, n_mod, b_mod]
    head_params = sum(p.numel() for mod in heads(model).values() for p in mod.parameters())
    return dict(total_params=total, trainable_params=trainable, pet_params=pet_params, binary_params=binary_params,
                pet_bytes=pet_bytes, pet_bytes_fp32=4 * pet_params, head_params=head_params,
                by_type={k: tuple(v) for k, v in by_type.items()})


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def format_report(report: Dict[str, object]) -> str:
    """A human-readable summary of :func:`parameter_report`'s dict."""
    if not isinstance(report, dict) or "total_params" not in report:
        raise TypeError("report must be the dict returned by parameter_report")
    total, trainable = report["total_params"], report["trainable_params"]
    pct = 100.0 * trainable / total if total else 0.0
    lines = [f"total params      {total:,}",
             f"trainable params  {trainable:,} ({pct:.2f}%)",
             f"PET params        {report['pet_params']:,} ({report['binary_params']:,} stored at 1 bit)",
             f"PET storage       {_fmt_bytes(report['pet_bytes'])} (fp32: {_fmt_bytes(report['pet_bytes_fp32'])})",
             f"head params       {report['head_params']:,}"]
    for name, (count, n, b) in sorted(report["by_type"].items()):
        lines.append(f"  {name:<20} x{count:<4} {n:>12,} params  {_fmt_bytes(b):>10}")
    return "\n".join(lines)
