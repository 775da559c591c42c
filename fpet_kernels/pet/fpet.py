"""FPET's entry in the method registry: its merge module, the refinement adapter, is a PET module.

``fk.patch.timm(model, "fpet")`` / ``fk.patch.hf`` create the module
(:class:`~fpet_kernels.patch.modules.RefinementAdapter`, ``blocks[i].fk_refine``; ``layers[i].fk_refine``
in a Hugging Face model); ``pet.apply(model, "fpet", merge_layer=...)`` is the same call through the
PET entry point (the patch for the model's library: timm ViTs, transformers ViT / DeiT and BERT-family
encoders); on a model FPET patched already it changes nothing. Registering the type here makes
``pet.mark_trainable`` train it, ``pet.parameter_report`` count it and ``pet.save`` / ``pet.load``
store it. ``pet.fold`` leaves the merge modules in place: a folded model still merges.
"""
from __future__ import annotations

from torch import nn

from .. import patch as _patch
from ..patch.modules import RefinementAdapter
from .registry import Method, register

__all__ = ["RefinementAdapter", "apply_merge"]

#: The keywords ``pet.apply(model, "fpet" | "pyra", ...)`` passes to the patch.
_PATCH_KW = {"fpet": frozenset({"merge_layer", "refine", "binary_refine", "prop_attn", "backend", "trace_source",
                                "grid"}),
             "pyra": frozenset({"r", "threshold", "prop_attn", "backend", "trace_source"})}


def _merge_method(model: nn.Module):
    """The merge method a model is patched with (None: not patched)."""
    for m in model.modules():
        cfg = m.__dict__.get("fk_config")
        if cfg is not None:
            return cfg.method
    return None


def apply_merge(model: nn.Module, method: str, **kw) -> nn.Module:
    """``pet.apply(model, "fpet" | "pyra", **kw)``: patch ``model`` for ``method`` (``fk.patch.timm`` for a
    timm model, else ``fk.patch.hf``) with ``kw``; a model patched with ``method`` already is returned
    unchanged when no keyword is given (its merge modules are there), and raises otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    have = _merge_method(model)
    if have == method and not kw:
        return model
    if have is not None:
        raise ValueError(f"pet.apply(model, {method!r}): the model is already patched for token merging "
                         f"(method={have!r}); fk.patch.remove(model) first")
    if type(model).__module__.startswith("timm."):
        return _patch.timm(model, method, **kw)
    return _patch.hf(model, method, **kw)


def apply_fpet(model: nn.Module, **kw) -> nn.Module:
    return apply_merge(model, "fpet", **kw)


register(Method("fpet", apply_fpet, _PATCH_KW["fpet"], module_types=(RefinementAdapter,), label="fpet (refinement)"))
