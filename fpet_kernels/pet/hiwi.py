"""HiWi (Liao, Meng, Monz, ACL 2023): an adapter fed the pre-trained weights or biases instead of the
hidden states, folded away after training, so inference is the backbone's.

    pet.apply(model, "hiwi", rank=8, targets="ffn_bias")   # or "ffn_weight", "ffn", or regex patterns
    pet.mark_trainable(model)                             # the adapters (+ heads) train
    ...train...
    pet.fold(model)                                       # P <- P + f(P); plain nn.Linear layers again

For a target tensor ``P``: ``P' = P + f(P)``, a bottleneck adapter (down-projection with bias, ReLU,
up-projection) on the last dimension (n entries)::

    x    = v / rms(v)                                  (unit root-mean-square; a zero v stays 0)
    f(v) = ReLU(x @ W_down / n + b_down) @ W_up / rank

``W_down`` [n, rank] (uniform, so that ``x @ W_down / n`` has standard deviation 1/4), ``b_down`` = 1
(every unit starts active), ``W_up`` [rank, n] zeros (the model starts unchanged). A bias vector is one
vector (n = out_features); a weight matrix [out, in] is adapted row-wise (n = in_features). ``P'`` is
computed once per forward per target, never per token.

Why normalised and scaled (docs/pafi_hiwi.md, "Why HiWi's units stayed alive"): a bias target is *one*
input vector, so every gradient step of an element-wise optimiser (Adam) moves all n weights of a
down-projection column in the same direction, and the unit's pre-activation by ``lr * sum|x|``. With the
plain ``ReLU(v @ W_down) @ W_up`` that step was about 20x the pre-activation's size on MiniLM at lr 1e-2:
every unit was thrown below zero within two steps and, ReLU being flat there, never came back. With the
input at unit RMS and the ``1/n``, one Adam step moves a pre-activation by at most about ``2 * lr``
(``lr * mean|x| <= lr`` through ``W_down``, ``lr`` through ``b_down``) from its start at 1; the ``1/rank``
keeps one step of the delta itself at about ``lr`` per entry, as if the entries were tuned directly.

Targets: ``"ffn_bias"`` (default: the biases of the feed-forward nn.Linear layers of every block, see
``_targets.FFN_PATTERN``), ``"ffn1_bias"`` (the bias of the first feed-forward layer of every block only:
timm ``mlp.fc1``, BERT ``intermediate.dense``), ``"ffn_weight"``, ``"ffn"`` (both), or regex patterns matched against the
qualified *parameter* names (e.g. ``r"mlp\\.fc1\\.bias$"``) of the block nn.Linear layers. A target that is all
zero (the feed-forward biases of a randomly initialised timm ViT or BERT) gives the adapter no input: its
delta is then a trained constant, ``ReLU(b_down) @ W_up / rank``, which still learns; ``apply`` warns once
naming such targets. A target holding NaN or inf is refused.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _targets
from .registry import Method, MethodState, register, register_pet_module

__all__ = ["HiWiAdapter", "HiWiLinear", "apply_hiwi", "fold_hiwi", "hiwi_modules", "TARGETS"]

TARGETS = ("ffn_bias", "ffn1_bias", "ffn_weight", "ffn")


#: Standard deviation of the input's share of a pre-activation at initialisation (``x @ W_down / n``);
#: with ``b_down`` = 1 a unit starts inactive only 4 standard deviations out (about 3e-5 of them).
INIT_INPUT_STD = 0.25


def _unit_rms(v: Tensor) -> Tensor:
    """``v / rms(v)`` over the last dimension (sums in float32 for half inputs); a zero row stays zero."""
    ms = v.float().pow(2).mean(-1, keepdim=True)
    return v * torch.rsqrt(ms.clamp_min(torch.finfo(torch.float32).tiny)).to(v.dtype)


@register_pet_module
class HiWiAdapter(nn.Module):
    """``f(v) = ReLU(x @ down / dim + down_bias) @ up / rank`` with ``x = v / rms(v)`` on the last dimension
    (``dim``): ``down`` [dim, rank], ``down_bias`` [rank] (ones), ``up`` [rank, dim] (zeros). See the module doc."""

    def __init__(self, dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.down = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.ones(rank, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(rank, dim, device=device, dtype=dtype))
        # x @ down / dim over a unit-RMS x has standard deviation bound * sqrt(dim / 3) / dim = INIT_INPUT_STD
        bound = INIT_INPUT_STD * math.sqrt(3.0 * dim)
        nn.init.uniform_(self.down, -bound, bound)

    def hidden(self, v: Tensor) -> Tensor:
        """The units' pre-activations ``x @ down / dim + down_bias`` (``[..., rank]``; > 0: active)."""
        return _unit_rms(v) @ self.down * (1.0 / self.dim) + self.down_bias

    def forward(self, v: Tensor) -> Tensor:
        return F.relu(self.hidden(v)) @ self.up * (1.0 / self.rank)

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

    def active_units(self) -> Dict[str, int]:
        """``{"weight": k, "bias": k}`` for the targets: how many of the ``rank`` units have a positive
        pre-activation (for at least one row of a weight). An inactive ReLU unit gets no gradient."""
        with torch.no_grad():
            out = {}
            if self.hiwi_weight is not None:
                out["weight"] = int((self.hiwi_weight.hidden(self.weight) > 0).any(0).sum())
            if self.hiwi_bias is not None:
                out["bias"] = int((self.hiwi_bias.hidden(self.bias) > 0).sum())
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
    found = _resolve(model, targets)
    _check_targets(found)
    new = [(n, HiWiLinear(lin, rank, w, b)) for n, lin, w, b in found]
    return _targets.replace_modules(model, new)


def _check_targets(found) -> None:
    """Refuse non-finite targets; warn once about all-zero ones (the adapter then has no input)."""
    zero = []
    for n, lin, w, b in found:
        for which, p in (("weight", lin.weight if w else None), ("bias", lin.bias if b else None)):
            if p is None or p.device.type == "meta":
                continue
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"targets: {n}.{which} holds NaN or inf values; HiWi feeds the target to its "
                                 "adapter and would make every delta NaN")
            if not bool(p.any()):
                zero.append(f"{n}.{which}")
    if zero:
        n_targets = sum(bool(w) + bool(b) for _, _, w, b in found)
        names = ", ".join(zero[:3]) + (", ..." if len(zero) > 3 else "")
        warnings.warn(f"HiWi: {len(zero)} of {n_targets} targets are all zero ({names}), so their adapters get "
                      "no input: each of those deltas is a trained constant (ReLU(b_down) @ W_up / rank), i.e. the "
                      "target tuned directly. Expected on a randomly initialised model (zero biases); on a "
                      "pre-trained one, choose other targets (e.g. targets=\"ffn_weight\").", stacklevel=4)


def fold_hiwi(model: nn.Module) -> nn.Module:
    """Write ``P + f(P)`` into every HiWi target and drop the adapters: plain ``nn.Linear`` layers again."""
    return _targets.fold_modules(model, hiwi_modules(model))


# ----------------------------------------------------------------------------- pet.save / pet.load
#: Attribute set on a model by ``pet.load`` of a HiWi task: the pre-trained target tensors (so the next
#: task is ``P0 + delta``). A plain dict on the model object, not a buffer: the module tree is unchanged.
HIWI_BASE_ATTR = "_fk_hiwi_base"


def _tensor_fingerprint(t: Tensor) -> str:
    return hashlib.sha256(t.detach().double().cpu().contiguous().numpy().tobytes()).hexdigest()


def _state_targets(model: nn.Module) -> Dict[str, Tensor]:
    """``{qualified param name: parameter}`` of the HiWi targets: of the HiWi layers, or of a previous load."""
    out = {}
    for n, m in hiwi_modules(model):
        if m.hiwi_weight is not None:
            out[f"{n}.weight"] = m.weight
        if m.hiwi_bias is not None:
            out[f"{n}.bias"] = m.bias
    base = getattr(model, HIWI_BASE_ATTR, None)
    if base:
        params = dict(model.named_parameters())
        out.update({k: params[k] for k in base if k in params})
    return out


def _save_state(model: nn.Module, tensors: Dict[str, Tensor]) -> Dict[str, str]:
    """``hiwi/<param>``: the folded deltas ``f(P)`` of the targets; the metadata: each target's fingerprint."""
    entry = {}
    for n, m in hiwi_modules(model):
        for which, delta in m.deltas().items():
            key = f"{n}.{which}"
            tensors[f"hiwi/{key}"] = delta.contiguous()
            entry[key] = _tensor_fingerprint(getattr(m, which))
    base = getattr(model, HIWI_BASE_ATTR, None) or {}
    params = dict(model.named_parameters())
    for key, p0 in base.items():
        if key not in entry:
            tensors[f"hiwi/{key}"] = (params[key].detach() - p0).contiguous()
            entry[key] = _tensor_fingerprint(p0)
    return entry


def _refuse_adapters(model: nn.Module, entry) -> None:
    if hiwi_modules(model) and entry:
        raise ValueError("model has unfolded HiWi adapters; a task file holds folded deltas: load it into the "
                         "plain pre-trained backbone")


def _check_state(model: nn.Module, tensors: Dict[str, Tensor], entry, path) -> None:
    if not entry:
        return
    params_all = dict(model.named_parameters())
    base = getattr(model, HIWI_BASE_ATTR, None) or {}
    for key, fph in entry.items():
        if key not in params_all:
            raise ValueError(f"HiWi target {key} of {path} is not a parameter of {type(model).__name__}")
        p0 = base.get(key, params_all[key])
        if tuple(tensors[f"hiwi/{key}"].shape) != tuple(p0.shape) or _tensor_fingerprint(p0) != fph:
            raise ValueError(f"HiWi target {key}: the model's pre-trained tensor differs from the one the task "
                             "was trained on (another backbone)")
    other = set(base) - set(entry)
    if other:
        raise ValueError(f"model holds another HiWi task's targets {sorted(other)[:5]} that {path} does not set")


def _write_state(model: nn.Module, tensors: Dict[str, Tensor], entry) -> None:
    if not entry:
        return
    params = dict(model.named_parameters())
    base = getattr(model, HIWI_BASE_ATTR, None)
    if base is None:
        base = {}
        object.__setattr__(model, HIWI_BASE_ATTR, base)
    for key in entry:
        p = params[key]
        if key not in base:
            base[key] = p.detach().clone()
        p.copy_(base[key] + tensors[f"hiwi/{key}"].to(p.device, p.dtype))


register(Method("hiwi", apply_hiwi, frozenset({"rank", "targets"}), fold=fold_hiwi,
                state=MethodState(modules=hiwi_modules, save=_save_state, check=_check_state, write=_write_state,
                                  own_types=(HiWiAdapter,), precheck=_refuse_adapters,
                                  present=lambda model: bool(hiwi_modules(model) or getattr(model, HIWI_BASE_ATTR,
                                                                                                None)),
                                  changed=lambda model: {id(p) for p in _state_targets(model).values()},
                                  skip_names=lambda entry: set(entry or ()))))
