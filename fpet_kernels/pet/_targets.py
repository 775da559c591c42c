"""Which ``nn.Linear`` layers of a model the weight-side methods (PaFi, HiWi) may touch.

The transformer blocks are found structurally: the ``nn.ModuleList`` / ``nn.Sequential`` holding the
most ``nn.Linear`` layers whose every child holds one (timm ``model.blocks``, Hugging Face
``encoder.layer``). Linear layers inside PET modules (LoRA's low-rank factors, adapters) are never
eligible. Feed-forward layers are recognised by their name inside the block: ``mlp.*`` / ``ffn.*`` /
``feed_forward.*`` (timm, DistilBERT, ...) or ``intermediate.dense`` and ``output.dense`` (BERT,
RoBERTa; ``attention.output.dense`` is the attention projection, not the feed-forward)."""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple, Union

import torch.nn as nn

from .modules import is_pet_module

FFN_PATTERN = re.compile(r"(^|\.)(mlp|ffn|feed_forward)\.|^intermediate\.dense$|^output\.dense$")
# the attention input projections (their input is the block's normed input): timm ``attn.qkv``, BERT/RoBERTa
# ``attention.self.query/key/value``, ``q_proj``/``k_proj``/``v_proj``, DistilBERT ``q_lin``/``k_lin``/``v_lin``
QKV_PATTERN = re.compile(r"(^|\.)(qkv|query|key|value|[qkv]_proj|[qkv]_lin|[qkv])$")

# named subsets of the block linears (``block_linears(model, preset)``)
PRESETS = ("blocks", "ffn", "attention", "qkv", "qkv_ffn")


def _linear_names(mod: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """``(name, linear)`` for every nn.Linear under ``mod``, skipping PET modules' insides."""
    out, skip = [], []
    for name, m in mod.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if is_pet_module(m) and not isinstance(m, nn.Linear):
            skip.append(name)
            continue
        if isinstance(m, nn.Linear):
            out.append((name, m))
    return out


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
        for rel, lin in _linear_names(blk):
            if not _in_preset(rel, preset):
                continue
            out.append((f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}", lin))
    return out


def first_ffn_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """The first feed-forward nn.Linear of every block (timm ``mlp.fc1``, BERT ``intermediate.dense``)."""
    prefix, blocks = find_blocks(model)
    out = []
    for i, blk in enumerate(blocks):
        ffn = [(rel, lin) for rel, lin in _linear_names(blk) if FFN_PATTERN.search(rel)]
        if ffn:
            rel, lin = ffn[0]
            out.append((f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}", lin))
    return out


def pattern_linears(model: nn.Module, patterns: Union[str, Sequence[str]]) -> List[Tuple[str, nn.Linear]]:
    """nn.Linear layers (outside PET modules) whose qualified name matches one of the regex
    ``patterns`` (``re.search``)."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"targets must be a string or a list of regex strings, got {patterns!r}")
    try:
        compiled = [re.compile(p) for p in pats]
    except re.error as e:
        raise ValueError(f"targets holds an invalid regular expression: {e}") from e
    return [(n, m) for n, m in _linear_names(model) if any(c.search(n) for c in compiled)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def replace_modules(model: nn.Module, pairs) -> nn.Module:
    """``replace_module`` for every ``(name, new module)`` of ``pairs``; returns ``model``."""
    for name, new in pairs:
        replace_module(model, name, new)
    return model


def fold_modules(model: nn.Module, found) -> nn.Module:
    """Replace every ``(name, module)`` of ``found`` by ``module.to_linear()`` (PaFi, HiWi ``fold``)."""
    return replace_modules(model, [(name, mod.to_linear()) for name, mod in found])
