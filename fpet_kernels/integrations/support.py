"""Which models the timm patch supports, with an error that says so (checked before anything is touched).

``fk.patch.timm`` supports timm ``VisionTransformer`` models (and subclasses such as DeiT's
``VisionTransformerDistilled``) whose blocks are timm's ``Block`` with ``Attention``: class /
distillation / register tokens, LayerScale, qk-norm, attention gates. Hugging Face transformers
ViT / DeiT go through ``fk.patch.hf``. Everything else is refused with a ``TypeError`` naming the
reason and what is supported; the check reads attributes with defaults only, so a model of an
unexpected shape cannot raise an ``AttributeError`` from inside it.
"""
from __future__ import annotations

from torch import nn

SUPPORTED = ("supported: timm VisionTransformer models built from timm's Block with Attention (ViT, DeiT, "
             "distilled DeiT, register tokens, LayerScale, qk-norm) through fk.patch.timm, and Hugging Face "
             "transformers ViTModel / ViTForImageClassification / DeiT through fk.patch.hf")


def _reason(model: nn.Module, vit_cls, block_cls, attn_cls) -> str | None:
    """Why ``model`` cannot be patched, or None when it can."""
    cls = getattr(model, "_fk_base_class", type(model))
    module = cls.__module__
    if module.startswith("transformers."):
        return f"{cls.__name__} is a Hugging Face transformers model: use fk.patch.hf(model, ...)"
    if module.startswith("timm.models.eva"):
        rope = " with rotary position embeddings" if getattr(model, "rope", None) is not None else ""
        return (f"{cls.__name__} is an Eva / EVA02-style model (timm.models.eva: EvaBlock / EvaAttention{rope}, "
                "not timm's Block / Attention; why: docs/model_layer.md, 'Eva and RoPE models')")
    rope = [name for name, mod in model.named_modules()
            if any(k in type(mod).__name__.lower() for k in ("rope", "rotary"))
            or getattr(mod, "rope", None) is not None]
    if rope:
        return f"{cls.__name__} uses rotary position embeddings (RoPE, at {rope[0] or 'the model'})"
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        return (f"{cls.__name__} is a torch.compile wrapper: patch the model first, then compile it "
                "(fk.patch.timm(model, ...); torch.compile(model))")
    if not isinstance(model, vit_cls):
        return f"{cls.__name__} is not a timm VisionTransformer"
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return f"{cls.__name__} has no .blocks of transformer blocks"
    for i, blk in enumerate(blocks):
        base = type(blk)
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, block_cls):  # timm's Block or the patch's subclass of it
            what = "parallel attention / MLP branches" if "Parallel" in base.__name__ else "a different block"
            return f"model.blocks[{i}] is a {base.__name__} ({what}), not timm's Block"
        if type(attn) is not attn_cls:
            return f"model.blocks[{i}].attn is a {type(attn).__name__}, not timm's Attention"
    return None


def check_timm(model) -> None:
    """Raise ``TypeError`` (naming the reason and what is supported) unless ``fk.patch.timm`` supports ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; {SUPPORTED}")
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError as exc:  # pragma: no cover - timm is an optional dependency
        raise ImportError("fpet_kernels.patch.timm needs timm (pip install timm)") from exc
    why = _reason(model, VisionTransformer, Block, Attention)
    if why is not None:
        raise TypeError(f"fk.patch.timm cannot patch this model: {why}. {SUPPORTED}")
