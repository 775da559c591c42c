"""X-PEFT (Kwak and Kim, arXiv 2401.16137): per-profile masks over a shared bank of adapters.

    from fpet_kernels import pet
    pet.apply(model, "xpeft", adapters=64, rank=16, seed=0, mask="hard", k=4)   # or bank=[...]
    pet.add_profile(model, "alice")                # new mask logits [2, L, N]
    params = pet.train_profile(model, "alice")     # freeze everything else; optimise params (+ your head)
    pet.set_profiles(model, ["alice", "bob", "alice"])   # one name per batch row (or one name for all)
    out = model(x)                                 # one fused op per layer serves the mixed batch
    pet.save_profile(model, "alice", "alice.safetensors"); pet.load_profile(model, "carol", path)

What is built (choices the paper leaves open are marked *):
  * per layer a bank of N bottleneck adapters ``down_i`` [d, r], ``down_bias_i`` [r], ``up_i`` [r, d],
    ``up_bias_i`` [d]; the adapter of a profile is the combination ``down = sum_i w_A,i down_i`` (and
    its bias), ``up = sum_i w_B,i up_i`` (and its bias), applied as one adapter
    ``scale * (relu(h @ down + down_bias) @ up + up_bias)``;
  * mask logits per profile ``M`` [2, L, N] (``M[0]`` = M_A for the down-projections, ``M[1]`` = M_B
    for the up-projections); ``mask="soft"``: ``w = softmax(M / tau)``; ``mask="hard"``: forward
    ``w = topk_mask(M, k) / k``, backward straight-through to ``softmax(M / tau)``;
  * a random bank (``seed=``) is regenerated from its seed: its buffers are not in the state dict*;
    down-projections U(-1/sqrt(d), 1/sqrt(d)), up-projections U(-1/sqrt(r), 1/sqrt(r)), biases zero,
    ``scale`` 0.1 by default*;
  * a trained bank (``bank=``) is a list of N sources, each one adapter per layer: a model holding
    AdaptFormer adapters (``pet.apply(m, "adaptformer")``, its ``scale`` folded into the up weights),
    a list of L such adapter modules (``.down``/``.up`` linears), or a dict of tensors ``down``
    [L, N, d, r], ``down_bias`` [L, N, r], ``up`` [L, N, r, d], ``up_bias`` [L, N, d]; ``scale`` 1.0 by
    default; saved in the state dict;
  * placement*: timm ViTs: parallel to the MLP, on the block input (AdaptFormer's place, so
    AdaptFormer adapters form a trained bank as they were trained): ``x + mlp(norm2(x)) + adapter(x)``;
    Hugging Face BERT-style encoders (BERT, MiniLM, RoBERTa, ...): sequential on the feed-forward
    output, before its residual LayerNorm: ``LN(h + adapter(h) + input)``, ``h = dropout(dense(...))``
    (the adapter wraps ``layer.output.dense``, so it acts before the dropout; the same at eval).

Profiles in a batch: :func:`set_profiles` stores the list of profile *names* (plain Python, no
tensors). At each adapter site, the forward builds from it the int64 index tensor [B] and the
combined adapters of the profiles present, and calls ``fpet_kernels.ops.xpeft.xpeft_adapter``: one
fused op for the whole mixed batch. Nothing computed in a forward is kept for the next one except
the cache of combined adapters used when no gradient is needed (keyed by the profiles present and
the version counters of their logits and of the bank, so an optimiser step or a load invalidates
it; emptied on deepcopy/pickle). With gradients enabled the combination runs in the forward and
autograd carries ``dL/dw_i = <dL/d down, down_i>`` to the mask logits.

Stored per profile (:func:`save_profile`, a safetensors file): hard masks as packed bits,
``ceil(2 * L * N / 8)`` bytes (which k adapters each layer's down and up combination selects),
soft masks as float16 logits, a small JSON header (bank fingerprint, L, N, mask kind, k, tau) and
optionally the tensors of a head module.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..ops.xpeft import xpeft_adapter
from ..layers import check_bool, check_pos_int, check_real
from ..patch import ensure_block
from .adaptformer import AdaptFormerAdapter
from .registry import Method, register

__all__ = ["XPeft", "XPeftSite", "apply_xpeft", "add_profile", "remove_profile", "profile_names", "set_profiles",
           "train_profile", "mask_weights", "save_profile", "load_profile", "profile_bytes"]

FORMAT = "fpet-xpeft-profile/1"
MASKS = ("hard", "soft")
_CACHE_SIZE = 8
_NAME = re.compile(r"^[^.]+$")


# ----------------------------------------------------------------------------- mask weights
def mask_weights(logits: Tensor, mask: str, k: int, tau: float) -> Tensor:
    """Mixing weights over the bank (last dim N) from mask logits. ``soft``: ``softmax(logits / tau)``;
    ``hard``: ``1/k`` on the top-k logits, 0 elsewhere, with the gradient of the soft weights
    (straight-through; the forward value is exactly ``topk_mask / k``)."""
    soft = torch.softmax(logits.float() / tau, dim=-1)
    if mask == "soft":
        return soft.to(logits.dtype)
    hard = torch.zeros_like(soft).scatter_(-1, logits.detach().topk(k, dim=-1).indices, 1.0 / k)
    return (hard + (soft - soft.detach())).to(logits.dtype)


def _topk_bits(logits: Tensor, k: int) -> Tensor:
    """Boolean [.., N]: the adapters a hard mask selects."""
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(
        -1, logits.detach().topk(k, dim=-1).indices, True)


# ----------------------------------------------------------------------------- the bank
def _random_bank(layers: int, n: int, dim: int, rank: int, seed: int) -> Dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    down = (torch.rand(layers, n, dim, rank, generator=g) * 2 - 1) / math.sqrt(dim)
    up = (torch.rand(layers, n, rank, dim, generator=g) * 2 - 1) / math.sqrt(rank)
    return dict(down=down, down_bias=torch.zeros(layers, n, rank), up=up, up_bias=torch.zeros(layers, n, dim))


def _adapter_modules(src) -> List[nn.Module]:
    """The per-layer adapters of one bank source (a model holding AdaptFormer adapters, or a list)."""
    if isinstance(src, (list, tuple, nn.ModuleList)):
        mods = list(src)
    elif isinstance(src, nn.Module):
        mods = [m for m in src.modules() if isinstance(m, AdaptFormerAdapter)]
    else:
        raise TypeError(f"bank sources must be models with AdaptFormer adapters or lists of adapter modules, "
                        f"got {type(src).__name__}")
    for i, m in enumerate(mods):
        if not (isinstance(getattr(m, "down", None), nn.Linear) and isinstance(getattr(m, "up", None), nn.Linear)):
            raise TypeError(f"bank adapter {i} ({type(m).__name__}) needs .down and .up nn.Linear layers")
        if getattr(m, "binary", False):
            raise ValueError("bank adapters must be full precision (binary=False)")
    return mods


def _trained_bank(bank, layers: int, dim: int) -> Dict[str, Tensor]:
    """Bank tensors [L, N, ...] in float32 from ``bank`` (see the module docstring)."""
    if isinstance(bank, dict):
        need = {"down": 4, "down_bias": 3, "up": 4, "up_bias": 3}
        if set(bank) != set(need):
            raise ValueError(f"bank dict must have exactly the keys {sorted(need)}, got {sorted(bank)}")
        out = {}
        for key, nd in need.items():
            t = bank[key]
            if not isinstance(t, Tensor) or t.dim() != nd or not t.is_floating_point():
                raise ValueError(f"bank[{key!r}] must be a floating {nd}-D tensor")
            out[key] = t.detach().float().cpu()
        ln, n, d, r = out["down"].shape
        want = dict(down=(layers, n, dim, r), down_bias=(layers, n, r), up=(layers, n, r, dim),
                    up_bias=(layers, n, dim))
        for key, shape in want.items():
            if tuple(out[key].shape) != shape:
                raise ValueError(f"bank[{key!r}] must have shape {shape} for a model with {layers} layers of "
                                 f"width {dim}, got {tuple(out[key].shape)}")
        return out
    if not isinstance(bank, (list, tuple)) or not bank:
        raise TypeError("bank must be a non-empty list of adapter sources or a dict of tensors")
    per_source = [_adapter_modules(s) for s in bank]
    rank = None
    layer_rows: Dict[str, List[List[Tensor]]] = {k: [] for k in ("down", "down_bias", "up", "up_bias")}
    for j, mods in enumerate(per_source):
        if len(mods) != layers:
            raise ValueError(f"bank source {j} has {len(mods)} adapters, the model has {layers} layers")
        rows = {k: [] for k in layer_rows}
        for i, m in enumerate(mods):
            dn, upl = m.down, m.up
            if dn.in_features != dim or upl.out_features != dim or dn.out_features != upl.in_features:
                raise ValueError(f"bank source {j}, layer {i}: adapter {dim} -> r -> {dim} expected, got "
                                 f"{dn.in_features} -> {dn.out_features} -> {upl.out_features}")
            rank = dn.out_features if rank is None else rank
            if dn.out_features != rank:
                raise ValueError(f"bank adapters must share one rank: {rank} and {dn.out_features}")
            s = float(getattr(m, "scale", 1.0))
            zero_r, zero_d = torch.zeros(rank), torch.zeros(dim)
            rows["down"].append(dn.weight.detach().float().cpu().t())
            rows["down_bias"].append(zero_r if dn.bias is None else dn.bias.detach().float().cpu())
            rows["up"].append(upl.weight.detach().float().cpu().t() * s)
            rows["up_bias"].append(zero_d if upl.bias is None else upl.bias.detach().float().cpu() * s)
        for k in layer_rows:
            layer_rows[k].append(torch.stack(rows[k]))  # [L, ...]
    return {k: torch.stack(v, dim=1).contiguous() for k, v in layer_rows.items()}  # [L, N, ...]


def _fingerprint(parts: Sequence) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- modules
class XPeft(nn.Module):
    """Model-level X-PEFT state (``model.fk_xpeft``): the bank ``down`` [L, N, d, r], ``down_bias``
    [L, N, r], ``up`` [L, N, r, d], ``up_bias`` [L, N, d]; the profiles' mask logits
    (``profiles[name]`` [2, L, N]); the active profile names (:func:`set_profiles`)."""

    def __init__(self, layers: int, dim: int, adapters: Optional[int] = None, rank: int = 16, seed: Optional[int] = 0,
                 mask: str = "hard", k: int = 4, tau: float = 1.0, scale: Optional[float] = None, bank=None):
        super().__init__()
        self.layers, self.dim = check_pos_int("layers", layers), check_pos_int("dim", dim)
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.mask, self.tau = mask, check_real("tau", tau)
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if bank is None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int (the random bank's seed), got {type(seed).__name__}")
            adapters = 64 if adapters is None else adapters
            self.adapters, self.rank, self.seed = check_pos_int("adapters", adapters), check_pos_int("rank", rank), seed
            self.scale = 0.1 if scale is None else check_real("scale", scale)
            t = _random_bank(layers, self.adapters, dim, self.rank, seed)
            persistent = False  # regenerated from the seed: stores nothing
            self.bank_id = "random-" + _fingerprint(["random-v1", seed, layers, self.adapters, dim, self.rank,
                                                     self.scale])
        else:
            t = _trained_bank(bank, layers, dim)
            self.adapters, self.rank, self.seed = t["down"].shape[1], t["down"].shape[3], None
            if adapters is not None and adapters != self.adapters:
                raise ValueError(f"adapters={adapters} but the bank holds {self.adapters} adapters per layer")
            self.scale = 1.0 if scale is None else check_real("scale", scale)
            persistent = True
            self.bank_id = "trained-" + _fingerprint([t["down"], t["down_bias"], t["up"], t["up_bias"], self.scale])
        self.k = check_pos_int("k", k)
        if mask == "hard" and self.k > self.adapters:
            raise ValueError(f"k must be <= adapters = {self.adapters}, got {k}")
        for name, v in t.items():
            self.register_buffer(name, v, persistent=persistent)
        self.profiles = nn.ParameterDict()
        self.active: Union[None, str, List[str]] = None
        self._cache: "OrderedDict[tuple, tuple]" = OrderedDict()

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, dim={self.dim}, adapters={self.adapters}, rank={self.rank}, "
                f"mask={self.mask}, k={self.k}, tau={self.tau}, scale={self.scale}, bank={self.bank_id}, "
                f"profiles={len(self.profiles)}")

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_cache"] = OrderedDict()
        return state

    # -- per forward
    def row_names(self, batch: int) -> List[str]:
        act = self.active
        if act is None:
            raise RuntimeError("no profiles set: call pet.set_profiles(model, names) before the forward")
        if isinstance(act, str):
            return [act] * batch
        if len(act) != batch:
            raise ValueError(f"pet.set_profiles gave {len(act)} profile names but the batch has {batch} rows")
        return act

    def weights(self, logits: Tensor) -> Tensor:
        return mask_weights(logits, self.mask, self.k, self.tau)

    def _combine(self, logits: Tensor, layer: Optional[int]) -> Tuple[Tensor, ...]:
        """Combined adapters of the profiles ``logits`` [P, 2, L, N]: for one layer ([P, ...]) or,
        ``layer=None``, all layers ([L, P, ...])."""
        w = self.weights(logits).to(self.down.dtype)  # [P, 2, L, N]
        if layer is not None:
            wa, wb = w[:, 0, layer], w[:, 1, layer]
            return (torch.einsum("pn,ndr->pdr", wa, self.down[layer]), wa @ self.down_bias[layer],
                    torch.einsum("pn,nrd->prd", wb, self.up[layer]), wb @ self.up_bias[layer])
        wa, wb = w[:, 0], w[:, 1]
        return (torch.einsum("pln,lndr->lpdr", wa, self.down).contiguous(),
                torch.einsum("pln,lnr->lpr", wa, self.down_bias).contiguous(),
                torch.einsum("pln,lnrd->lprd", wb, self.up).contiguous(),
                torch.einsum("pln,lnd->lpd", wb, self.up_bias).contiguous())

    def site_inputs(self, layer: int, batch: int, device: torch.device):
        """(profile ids [B] int64, down, down_bias, up, up_bias) for the adapter site of ``layer``."""
        names = self.row_names(batch)
        uniq = list(dict.fromkeys(names))
        for n in uniq:
            if n not in self.profiles:
                raise KeyError(f"unknown profile {n!r}; known profiles: {list(self.profiles.keys())}")
        pos = {n: i for i, n in enumerate(uniq)}
        idx = torch.tensor([pos[n] for n in names], dtype=torch.int64, device=device)
        params = [self.profiles[n] for n in uniq]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return (idx,) + self._combine(torch.stack(params), layer)
        key = (tuple(uniq), tuple(p._version for p in params), tuple(p.data_ptr() for p in params),
               self.down._version, self.up._version, self.down_bias._version, self.up_bias._version,
               self.down.dtype, str(self.down.device))
        hit = self._cache.get(key)
        if hit is None:
            with torch.no_grad():
                hit = self._combine(torch.stack(params), None)
            self._cache[key] = hit
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return (idx,) + tuple(t[layer] for t in hit)


class XPeftSite(nn.Module):
    """The X-PEFT adapter of one layer. ``base`` given (Hugging Face encoders): sequential,
    ``h = base(x); h + adapter(h)``; else (timm blocks, via ``fk_adapter``) ``forward(x, residual)``
    returns ``residual + adapter(x)`` in one fused op. Holds no tensors: the bank and the profiles
    live in the model's :class:`XPeft` (reached through a plain reference, not a submodule)."""

    fused_residual = True  # patch._FKBlock calls adapter(x, y) and uses its result as y + adapter(x)

    def __init__(self, ctrl: XPeft, layer: int, base: Optional[nn.Module] = None, backend: Optional[str] = None):
        super().__init__()
        object.__setattr__(self, "_ctrl", ctrl)
        self.layer = layer
        self.base = base
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.base is not None:
            x = self.base(x)
        ctrl = self._ctrl
        idx, down, db, up, ub = ctrl.site_inputs(self.layer, x.shape[0], x.device)
        return xpeft_adapter(x, idx, down, db, up, ub, ctrl.scale, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


# ----------------------------------------------------------------------------- model-level API
def _timm_blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(
            hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks):
        return list(blocks)
    return None


def _hf_layers(model: nn.Module):
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and all(
                hasattr(l, "intermediate") and isinstance(getattr(getattr(l, "output", None), "dense", None),
                                                          (nn.Linear, XPeftSite)) for l in mod):
            return list(mod)
    return None


def apply_xpeft(model: nn.Module, adapters: Optional[int] = None, rank: int = 16, seed: int = 0, mask: str = "hard", k: int = 4,
                tau: float = 1.0, scale: Optional[float] = None, bank=None, backend: Optional[str] = None) -> nn.Module:
    """``pet.apply(model, "xpeft", ...)``: add the bank and one adapter site per layer (module
    docstring); the model's outputs are unchanged only once profiles are set (a forward without
    :func:`set_profiles` raises). Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, XPeft) for m in model.modules()):
        raise ValueError("model already has X-PEFT (method='xpeft' was applied twice)")
    ref = next(model.parameters(), None)
    blocks = _timm_blocks(model)
    if blocks is not None:
        if any(getattr(b, "fk_adapter", None) is not None for b in blocks):
            raise ValueError("model already has adapters (blk.fk_adapter); X-PEFT uses that place")
        dim = blocks[0].mlp.fc1.in_features if hasattr(blocks[0].mlp, "fc1") else blocks[0].norm2.weight.shape[0]
        ctrl = XPeft(len(blocks), dim, adapters, rank, seed, mask, k, tau, scale, bank)
        model.fk_xpeft = ctrl
        for i, blk in enumerate(blocks):
            blk.fk_adapter = XPeftSite(ctrl, i, backend=backend)
            ensure_block(blk)
    else:
        layers = _hf_layers(model)
        if layers is None:
            raise TypeError(f"model ({type(model).__name__}) is neither a timm ViT (.blocks with .mlp) nor a "
                            "BERT-style Hugging Face encoder (a ModuleList of layers with .intermediate and "
                            ".output.dense)")
        dim = layers[0].output.dense.out_features
        ctrl = XPeft(len(layers), dim, adapters, rank, seed, mask, k, tau, scale, bank)
        model.fk_xpeft = ctrl
        for i, layer in enumerate(layers):
            layer.output.dense = XPeftSite(ctrl, i, base=layer.output.dense, backend=backend)
    if ref is not None:
        ctrl.to(device=ref.device, dtype=ref.dtype)
    return model


register(Method("xpeft", apply_xpeft, frozenset({"adapters", "rank", "seed", "mask", "k", "tau", "scale", "bank",
                                                 "backend"})))


def _ctrl(model: nn.Module) -> XPeft:
    if isinstance(model, XPeft):
        return model
    c = getattr(model, "fk_xpeft", None) if isinstance(model, nn.Module) else None
    if isinstance(c, XPeft):
        return c
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, XPeft):
                return m
    raise ValueError(f"model ({type(model).__name__}) has no X-PEFT: call pet.apply(model, 'xpeft', ...) first")


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or not _NAME.match(name):
        raise ValueError(f"profile name must be a non-empty str without '.', got {name!r}")
    return name


def add_profile(model: nn.Module, name: str, init_std: float = 1e-3, seed: int = 0) -> nn.Parameter:
    """A new profile: mask logits [2, L, N] ~ N(0, init_std) from ``seed`` (small, so a hard mask
    starts at some k adapters and a soft mask near the uniform mix). Returns the logits Parameter."""
    c = _ctrl(model)
    _check_name(name)
    if name in c.profiles:
        raise ValueError(f"profile {name!r} already exists (pet.remove_profile first)")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    init = torch.randn(2, c.layers, c.adapters, generator=g) * check_real("init_std", init_std)
    p = nn.Parameter(init.to(device=c.down.device, dtype=c.down.dtype))
    c.profiles[name] = p
    return p


def remove_profile(model: nn.Module, name: str) -> None:
    c = _ctrl(model)
    if name not in c.profiles:
        raise KeyError(f"unknown profile {name!r}; known profiles: {list(c.profiles.keys())}")
    del c.profiles[name]
    c._cache.clear()


def profile_names(model: nn.Module) -> List[str]:
    return list(_ctrl(model).profiles.keys())


def set_profiles(model: nn.Module, names: Union[str, Sequence[str], None]) -> None:
    """The profile of each batch row for the next forwards: a list of names (one per row) or one
    name for every row; None clears. Only the names are stored (see the module docstring)."""
    c = _ctrl(model)
    if names is None:
        c.active = None
        return
    lst = [names] if isinstance(names, str) else list(names)
    for n in lst:
        if not isinstance(n, str):
            raise TypeError(f"profile names must be str, got {type(n).__name__} {n!r}")
        if n not in c.profiles:
            raise KeyError(f"unknown profile {n!r}; known profiles: {list(c.profiles.keys())}")
    c.active = names if isinstance(names, str) else lst


def train_profile(model: nn.Module, name: str) -> List[nn.Parameter]:
    """Freeze every parameter of ``model`` except profile ``name``'s mask logits; returns them (add
    your task head's parameters to the optimiser)."""
    c = _ctrl(model)
    if name not in c.profiles:
        raise KeyError(f"unknown profile {name!r}; known profiles: {list(c.profiles.keys())}")
    model.requires_grad_(False)
    p = c.profiles[name]
    p.requires_grad_(True)
    return [p]


def profile_bytes(model: nn.Module) -> int:
    """Payload bytes of one saved profile without head: ``ceil(2 L N / 8)`` (hard) or ``2 * 2 L N`` (soft)."""
    c = _ctrl(model)
    n = 2 * c.layers * c.adapters
    return (n + 7) // 8 if c.mask == "hard" else 2 * n


def _pack_bits(bits: Tensor) -> Tensor:
    flat = bits.flatten().to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 1).flatten()[:n].bool()


def save_profile(model: nn.Module, name: str, path: str, head: Optional[nn.Module] = None) -> None:
    """Write profile ``name`` to ``path`` (safetensors): hard masks as ``ceil(2 L N / 8)`` bytes of
    bits, soft masks as float16 logits, the header, and ``head``'s tensors if given."""
    from safetensors.torch import save_file
    c = _ctrl(model)
    if name not in c.profiles:
        raise KeyError(f"unknown profile {name!r}; known profiles: {list(c.profiles.keys())}")
    logits = c.profiles[name].detach()
    if c.mask == "hard":
        tensors = {"masks": _pack_bits(_topk_bits(logits, c.k))}
    else:
        tensors = {"logits": logits.to(torch.float16).cpu().contiguous()}
    if head is not None:
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        for key, t in head.state_dict().items():
            tensors["head." + key] = t.detach().cpu().contiguous()
    meta = dict(format=FORMAT, mask=c.mask, layers=str(c.layers), adapters=str(c.adapters), k=str(c.k),
                tau=repr(c.tau), bank=c.bank_id)
    save_file(tensors, path, metadata=meta)


def load_profile(model: nn.Module, name: str, path: str, head: Optional[nn.Module] = None,
                 replace: bool = False) -> nn.Parameter:
    """Read a profile saved by :func:`save_profile` as profile ``name``; checks the file was made
    for this model's bank (fingerprint), mask kind and shapes. ``head``: load the stored head
    tensors into it (strict; the stored names and shapes must be ``head``'s, else ``ValueError`` saying
    which differ). Returns the new mask logits. Nothing changes on an error."""
    from safetensors import safe_open
    c = _ctrl(model)
    _check_name(name)
    check_bool("replace", replace)
    if name in c.profiles and not replace:
        raise ValueError(f"profile {name!r} already exists (pass replace=True)")
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be None or an nn.Module, got {type(head).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an X-PEFT profile file (format {meta.get('format')!r}, "
                                 f"want {FORMAT!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors (empty, truncated, not safetensors)
        raise ValueError(f"path {os.fspath(path)!r} is not a readable X-PEFT profile (safetensors) file: "
                         f"{type(e).__name__}: {e}") from e
    if meta.get("bank") != c.bank_id:
        raise ValueError(f"{path} holds masks of another bank ({meta.get('bank')}); this model's bank is {c.bank_id}")
    layers, adapters = int(meta["layers"]), int(meta["adapters"])
    if (layers, adapters) != (c.layers, c.adapters):
        raise ValueError(f"{path} has masks of shape [2, {layers}, {adapters}], the model needs "
                         f"[2, {c.layers}, {c.adapters}]")
    if meta.get("mask") != c.mask:
        raise ValueError(f"{path} holds {meta.get('mask')} masks, the model uses mask={c.mask!r}")
    shape = (2, c.layers, c.adapters)
    if c.mask == "hard":
        k = int(meta["k"])
        if k != c.k:
            raise ValueError(f"{path} was saved with k={k}, the model uses k={c.k}")
        packed = tensors.get("masks")
        nbits = 2 * c.layers * c.adapters
        if packed is None or packed.dtype != torch.uint8 or packed.numel() != (nbits + 7) // 8:
            raise ValueError(f"{path}: 'masks' must be {(nbits + 7) // 8} uint8 bytes for masks of shape {list(shape)}")
        bits = _unpack_bits(packed, nbits).view(shape)
        if not bool((bits.sum(-1) == k).all()):
            raise ValueError(f"{path}: every mask row must select exactly k={k} adapters")
        logits = bits.float()
    else:
        logits = tensors.get("logits")
        if logits is None or tuple(logits.shape) != shape:
            got = None if logits is None else tuple(logits.shape)
            raise ValueError(f"{path}: 'logits' must have shape {list(shape)}, got {got}")
        logits = logits.float()
    head_sd = {key[5:]: t for key, t in tensors.items() if key.startswith("head.")}
    if head is not None:
        if not head_sd:
            raise ValueError(f"{path} holds no head tensors")
        want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in head_sd.items()}
        if want != got:
            diff = sorted(set(want) ^ set(got))[:5] or [k for k in want if want[k] != got[k]][:5]
            raise ValueError(f"head does not match the head stored in {path}: file {got}, head "
                             f"({type(head).__name__}) {want}; differing entries: {diff}")
        head.load_state_dict(head_sd, strict=True)
    p = nn.Parameter(logits.to(device=c.down.device, dtype=c.down.dtype))
    if name in c.profiles:
        del c.profiles[name]
    c.profiles[name] = p
    c._cache.clear()
    return p
