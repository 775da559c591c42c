"""HiWi (Liao, Meng, Monz, ACL 2023): an adapter fed the pre-trained weights or biases instead of the
hidden states, folded away after training, so inference is the backbone's.

    pet.apply(model, "hiwi", rank=8, targets="ffn_bias")   # or "ffn_weight", "ffn", or regex patterns
    pet.mark_trainable(model)                             # the adapters (+ heads) train
    ...train...
    pet.fold(model)                                       # P <- P + f(P); plain nn.Linear layers again

For a target tensor ``P``: ``P' = P + f(P)``, ``f(v) = ReLU(v W_down) W_up`` with ``W_down`` [n, rank]
(kaiming-uniform) and ``W_up`` [rank, n] (zeros: the model starts unchanged). A bias vector is one
vector (n = out_features); a weight matrix [out, in] is adapted row-wise (n = in_features). ``P'`` is
computed once per forward per target, never per token.

Targets: ``"ffn_bias"`` (default: the biases of the feed-forward nn.Linear layers of every block, see
``_targets.FFN_PATTERN``), ``"ffn1_bias"`` (the bias of the first feed-forward layer of every block only:
timm ``mlp.fc1``, BERT ``intermediate.dense``), ``"ffn_weight"``, ``"ffn"`` (both), or regex patterns matched against the
qualified *parameter* names (e.g. ``r"mlp\\.fc1\\.bias$"``) of the block nn.Linear layers.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _targets
from .modules import register_folder, register_method, register_pet_module

__all__ = ["HiWiAdapter", "HiWiLinear", "apply_hiwi", "fold_hiwi", "hiwi_modules", "TARGETS"]

TARGETS = ("ffn_bias", "ffn1_bias", "ffn_weight", "ffn")


@register_pet_module
class HiWiAdapter(nn.Module):
    """``f(v) = ReLU(v @ down) @ up`` on the last dimension (``dim``): ``down`` [dim, rank], ``up`` [rank, dim]."""

    def __init__(self, dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.down = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(rank, dim, device=device, dtype=dtype))
        # kaiming-uniform over fan-in dim, as nn.Linear(dim, rank) would initialise its weight
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.down, -bound, bound)

    def forward(self, v: Tensor) -> Tensor:
        return F.relu(v @ self.down) @ self.up

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"


class HiWiLinear(nn.Linear):
    """``nn.Linear`` (sharing the original ``weight``/``bias`` Parameters) whose forward uses
    ``weight + hiwi_weight(weight)`` and/or ``bias + hiwi_bias(bias)`` (None where not a target)."""

    def __init__(self, linear: nn.Linear, rank: int, weight: bool, bias: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        dd = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.hiwi_weight = HiWiAdapter(self.in_features, rank, **dd) if weight else None
        self.hiwi_bias = HiWiAdapter(self.out_features, rank, **dd) if bias else None
        self._register_load_state_dict_pre_hook(self._keep_adapters)

    def _keep_adapters(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A plain checkpoint (``weight``/``bias`` only) loads; the adapters keep their current values."""
        if prefix + "weight" in state_dict:
            for name, p in self.named_parameters():
                if name.startswith("hiwi_") and prefix + name not in state_dict:
                    state_dict[prefix + name] = p.detach()

    def adapted(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight', bias')``: the tensors the forward uses."""
        w, b = self.weight, self.bias
        if self.hiwi_weight is not None:
            w = w + self.hiwi_weight(w)
        if self.hiwi_bias is not None:
            b = b + self.hiwi_bias(b.unsqueeze(0)).squeeze(0)
        return w, b

    def deltas(self) -> Dict[str, Tensor]:
        """``{"weight": f(W), "bias": f(b)}`` for the targets (what folding adds, detached)."""
        with torch.no_grad():
            out = {}
            if self.hiwi_weight is not None:
                out["weight"] = self.hiwi_weight(self.weight)
            if self.hiwi_bias is not None:
                out["bias"] = self.hiwi_bias(self.bias.unsqueeze(0)).squeeze(0)
            return out

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.adapted()
        return F.linear(x, w, b)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing the Parameters, with ``P <- P + f(P)`` written in place."""
        w, b = self.adapted()  # both computed before either is written
        self.weight.copy_(w)
        if self.bias is not None:
            self.bias.copy_(b)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


def hiwi_modules(model: nn.Module) -> List[Tuple[str, HiWiLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HiWiLinear)]


def _resolve(model: nn.Module, targets) -> List[Tuple[str, nn.Linear, bool, bool]]:
    """``(name, linear, adapt weight, adapt bias)`` per target layer."""
    if isinstance(targets, str) and targets in TARGETS:
        found = (_targets.first_ffn_linears(model) if targets == "ffn1_bias"
                 else _targets.block_linears(model, "ffn"))
        w, b = targets in ("ffn_weight", "ffn"), targets in ("ffn_bias", "ffn1_bias", "ffn")
        out = [(n, lin, w, b and lin.bias is not None) for n, lin in found]
        out = [t for t in out if t[2] or t[3]]
    else:
        pats = [targets] if isinstance(targets, str) else targets
        if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) for p in pats):
            raise TypeError(f"targets must be one of {TARGETS} or a list of regex strings, got {targets!r}")
        try:
            compiled = [re.compile(p) for p in pats]
        except re.error as e:
            raise ValueError(f"targets holds an invalid regular expression: {e}") from e
        out = []
        for n, lin in _targets.block_linears(model):
            w = any(c.search(n + ".weight") for c in compiled)
            b = lin.bias is not None and any(c.search(n + ".bias") for c in compiled)
            if w or b:
                out.append((n, lin, w, b))
    if not out:
        raise ValueError(f"no eligible module: targets={targets!r} matches no weight or bias of the nn.Linear "
                         f"layers in the blocks of {type(model).__name__}")
    return out


def apply_hiwi(model: nn.Module, rank: int = 8, targets: Union[str, Sequence[str]] = "ffn_bias") -> nn.Module:
    """``pet.apply(model, "hiwi", ...)``: every target layer becomes a :class:`HiWiLinear` (see the module doc)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if hiwi_modules(model):
        raise ValueError("model already has HiWi layers; method='hiwi' was applied twice")
    new = [(n, HiWiLinear(lin, rank, w, b)) for n, lin, w, b in _resolve(model, targets)]
    return _targets.replace_modules(model, new)


def fold_hiwi(model: nn.Module) -> nn.Module:
    """Write ``P + f(P)`` into every HiWi target and drop the adapters: plain ``nn.Linear`` layers again."""
    return _targets.fold_modules(model, hiwi_modules(model))


register_method("hiwi", apply_hiwi, {"rank", "targets"})
register_folder(fold_hiwi)
