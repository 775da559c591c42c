"""Token-merging patches for Hugging Face transformers ViT and DeiT (ToMe, FPET, PYRA) in one call.

    import fpet_kernels as fk
    fk.patch.hf(model, method="tome", r=16)            # ViTModel, ViTForImageClassification, DeiT*
    fk.patch.hf(model, method="fpet", merge_layer=6)
    fk.patch.hf(model, method="pyra", r=[16] * 11 + [10])
    fk.patch.remove(model)                             # the unpatched model again, same outputs

Same semantics as ``fk.patch.timm`` on the same weights: after the attention (and its residual) of
a merging layer the tokens are merged on the keys averaged over heads; later layers add
``log(size)`` to their attention logits (``prop_attn``); prefix tokens (class, distillation) are
never merged, so ``[:, 0]`` (and DeiT's ``[:, 1]``) still hold them for the heads.

How (stateless): the base model's class (``ViTModel`` / ``DeiTModel``) and each layer's class are
swapped for the real subclasses below; nothing is copied. The patched model forward runs the
embeddings, then the layer loop with the merge state (``size``, the token map) passed *through the
layer calls* as inputs and outputs; no tensor is kept on a module between forwards. Only static
settings live on the base model: ``base.fk_config``, the same :class:`~fpet_kernels.patch.core.MergeConfig`
as the timm patch's (``base.r`` reads ToMe's r and sets it between forwards, like timm's ``model.r``), and
the merge itself is the shared ``patch/core.merge_step`` (PYRA through ``PyraModulation.forward``). Layers that neither merge nor see merged sizes call
transformers' own attention unchanged (eager / sdpa / flash as configured); the others compute the
attention with SDPA (``log(size)`` folded into an extra key channel: ``fk.proportional_sdpa``).

Supported: transformers' current ViT layout (``model.layers`` of ``ViTLayer``, attention with
``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``). ``output_attentions`` and ``attention_mask`` are
refused on a patched model (merging changes the token count mid-model). With ``trace_source=True``
the base model's output carries ``size`` [B, N', 1] and ``token_map`` [B, N0] (for each input token,
the output row holding it: ``fk.unmerge(y, token_map)`` scatters back to the grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.peft import register_merge_modules, unwrap_peft
from ..ops.attention import proportional_sdpa
from .core import (MergeConfig, MergeState, MergingModel, Patcher, already_patched, attach_merge_modules,
                   layer_settings, merge_step, merges, method_arguments, register_patcher, warn_capped)
from .modules import PyraModulation

try:
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.deit import modeling_deit as _deit
    from transformers.models.vit import modeling_vit as _vit
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("fpet_kernels.patch.hf needs transformers (pip install transformers)") from exc

try:  # the decorators transformers puts on ViTModel.forward (config defaults, output_hidden_states)
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs
except ImportError:  # pragma: no cover - older transformers: checked in _base_model
    merge_with_config_defaults = capture_outputs = _CAN_RECORD_REGISTRY = None

SUPPORTED = ("transformers ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification, "
             "DeiTForImageClassificationWithTeacher")


@dataclass
class MergedOutputWithPooling(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus the merge state (with ``trace_source=True``): ``size``,
    ``token_map`` and ``kept`` (per layer, a [B] int64 tensor of the valid tokens each row holds)."""
    size: Optional[torch.Tensor] = None
    token_map: Optional[torch.Tensor] = None
    kept: Optional[tuple] = None


# ----------------------------------------------------------------------------- attention
def attention_with_metric(attn: nn.Module, x, size, backend: Optional[str] = None):
    """transformers ``ViTAttention`` on ``x`` with its own projections, returning ``(out, metric)``:
    ``metric`` [B, N, head_dim] is the keys averaged over heads; with ``size`` the logits get
    ``+ log(size)`` exactly (``proportional_sdpa``)."""
    bsz, n, _ = x.shape
    shape = (bsz, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    metric = k.float().mean(1).to(k.dtype)
    dropout_p = attn.attention_dropout if attn.training else 0.0
    if size is not None:
        out = proportional_sdpa(q, k, v, size, attn.scaling, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=attn.scaling)
    return attn.o_proj(out.transpose(1, 2).reshape(bsz, n, -1)), metric


# ----------------------------------------------------------------------------- patched classes
class _FKLayer:
    """Mixin before transformers' ``ViTLayer`` / ``DeiTLayer``. Called as transformers calls it
    (``layer(x, attention_mask)``) it is the original layer; called with ``(x, None, state, r)`` (a
    :class:`~fpet_kernels.patch.core.MergeState`) it merges ``r`` tokens after the attention (the shared
    ``merge_step``) when ``r > 0`` and returns ``(x, state)``."""

    def forward(self, hidden_states, attention_mask=None, state: Optional[MergeState] = None, r: Optional[int] = 0,
                threshold: Optional[float] = None, **kwargs):
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("token merging does not support attention_mask")
        cfg = state.config
        prop_size = state.attention_size()  # the sizes (prop_attn), or the padding mask of a threshold merge
        merge = merges(r, threshold)
        h = self.layernorm_before(hidden_states)
        if merge or prop_size is not None:
            h, metric = attention_with_metric(self.attention, h, prop_size, cfg.backend)
        else:  # transformers' own attention, unchanged
            h, metric = self.attention(h, None, **kwargs)[0], None
        x = self.dropout(h) + hidden_states
        if merge:
            x, state = merge_step(x, metric, state, r, getattr(self, "fk_refine", None), getattr(self, "fk_pyra", None),
                                  threshold)
        return self.dropout(self.mlp(self.layernorm_after(x))) + x, state


class _FKModel(MergingModel):
    """Mixin before transformers' ``ViTModel`` / ``DeiTModel``: the layer loop carries the merge state."""

    def fk_units(self) -> list:
        return list(self.layers)

    def fk_tokens(self) -> Optional[int]:
        return configured_tokens(self)

    def fk_fixed_r(self) -> str:
        why = ("FPET has no r (it merges every checkerboard A token at merge_layer)" if self.fk_config.method == "fpet"
               else "PYRA's per-layer r is fixed by its learned modulation (layers[i].fk_pyra.a has r rows)")
        return f"model.r: {why}; fk.patch.remove(model), then patch again with the new setting"

    def _fk_forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                    attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("a model patched for token merging does not support attention_mask")
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            raise ValueError("a model patched for token merging does not return attentions "
                             "(output_attentions=True); fk.patch.remove(model) first")
        if pixel_values is None:
            raise ValueError("pixel_values must be given")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                            interpolate_pos_encoding=interpolate_pos_encoding)
        cfg = self.fk_config
        state = MergeState.start(x, cfg, track_tokens=cfg.trace_source)
        for layer, (r, t) in zip(self.layers, self.fk_layer_schedule()):
            if not merges(r, t) and state.size is None:  # nothing merged yet: transformers' layer
                x = layer(x, None, **kwargs)
            else:
                x, state = layer(x, None, state, r, threshold=t, **kwargs)
            state = state.record_kept(x)
        seq = self.layernorm(x)
        if state.padded:  # threshold merging: rows of different lengths, padding rows (size 0) are 0
            seq = torch.where(state.size > 0, seq, torch.zeros((), dtype=seq.dtype, device=seq.device))
        pooled = self.pooler(seq) if self.pooler is not None else None
        if cfg.trace_source:  # nothing merged: no size, no map (as before any merge)
            merged = state.size is not None
            return MergedOutputWithPooling(last_hidden_state=seq, pooler_output=pooled, size=state.size,
                                           token_map=state.token_map if merged else None, kept=state.kept)
        return BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled)

    if capture_outputs is not None:
        forward = merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(_fk_forward))
    else:  # pragma: no cover
        forward = _fk_forward


class FKViTLayer(_FKLayer, _vit.ViTLayer):
    _fk_base_class = _vit.ViTLayer


class FKDeiTLayer(_FKLayer, _deit.DeiTLayer):
    _fk_base_class = _deit.DeiTLayer


class FKViTModel(_FKModel, _vit.ViTModel):
    _fk_base_class = _vit.ViTModel


class FKDeiTModel(_FKModel, _deit.DeiTModel):
    _fk_base_class = _deit.DeiTModel


_PATCHED = {_vit.ViTModel: (FKViTModel, _vit.ViTLayer, FKViTLayer),
            _deit.DeiTModel: (FKDeiTModel, _deit.DeiTLayer, FKDeiTLayer)}
# Wrappers whose head reads only the prefix tokens (so merging the patch tokens is sound).
_WRAPPERS = {_vit.ViTForImageClassification: "vit", _deit.DeiTForImageClassification: "deit",
             _deit.DeiTForImageClassificationWithTeacher: "deit"}


# ----------------------------------------------------------------------------- entry points
def is_hf_model(model) -> bool:
    """Whether ``model`` is one of the transformers ViT / DeiT classes :func:`hf` patches."""
    t = getattr(model, "_fk_base_class", type(model))
    return t in _PATCHED or t in _WRAPPERS


def _base_model(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` / ``DeiTModel`` that :func:`hf` patches (``model`` or its ``.vit`` / ``.deit``)."""
    t = type(model)
    if t in _WRAPPERS:
        base = getattr(model, _WRAPPERS[t])
    elif t in _PATCHED or isinstance(model, (FKViTModel, FKDeiTModel)):
        base = model
    else:
        raise TypeError(f"fk.patch.hf supports {SUPPORTED}; got {t.__name__} (timm ViTs: fk.patch.timm)")
    base_cls = getattr(base, "_fk_base_class", type(base))
    if base_cls not in _PATCHED:
        raise TypeError(f"fk.patch.hf supports {SUPPORTED}; got {t.__name__} holding {type(base).__name__}")
    layers = getattr(base, "layers", None)
    layer_cls = _PATCHED[base_cls][1]
    if (capture_outputs is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0
            or not all(isinstance(lyr, layer_cls) and hasattr(lyr.attention, "q_proj") for lyr in layers)):
        import transformers
        raise TypeError(f"fk.patch.hf needs transformers' current ViT layout (model.layers of {layer_cls.__name__} "
                        f"with q_proj/k_proj/v_proj attention); transformers {transformers.__version__} builds "
                        f"{type(base).__name__} differently")
    return base


def merge_modules(base: nn.Module) -> list:
    """Names of the learned merge modules a patch added (``layers.1.fk_refine``, ...)."""
    return [f"layers.{i}.{name}" for i, layer in enumerate(base.layers)
            for name in ("fk_refine", "fk_pyra") if getattr(layer, name, None) is not None]


def hf(model: nn.Module, method: str = "tome", r=None, prop_attn: bool = True, trace_source: bool = False,
       merge_layer: Optional[int] = None, refine: Optional[bool] = None, binary_refine: Optional[bool] = None,
       backend: Optional[str] = None, threshold=None):
    """Patch a transformers ViT / DeiT in place for token merging; returns ``model``. Arguments as
    :func:`fpet_kernels.patch.timm` (``r``, ``threshold``, ``merge_layer``, ``refine``, ``binary_refine``,
    ``prop_attn``, ``backend``; ``None``: the method's default), with the same rules: an argument the
    method does not use raises ``ValueError`` naming it, an ``r`` above a layer's cap is said once,
    the merge modules take the mode of their layer, and a patched model raises (call
    ``fk.patch.remove(model)`` first). The merge modules live on the layers
    (``layers[i].fk_refine``, ``layers[i].fk_pyra``). A ``peft.PeftModel`` wrapping one is accepted."""
    outer, model = model, unwrap_peft(model)
    base = _base_model(model)
    args = method_arguments(method, dict(r=r, merge_layer=merge_layer, refine=refine, binary_refine=binary_refine,
                                         threshold=threshold), "fk.patch.hf")
    if not isinstance(trace_source, bool):
        raise TypeError(f"trace_source must be a bool, got {type(trace_source).__name__}")
    layers = base.layers
    n = len(layers)
    emb = base.embeddings
    dist = getattr(emb, "distillation_token", None) is not None
    cfg = MergeConfig(method=method, prop_attn=bool(prop_attn), backend=backend, class_token=True, distill_token=dist,
                      num_prefix=1 + int(dist), r=None, trace_source=trace_source, threshold=threshold)
    merge_layer, rs, _ = layer_settings(method, args, threshold, n)
    if method == "fpet":
        cfg.merge_layer = merge_layer
    if is_patched_hf(base):  # checked after the arguments: a bad argument is named first
        raise already_patched("fk.patch.hf", base.fk_config.method, merge_modules(base))
    if method != "fpet":
        warn_capped(rs, configured_tokens(base, cfg), cfg, args["r"], "layer", stacklevel=4)
    head_dim = layers[merge_layer].attention.head_dim if merge_layer is not None else None
    new = attach_merge_modules(base, layers, method, args, merge_layer, rs, head_dim, base.config.hidden_size)
    if method == "tome":
        cfg.r = args["r"]
    base.fk_config = cfg
    fk_model, _, fk_layer = _PATCHED[type(base)]
    for layer in layers:
        layer.__class__ = fk_layer
    base.__class__ = fk_model
    # transformers keys the outputs it can record (output_hidden_states) on the model's class name
    _CAN_RECORD_REGISTRY[base] = getattr(base, "_can_record_outputs", None)
    if outer is model:
        return model
    register_merge_modules(outer)
    for (i, name) in new:  # PEFT's wrappers (and their copies) follow the layer's mode too
        getattr(layers[i], name).train(layers[i].training)
    return outer


def configured_tokens(base: nn.Module, cfg: Optional[MergeConfig] = None) -> Optional[int]:
    """Tokens into the first layer for the model's configured image size (None: not fixed)."""
    cfg = base.fk_config if cfg is None else cfg
    n = getattr(base.embeddings.patch_embeddings, "num_patches", None)
    return None if not isinstance(n, int) else n + cfg.num_prefix


def remove_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`hf`: the original classes, no merge modules, no settings. Same outputs as before."""
    model = unwrap_peft(model)
    base = _base_model(model)
    for layer in base.layers:
        for name in ("fk_refine", "fk_pyra"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.__class__ = getattr(layer, "_fk_base_class", type(layer))
    for name in ("fk_config", "r"):
        base.__dict__.pop(name, None)
    base.__class__ = getattr(base, "_fk_base_class", type(base))
    return model


def is_patched_hf(model: nn.Module) -> bool:
    """Whether :func:`hf` patched ``model`` (or the base model it wraps)."""
    try:
        return getattr(_base_model(unwrap_peft(model)), "fk_config", None) is not None
    except TypeError:
        return False


def owns(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ViT / DeiT this patcher patches (patched or not)."""
    return is_hf_model(model)


register_patcher(Patcher("hf", owns, remove_hf))
