"""Which ``nn.Linear`` layers of a model the weight-side methods (PaFi, HiWi) may touch.

The transformer blocks are found structurally: the ``nn.ModuleList`` / ``nn.Sequential`` holding the
most ``nn.Linear`` layers whose every child holds one (timm ``model.blocks``, Hugging Face
``encoder.layer``). Linear layers inside PET modules (LoRA's low-rank factors, adapters) are never
eligible. Feed-forward layers are recognised by their name inside the block: ``mlp.*`` / ``ffn.*`` /
``feed_forward.*`` (timm, DistilBERT, ...) or ``intermediate.dense`` and ``output.dense`` (BERT,
RoBERTa; ``attention.output.dense`` is the attention projection, not the feed-forward).

One layer, one method: :func:`replace_modules` refuses to replace a layer another PET method already
holds (a ``PaFiLinear``, a ``HiWiLinear``, a ``LoRAQKV``: its trained state would be dropped without a
word), and the selection functions return such a wrapped layer under its own name (LoRA's ``attn.qkv``)
so that asking for it gets that error rather than a silent skip. ``pet.fold`` first makes them plain
layers again. :func:`fold_modules` records on the model what was folded (``registry.FOLDED_ATTR``), which
``pet.save`` reads."""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple, Union

import torch.nn as nn

from .lora import LORA_TYPES
from .registry import FOLDED_ATTR, is_pet_module, mark_folded  # noqa: F401 (FOLDED_ATTR: re-exported)

FFN_PATTERN = re.compile(r"(^|\.)(mlp|ffn|feed_forward)\.|^intermediate\.dense$|^output\.dense$")
# the attention input projections (their input is the block's normed input): timm ``attn.qkv``, BERT/RoBERTa
# ``attention.self.query/key/value``, ``q_proj``/``k_proj``/``v_proj``, DistilBERT ``q_lin``/``k_lin``/``v_lin``
QKV_PATTERN = re.compile(r"(^|\.)(qkv|query|key|value|[qkv]_proj|[qkv]_lin|[qkv])$")

# named subsets of the block linears (``block_linears(model, preset)``)
PRESETS = ("blocks", "ffn", "attention", "qkv", "qkv_ffn")

#: Method names of the layer types a PET method puts in place of an nn.Linear (for error messages).
_METHOD_OF_TYPE = {"PaFiLinear": "pafi", "HiWiLinear": "hiwi", "LoRAQKV": "lora", "LoRALinear": "lora"}


def _linear_names(mod: nn.Module, wrapped: bool = False) -> List[Tuple[str, nn.Module]]:
    """``(name, linear)`` for every nn.Linear under ``mod``, skipping PET modules' insides. ``wrapped``:
    also a LoRA-wrapped linear (``LoRAQKV``) under the wrapper's name, so a selection that asks for it
    reaches :func:`replace_modules`' error instead of skipping it."""
    out, skip = [], []
    for name, m in mod.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if is_pet_module(m) and not isinstance(m, nn.Linear):
            skip.append(name)
            if wrapped and isinstance(m, LORA_TYPES):
                out.append((name, m))
            continue
        if isinstance(m, nn.Linear):
            out.append((name, m))
    return out


def held_by(mod: nn.Module) -> str:
    """The PET method holding layer ``mod`` (``"pafi"``, ``"hiwi"``, ``"lora"``, or the type name of another
    PET module in it), or ``""`` for a layer no method holds."""
    name = type(mod).__name__
    if name in _METHOD_OF_TYPE:
        return _METHOD_OF_TYPE[name]
    for m in mod.modules():
        if is_pet_module(m):
            return _METHOD_OF_TYPE.get(type(m).__name__, type(m).__name__)
    return ""


def find_blocks(model: nn.Module) -> Tuple[str, nn.Module]:
    """``(qualified name, container)`` of the model's block list (see the module doc)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    best, best_n = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        counts = [len(_linear_names(child)) for child in m]
        if min(counts) == 0:
            continue
        if sum(counts) > best_n:
            best, best_n = (name, m), sum(counts)
    if best is None:
        raise ValueError(f"no eligible module: {type(model).__name__} has no list of blocks holding nn.Linear layers "
                         "(timm ViT .blocks or Hugging Face encoder.layer); pass targets= as name patterns")
    return best


def _in_preset(rel: str, preset: str) -> bool:
    ffn = bool(FFN_PATTERN.search(rel))
    if preset == "blocks":
        return True
    if preset == "ffn":
        return ffn
    if preset == "attention":
        return not ffn
    qkv = not ffn and bool(QKV_PATTERN.search(rel))
    if preset == "qkv":
        return qkv
    if preset == "qkv_ffn":
        return qkv or ffn
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")


def block_linears(model: nn.Module, preset: str = "blocks", ffn_only: bool = False) -> List[Tuple[str, nn.Linear]]:
    """Qualified names and modules of the nn.Linear layers inside the blocks, in module order, restricted to
    ``preset``: ``"blocks"`` (all), ``"ffn"`` (feed-forward, ``FFN_PATTERN``; also ``ffn_only=True``),
    ``"attention"`` (all but the feed-forward ones), ``"qkv"`` (the attention input projections,
    ``QKV_PATTERN``), ``"qkv_ffn"`` (both: every block linear except the attention output projection)."""
    if ffn_only:
        preset = "ffn"
    prefix, blocks = find_blocks(model)
    out = []
    for i, blk in enumerate(blocks):
        for rel, lin in _linear_names(blk, wrapped=True):
            if not _in_preset(rel, preset):
                continue
            out.append((f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}", lin))
    return out


def first_ffn_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """The first feed-forward nn.Linear of every block (timm ``mlp.fc1``, BERT ``intermediate.dense``)."""
    prefix, blocks = find_blocks(model)
    out = []
    for i, blk in enumerate(blocks):
        ffn = [(rel, lin) for rel, lin in _linear_names(blk, wrapped=True) if FFN_PATTERN.search(rel)]
        if ffn:
            rel, lin = ffn[0]
            out.append((f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}", lin))
    return out


def pattern_linears(model: nn.Module, patterns: Union[str, Sequence[str]]) -> List[Tuple[str, nn.Linear]]:
    """nn.Linear layers (outside PET modules) whose qualified name matches one of the regex
    ``patterns`` (``re.search``)."""
    if isinstance(patterns, str):
        pats = [patterns]
    elif isinstance(patterns, (list, tuple)):
        pats = list(patterns)
    else:
        raise TypeError(f"targets must be a preset name {PRESETS} or a regex string or a list of regex strings, "
                        f"got {type(patterns).__name__} {patterns!r}")
    if not pats or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"targets must be a preset name {PRESETS} or a regex string or a non-empty list of regex "
                        f"strings, got {patterns!r}")
    try:
        compiled = [re.compile(p) for p in pats]
    except re.error as e:
        raise ValueError(f"targets holds an invalid regular expression: {e}") from e
    return [(n, m) for n, m in _linear_names(model, wrapped=True) if any(c.search(n) for c in compiled)]


def check_free(model: nn.Module, names, method: str) -> None:
    """Raise ``ValueError`` when a layer of ``names`` is already held by a PET method (see the module doc):
    applying ``method`` there would replace that method's layer and lose what it trained."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    held = [(n, held_by(model.get_submodule(n))) for n in names]
    held = [(n, h) for n, h in held if h]
    if held:
        which = sorted({h for _, h in held})
        raise ValueError(
            f"method={method!r} would replace {len(held)} layer(s) that method(s) {which} already hold "
            f"(e.g. {held[0][0]!r}, {held[0][1]}), dropping what they train: PET methods do not stack on one "
            "layer. pet.fold(model) first (the trained state goes into the plain weights), or pass targets= "
            "that leave those layers out")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def replace_modules(model: nn.Module, pairs) -> nn.Module:
    """``replace_module`` for every ``(name, new module)`` of ``pairs``; returns ``model``. Nothing is replaced
    when one of the layers is held by a PET method already (:func:`check_free`)."""
    pairs = list(pairs)
    if pairs:
        check_free(model, [name for name, _ in pairs], held_by(pairs[0][1]) or type(pairs[0][1]).__name__)
    for name, new in pairs:
        replace_module(model, name, new)
    return model


def fold_modules(model: nn.Module, found) -> nn.Module:
    """Replace every ``(name, module)`` of ``found`` by ``module.to_linear()`` (PaFi, HiWi ``fold``) and
    record the folded methods in ``model``'s :data:`FOLDED_ATTR`."""
    found = list(found)
    for name, mod in found:
        replace_module(model, name, mod.to_linear())
    mark_folded(model, {held_by(mod) for _, mod in found})
    return model
