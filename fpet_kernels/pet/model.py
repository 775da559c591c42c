"""The model-level PET helpers, on the method registry (``registry.py``): ``apply``, ``fold``,
``mark_trainable``, ``pet_parameters``, ``parameter_report`` / ``format_report`` and the task heads.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from ..integrations import peft as _peft
from ..layers import BinaryLinear, check_bool
from .adaptformer import AdaptFormerAdapter
from .lora import LoRALinear, LoRAQKV
from .fpet import RefinementAdapter
from .pyra import PyraModulation
from .registry import folders, get, methods, own_parameters, pet_modules

__all__ = ["PET_MODULES", "METHODS", "apply", "fold", "mark_trainable", "pet_parameters", "parameter_report",
           "format_report", "HEAD_NAMES", "heads"]

#: The built-in PET module types (methods register theirs: ``pet.register_pet_module``, ``registry.Method``).
PET_MODULES = (LoRAQKV, LoRALinear, AdaptFormerAdapter, RefinementAdapter, PyraModulation)
#: The methods of the first PET modules (``pet.methods()`` lists every method ``apply`` accepts).
METHODS = ("lora", "adaptformer")


def apply(model: nn.Module, method: str, **kw) -> nn.Module:
    """Add PET modules to a model in place and return it: ``pet.methods()`` lists the methods.

    * ``method="lora"``: every ``blk.attn.qkv`` becomes a :class:`LoRAQKV` (kw: rank=8, scale=1.0,
      binary=False, dropout=0.0); on a BERT-family encoder every ``attention.self.query`` / ``value`` a
      :class:`LoRALinear`;
    * ``method="adaptformer"``: every block gets ``blk.fk_adapter = AdaptFormerAdapter(dim, ...)`` (kw:
      bottleneck=64, scale=0.1, binary=False, dropout=0.0) and is patched by
      ``fpet_kernels.patch.ensure_block`` to add it beside the MLP (a BERT-family layer: beside its
      feed-forward, inside the residual before ``output.LayerNorm``);
    * ``"pafi"``, ``"hiwi"``, ``"xpeft"``, ...: see their modules.

    Does not change ``requires_grad``: call :func:`mark_trainable` next."""
    entry = get(method)
    if entry is None:
        raise ValueError(f"method must be one of {methods()}, got {method!r}")
    unknown = set(kw) - entry.accepted
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for method={method!r}: {sorted(unknown)}; "
                        f"accepted: {sorted(entry.accepted)}")
    return entry.apply(model, **kw)


def fold(model: nn.Module) -> nn.Module:
    """Write every foldable PET method into the backbone's weights, in place: LoRA (``merge_lora``), PaFi
    deltas, HiWi adapters. Afterwards those layers are plain ``nn.Linear`` again: the module types and
    the forward are the backbone's. Returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for fn in folders():
        fn(model)
    return model


def pet_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The PET parameters of ``model`` (identified by module type, see ``PET_MODULES``), deduplicated."""
    seen, out = set(), []
    for _, mod in pet_modules(model):
        for _, p in own_parameters(mod):
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
    check_bool("train_head", train_head)
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
    for _, mod in pet_modules(model):
        binary_w = {id(m.weight) for m in mod.modules() if isinstance(m, BinaryLinear)}
        n_mod = b_mod = 0
        for _, p in own_parameters(mod):
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
