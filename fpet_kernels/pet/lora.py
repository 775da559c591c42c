"""LoRA on the query and value projections: ``pet.apply(model, "lora", rank=8)``.

- a timm ViT: :class:`LoRAQKV` wraps each ``blk.attn.qkv`` (the fused projection, its q and v rows);
- a BERT-family text encoder (transformers ``BertModel`` / ``RobertaModel`` / ``*ForSequenceClassification``,
  MiniLM, patched for token merging or not; any model whose layers hold ``attention.self.query`` /
  ``value`` linears beside ``intermediate`` / ``output``): :class:`LoRALinear` wraps each layer's
  ``attention.self.query`` and ``attention.self.value``.

``pet.fold`` (or :func:`merge_lora`) folds the deltas into plain ``nn.Linear`` layers. ``binary=True``
makes the low-rank factors 1-bit (FPET's ``BinaryLinear``).
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import BinaryLinear, check_bool, check_pos_int, check_prob, check_real, make_linear
from .registry import Method, is_pet_module, mark_folded, register

__all__ = ["LoRAQKV", "LoRALinear", "LORA_TYPES", "apply_lora", "merge_lora", "fold_lora", "vit_blocks",
           "text_layers"]


def _load_plain_keys(module, state_dict, prefix):
    """A plain checkpoint (``weight``/``bias`` of the wrapped linear, as the backbone saves it) loads into the
    wrapped ``base``; LoRA parameters absent from it keep their current values."""
    plain = [k for k in ("weight", "bias") if prefix + k in state_dict and prefix + "base." + k not in state_dict]
    if not plain:
        return
    for k in plain:
        state_dict[prefix + "base." + k] = state_dict.pop(prefix + k)
    for name, p in module.named_parameters():
        if not name.startswith("base.") and prefix + name not in state_dict:
            state_dict[prefix + name] = p.detach()


def _folded_linear(b: nn.Linear, weight: Tensor) -> nn.Linear:
    out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                    dtype=b.weight.dtype)
    out.weight.copy_(weight)
    if b.bias is not None:
        out.bias.copy_(b.bias)
    out.weight.requires_grad_(b.weight.requires_grad)
    if b.bias is not None:
        out.bias.requires_grad_(b.bias.requires_grad)
    return out


class _LoRAWrapper(nn.Module):
    """What both LoRA wrappers share: the wrapped linear is ``base`` (``weight`` / ``bias`` /
    ``in_features`` / ``out_features`` delegate to it), a plain checkpoint of it loads into ``base``,
    and every parameter outside ``base`` is a PET parameter."""

    base: nn.Linear

    def _load_plain_keys(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
        """A plain checkpoint (the wrapped layer's own keys, e.g. ``qkv.weight`` as timm saves it or
        ``query.weight`` as transformers does) loads into the wrapped ``base``; LoRA parameters absent
        from it keep their current values. Registered by each wrapper as a bound method (deepcopy and
        pickle rebind it)."""
        _load_plain_keys(self, state_dict, prefix)

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

    def pet_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """The PET parameters: all but the wrapped ``base`` layer's (``pet.registry.own_parameters``)."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield name, p

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.pet_named_parameters():
            yield p


class LoRAQKV(_LoRAWrapper):
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
        self.rank, self.scale = check_pos_int("rank", rank), check_real("scale", scale)
        self.binary = check_bool("binary", binary)
        self.base = qkv
        d, c = qkv.out_features // 3, qkv.in_features
        self.attn_dim = d
        self.lora_dropout = nn.Dropout(check_prob("dropout", dropout))
        self.lora_A_q = make_linear(c, rank, False, binary)
        self.lora_B_q = make_linear(rank, d, False, binary)
        self.lora_A_v = make_linear(c, rank, False, binary)
        self.lora_B_v = make_linear(rank, d, False, binary)
        dd = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        for lin in (self.lora_A_q, self.lora_B_q, self.lora_A_v, self.lora_B_v):
            lin.to(**dd)
        nn.init.kaiming_uniform_(self.lora_A_q.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A_v.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B_q.weight)
        nn.init.zeros_(self.lora_B_v.weight)
        self._register_load_state_dict_pre_hook(self._load_plain_keys)

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
        return _folded_linear(self.base, self.merged_weight())

    fold = merge

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, binary={self.binary}"


class LoRALinear(_LoRAWrapper):
    """LoRA on one ``nn.Linear`` (a BERT layer's ``query`` or ``value``): ``base(x) + scale * B A x``.

    ``A`` kaiming-uniform, ``B`` zero (the wrapped layer starts unchanged); ``weight`` / ``bias`` /
    ``in_features`` / ``out_features`` delegate to the wrapped ``base``; ``merge()`` folds the delta into
    a plain ``nn.Linear``. ``binary=True``: 1-bit factors."""

    def __init__(self, linear: nn.Linear, rank: int = 8, scale: float = 1.0, binary: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(linear, nn.Linear) or isinstance(linear, (LoRAQKV, LoRALinear)):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.rank, self.scale = check_pos_int("rank", rank), check_real("scale", scale)
        self.binary = check_bool("binary", binary)
        self.base = linear
        self.lora_dropout = nn.Dropout(check_prob("dropout", dropout))
        self.lora_A = make_linear(linear.in_features, rank, False, binary)
        self.lora_B = make_linear(rank, linear.out_features, False, binary)
        dd = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A.to(**dd)
        self.lora_B.to(**dd)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self._register_load_state_dict_pre_hook(self._load_plain_keys)  # a bound method: deepcopy / pickle rebind it

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    def delta_weight(self) -> Tensor:
        def w(lin):
            return lin.binary_weight() if isinstance(lin, BinaryLinear) else lin.weight
        return (w(self.lora_B) @ w(self.lora_A)) * self.scale

    def merged_weight(self) -> Tensor:
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new ``nn.Linear`` with the LoRA delta folded into the weight (bias copied)."""
        return _folded_linear(self.base, self.merged_weight())

    fold = merge

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, binary={self.binary}"


#: The LoRA wrapper types (``pet.fold`` folds them, ``pet.save`` names their base layers as the backbone's).
LORA_TYPES = (LoRAQKV, LoRALinear)


def _is_text_layer(m: nn.Module) -> bool:
    sa = getattr(getattr(m, "attention", None), "self", None)
    return (isinstance(getattr(sa, "query", None), nn.Linear) and isinstance(getattr(sa, "value", None), nn.Linear)
            and hasattr(m, "intermediate") and hasattr(getattr(m, "output", None), "LayerNorm"))


def text_layers(model: nn.Module) -> List[nn.Module]:
    """The BERT-family layers of ``model`` (modules with ``attention.self.query`` / ``value`` linears,
    ``intermediate`` and ``output.LayerNorm``: transformers ``BertLayer`` / ``RobertaLayer``), in order;
    empty for other models."""
    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if _is_text_layer(m)]


def vit_blocks(model: nn.Module) -> List[nn.Module]:
    """The model's transformer blocks, checking they look like timm ``Block``s."""
    blocks = getattr(model, "blocks", None) if isinstance(model, nn.Module) else None
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"model must be a timm VisionTransformer (a module with .blocks of timm Blocks) or a "
                        f"BERT-family text encoder (transformers BertModel / RobertaModel and their "
                        f"*ForSequenceClassification: layers with attention.self.query / value), got "
                        f"{type(model).__name__} (other Hugging Face models: PEFT's LoraConfig on the model)")
    for i, blk in enumerate(blocks):
        qkv = getattr(getattr(blk, "attn", None), "qkv", None)
        if not isinstance(qkv, (nn.Linear, LoRAQKV)) or not hasattr(blk, "mlp") or not hasattr(blk, "norm2"):
            raise TypeError(f"model is not supported: model.blocks[{i}] ({type(blk).__name__}) needs .attn.qkv "
                            "(nn.Linear), .mlp and .norm2 like a timm Block")
    return list(blocks)


def _apply_lora_text(layers: List[nn.Module], **kw) -> None:
    sites = [(layer.attention.self, name) for layer in layers for name in ("query", "value")]
    if any(isinstance(getattr(sa, name), LORA_TYPES) for sa, name in sites):
        raise ValueError("model already has LoRA (attention.self.query is a LoRALinear); method='lora' was "
                         "applied twice")
    held = [(i, name) for i, layer in enumerate(layers) for name in ("query", "value")
            if type(getattr(layer.attention.self, name)) is not nn.Linear]
    if held:  # wrapping a PaFi / HiWi layer would leave its trained state untrained and unsaved
        i, name = held[0]
        raise ValueError(f"method='lora' would wrap layer {i}'s attention.self.{name}, which another PET method "
                         f"holds ({type(getattr(layers[i].attention.self, name)).__name__}): PET methods do not "
                         "stack on one layer; pet.fold(model) first")
    new = [LoRALinear(getattr(sa, name), **kw) for sa, name in sites]  # all first: no half-applied model
    for (sa, name), lora in zip(sites, new):
        setattr(sa, name, lora)


def apply_lora(model: nn.Module, **kw) -> nn.Module:
    """``pet.apply(model, "lora", ...)``: every ``blk.attn.qkv`` of a timm ViT becomes a :class:`LoRAQKV`;
    every ``attention.self.query`` / ``value`` of a BERT-family encoder a :class:`LoRALinear` (kw: rank=8,
    scale=1.0, binary=False, dropout=0.0)."""
    layers = text_layers(model)
    if layers and getattr(model, "blocks", None) is None:
        _apply_lora_text(layers, **kw)
        return model
    blocks = vit_blocks(model)
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
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRAQKV` in ``model`` by its folded ``nn.Linear`` (in place); returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, LORA_TYPES)]
    for parent, name, child in targets:
        setattr(parent, name, child.merge())
    return model


def fold_lora(model: nn.Module) -> nn.Module:
    """``pet.fold``'s LoRA part: record that LoRA is folded (``registry.FOLDED_ATTR``), then :func:`merge_lora`."""
    if any(isinstance(m, LORA_TYPES) for m in model.modules()):
        mark_folded(model, {"lora"})
    return merge_lora(model)


register(Method("lora", apply_lora, frozenset({"rank", "scale", "binary", "dropout"}), fold=fold_lora,
                module_types=LORA_TYPES))
