"""Token merging in Hugging Face transformers text encoders of the BERT family (ToMe, FPET, PYRA,
threshold merging) on padded batches, in one call.

    import fpet_kernels as fk
    fk.patch.hf(bert, method="tome", r=8)                  # BertModel / RobertaModel (MiniLM is a BertModel)
    fk.patch.hf(bert, method="tome", threshold=0.9)        # threshold merging (r: a cap, None: uncapped)
    fk.patch.hf(bert, method="fpet", merge_layer=2)        # one FPET merge (1-D alternating split)
    fk.patch.hf(bert, method="pyra", r=[8] * 6)
    out = bert(input_ids, attention_mask=mask)             # out.last_hidden_state [B, N', C], out.size [B, N']
    emb = fk.patch.mean_pool(out)                          # size-weighted mean (sentence-transformers pooling)
    fk.patch.remove(bert)

Supported: ``BertModel``, ``BertForSequenceClassification``, ``RobertaModel``,
``RobertaForSequenceClassification`` as transformers 5.x builds them (``encoder.layer`` of
``BertLayer`` / ``RobertaLayer`` with ``query`` / ``key`` / ``value`` attention), encoders only
(``is_decoder`` / cross-attention refused). The sequence-classification heads read ``[CLS]`` (row 0),
which is never merged.

How (stateless, as ``hf_vit.py``): the base model's class and each layer's class are swapped for
the subclasses below; the patched forward runs transformers' embeddings (position embeddings as the
unpatched model computes them), then the layer loop with the merge state passed through the layer
calls. Only static settings live on the model (``base.fk_config``).

**Padding.** ``attention_mask`` [B, N] (bool, or 0 / 1 integers or floats; anything else raises
naming ``attention_mask``) becomes the token size: 1 for a token, 0 for padding, and the merges
run per row (``padded=True``, docs/semantics.md "Padded batches and threshold merging"). Padding
that is not at the right end (left padding, holes) is normalised after the embeddings: each row's
tokens are reordered valid first (a stable reorder, so position embeddings are those of the
original positions). Attention adds ``log(size)`` to its logits, which masks padding keys exactly
(``log 0 = -inf``), also without ``prop_attn`` (then the 0 / 1 mask only). A right-padded row's
valid outputs equal the same sequence run alone. The output is right-padded: each row's valid
tokens first; its padding rows are 0.

**Output** (:class:`MergedTextOutput`): ``last_hidden_state`` [B, N', C] of the merged length,
``pooler_output``, ``size`` [B, N'] float32 (tokens each row stands for, 0 for padding: always
given), and with ``trace_source=True`` ``token_map`` [B, N0] (for each input token, in the input's
own order, the output row holding it; -1 for padding) and ``kept`` (per layer a [B] int64 tensor:
the valid tokens each row holds after that layer). :func:`mean_pool` is the size-weighted mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..integrations.peft import register_merge_modules, unwrap_peft
from ..ops.attention import proportional_sdpa
from .core import (MergeConfig, MergeState, MergingModel, Patcher, already_patched, attach_merge_modules,
                   layer_settings, merge_step, merges, method_arguments, register_patcher)

try:
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    from transformers.models.bert import modeling_bert as _bert
    from transformers.models.roberta import modeling_roberta as _roberta
    from transformers.pytorch_utils import apply_chunking_to_forward
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("fpet_kernels.patch.hf needs transformers (pip install transformers)") from exc

try:  # the decorators transformers puts on BertModel.forward (config defaults, output_hidden_states)
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs
except ImportError:  # pragma: no cover - older transformers: checked in _base_model
    merge_with_config_defaults = capture_outputs = _CAN_RECORD_REGISTRY = None

SUPPORTED = ("transformers BertModel, BertForSequenceClassification, RobertaModel, RobertaForSequenceClassification "
             "(encoders; MiniLM / all-MiniLM-L6-v2 is a BertModel)")

__all__ = ["MergedTextOutput", "hf", "mean_pool", "check_attention_mask", "merge_state", "ensure_layer", "owns",
           "is_text_model"]


@dataclass
class MergedTextOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """``BaseModelOutputWithPoolingAndCrossAttentions`` plus the merge state: ``size`` [B, N'] float32
    (0: padding; always set), and with ``trace_source=True`` ``token_map`` [B, N0] and ``kept`` (a
    tuple, per layer, of [B] int64 valid-token counts)."""
    size: Optional[Tensor] = None
    token_map: Optional[Tensor] = None
    kept: Optional[Tuple[Tensor, ...]] = None


# ----------------------------------------------------------------------------- inputs
_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_attention_mask(attention_mask, shape) -> Optional[Tensor]:
    """``attention_mask`` as a [B, N] bool tensor (True: a token), or None. Accepts bool, integer or
    floating masks holding only 0 and 1; anything else raises naming ``attention_mask`` (the value
    check is one host sync)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, N] of 0 / 1 (or bool), got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have shape [B, N] = {list(shape)} (1 for a token, 0 for padding), got "
                         f"{list(attention_mask.shape)}; a model patched for token merging takes the 2-D 0 / 1 mask "
                         "only (no 4-D or additive masks)")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex() or attention_mask.dtype not in _MASK_DTYPES and not attention_mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool or hold 0 / 1 as integers or floats, got dtype "
                        f"{attention_mask.dtype}")
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        v = attention_mask[bad].flatten()[0].item()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token) values (or be bool), got {v!r}; "
                         "a soft or additive mask cannot become token sizes")
    return attention_mask != 0


def to_right_padding(x: Tensor, mask: Tensor, track: bool):
    """Reorder each row's tokens valid first (stable): ``(x', mask', token_map or None)``; the map gives,
    for each input token, its row in ``x'`` (-1 for padding)."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))
    tmap = None
    if track:
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
        inv = torch.empty_like(order).scatter_(1, order, pos)
        tmap = torch.where(mask, inv, torch.full_like(inv, -1))
    return x, mask.gather(1, order), tmap


def mean_pool(output, size: Optional[Tensor] = None) -> Tensor:
    """Size-weighted mean over the tokens: ``sum_n size_n h_n / sum_n size_n`` -> [B, C].

    ``output``: a :class:`MergedTextOutput` (its ``last_hidden_state`` and ``size``), or a hidden
    state [B, N, C] with ``size`` [B, N] or [B, N, 1] (an unpatched model's ``attention_mask`` works
    as the size). Where nothing merged the sizes are the attention mask, so this is the ordinary
    masked mean (sentence-transformers' pooling); after merging, each merged row counts for the
    tokens it stands for, so it is the mean over the original tokens of their merged values. A row
    without tokens (fully padded) gives 0."""
    if size is None:
        if not hasattr(output, "last_hidden_state") or getattr(output, "size", None) is None:
            raise TypeError("mean_pool(output) needs a patched text model's output (with .size), or "
                            "mean_pool(hidden [B, N, C], size [B, N])")
        hidden, size = output.last_hidden_state, output.size
    else:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"mean_pool: hidden states must be [B, N, C], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if not isinstance(size, Tensor):
        raise TypeError(f"mean_pool: size must be a tensor [B, N], got {type(size).__name__}")
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size[..., 0]
    if tuple(size.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mean_pool: size must be [B, N] = {list(hidden.shape[:2])}, got {list(size.shape)}")
    w = size.to(hidden.dtype).unsqueeze(-1)
    num = (torch.where(w != 0, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)) * w).sum(1)
    den = w.sum(1)
    return num / torch.where(den == 0, torch.ones_like(den), den)


# ----------------------------------------------------------------------------- attention
def self_attention_with_metric(sa: nn.Module, x: Tensor, size: Optional[Tensor]):
    """transformers ``BertSelfAttention`` / ``RobertaSelfAttention`` on ``x`` with its own projections:
    ``(context [B, N, C], metric [B, N, head_dim])``, the metric the keys averaged over heads; with
    ``size`` the logits get ``+ log(size)`` exactly (``proportional_sdpa``; size 0 masks a key)."""
    bsz, n, _ = x.shape
    shape = (bsz, n, sa.num_attention_heads, sa.attention_head_size)
    q = sa.query(x).view(shape).transpose(1, 2)
    k = sa.key(x).view(shape).transpose(1, 2)
    v = sa.value(x).view(shape).transpose(1, 2)
    metric = k.float().mean(1).to(k.dtype)
    dropout_p = sa.dropout.p if sa.training else 0.0
    if size is not None:
        out = proportional_sdpa(q, k, v, size, sa.scaling, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=sa.scaling)
    return out.transpose(1, 2).reshape(bsz, n, sa.all_head_size), metric


# ----------------------------------------------------------------------------- patched classes
class _FKTextLayer:
    """Mixin before transformers' ``BertLayer`` / ``RobertaLayer``. Called as transformers calls it, it
    is the original layer (plus ``fk_adapter`` beside the feed-forward when AdaptFormer set one);
    called with ``state=`` (a :class:`~fpet_kernels.patch.core.MergeState`) it runs the attention
    (``log(size)`` added once tokens carry sizes or padding), merges after the attention output
    (``r`` / ``threshold``, the shared ``merge_step``) and returns ``(x, state)``."""

    def forward(self, hidden_states, attention_mask=None, *args, state: Optional[MergeState] = None, r=0,
                threshold=None, **kwargs):
        if state is None:
            if getattr(self, "fk_adapter", None) is None:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            a = self.attention(hidden_states, attention_mask, **kwargs)[0]
            return self._fk_feed_forward(a)
        if attention_mask is not None:
            raise ValueError("the merge state carries the padding: pass attention_mask to the model, not the layer")
        size = state.attention_size()
        merge = merges(r, threshold)
        if merge or size is not None:
            h, metric = self_attention_with_metric(self.attention.self, hidden_states, size)
        else:  # transformers' own attention, unchanged
            h, metric = self.attention.self(hidden_states, None, **kwargs)[0], None
        a = self.attention.output(h, hidden_states)
        if merge:
            a, state = merge_step(a, metric, state, r, getattr(self, "fk_refine", None),
                                  getattr(self, "fk_pyra", None), threshold)
        return self._fk_feed_forward(a), state

    def _fk_feed_forward(self, a: Tensor) -> Tensor:
        adapter = getattr(self, "fk_adapter", None)
        if adapter is None:
            return apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, a)
        out = self.output  # AdaptFormer: the adapter beside the feed-forward, inside its residual
        y = out.dropout(out.dense(self.intermediate(a)))
        return out.LayerNorm(y + a + adapter(a))


class _FKTextModel(MergingModel):
    """Mixin before transformers' ``BertModel`` / ``RobertaModel``: padding to sizes, the layer loop
    with the merge state, the merged output."""

    @property
    def layers(self):
        return self.encoder.layer

    def fk_units(self) -> list:
        return list(self.layers)

    def fk_fixed_r(self) -> str:
        why = ("FPET has no r (it merges every A token of the sequence at merge_layer)" if self.fk_config.method == "fpet"
               else "PYRA's per-layer r is fixed by its learned modulation (layers[i].fk_pyra.a has r rows)")
        return f"model.r: {why}; fk.patch.remove(model), then patch again with the new setting"

    def forward_with_state(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                           inputs_embeds=None, track_tokens: bool = True, **kwargs):
        """The patched forward returning ``(MergedTextOutput, MergeState)`` (with ``track_tokens``: the
        token map and the per-layer ``kept`` counts in both)."""
        return self._fk_encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               track_tokens, kwargs)

    def _fk_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                    inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None, cache=None,
                    use_cache=None, **kwargs):
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("a model patched for token merging is an encoder: encoder_hidden_states / "
                             "encoder_attention_mask are not supported")
        if cache is not None or kwargs.pop("past_key_values", None) is not None:  # use_cache: no effect (an encoder)
            raise ValueError("a model patched for token merging does not use a cache (cache=)")
        return self._fk_encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               self.fk_config.trace_source, kwargs)[0]

    def _fk_encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, track, kwargs):
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            raise ValueError("a model patched for token merging does not return attentions "
                             "(output_attentions=True); fk.patch.remove(model) first")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds)
        mask = check_attention_mask(attention_mask, x.shape[:2])
        cfg = self.fk_config
        tmap = None
        if mask is not None:
            x, mask, tmap = to_right_padding(x, mask, track)
        grid = (1, x.shape[1] - cfg.num_prefix) if cfg.method == "fpet" else None
        state = MergeState.start(x, cfg, grid, track, mask=mask, token_map=tmap)
        for layer, (r, t) in zip(self.layers, self.fk_layer_schedule()):
            if not merges(r, t) and state.size is None:  # nothing merged or padded: transformers' layer
                x = layer(x, None, **kwargs)
            else:
                x, state = layer(x, None, state=state, r=r, threshold=t, **kwargs)
            state = state.record_kept(x)
        if state.size is None:
            size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        else:
            size = state.size[..., 0]
            if state.padded:  # padding rows are 0
                x = torch.where(size.unsqueeze(-1) > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
        pooled = self.pooler(x) if self.pooler is not None else None
        out = MergedTextOutput(last_hidden_state=x, pooler_output=pooled, size=size,
                               token_map=state.token_map if track else None, kept=state.kept)
        return out, state

    if capture_outputs is not None:
        forward = merge_with_config_defaults(capture_outputs(tie_last_hidden_states=False)(_fk_forward))
    else:  # pragma: no cover
        forward = _fk_forward


class FKBertLayer(_FKTextLayer, _bert.BertLayer):
    _fk_base_class = _bert.BertLayer


class FKRobertaLayer(_FKTextLayer, _roberta.RobertaLayer):
    _fk_base_class = _roberta.RobertaLayer


class FKBertModel(_FKTextModel, _bert.BertModel):
    _fk_base_class = _bert.BertModel


class FKRobertaModel(_FKTextModel, _roberta.RobertaModel):
    _fk_base_class = _roberta.RobertaModel


_PATCHED = {_bert.BertModel: (FKBertModel, _bert.BertLayer, FKBertLayer),
            _roberta.RobertaModel: (FKRobertaModel, _roberta.RobertaLayer, FKRobertaLayer)}
_LAYERS = {_bert.BertLayer: FKBertLayer, _roberta.RobertaLayer: FKRobertaLayer}
_LAYER_BASES = {v: k for k, v in _LAYERS.items()}
# Wrappers whose head reads only [CLS] (so merging the other tokens is sound).
_WRAPPERS = {_bert.BertForSequenceClassification: "bert", _roberta.RobertaForSequenceClassification: "roberta"}


# ----------------------------------------------------------------------------- entry points
def is_text_model(model) -> bool:
    """Whether ``model`` is one of the transformers classes :func:`hf` patches here (patched or not)."""
    t = getattr(model, "_fk_base_class", type(model))
    return t in _PATCHED or t in _WRAPPERS


owns = is_text_model


def _base_model(model: nn.Module) -> nn.Module:
    t = type(model)
    if t in _WRAPPERS:
        base = getattr(model, _WRAPPERS[t])
    elif t in _PATCHED or isinstance(model, (FKBertModel, FKRobertaModel)):
        base = model
    else:
        raise TypeError(f"fk.patch.hf supports {SUPPORTED}; got {t.__name__}")
    base_cls = getattr(base, "_fk_base_class", type(base))
    if base_cls not in _PATCHED:
        raise TypeError(f"fk.patch.hf supports {SUPPORTED}; got {t.__name__} holding {type(base).__name__}")
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    layer_cls = _PATCHED[base_cls][1]
    if (capture_outputs is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0
            or not all(isinstance(lyr, layer_cls) and hasattr(lyr.attention.self, "query") for lyr in layers)):
        import transformers
        raise TypeError(f"fk.patch.hf needs transformers' current BERT layout (encoder.layer of {layer_cls.__name__} "
                        f"with query/key/value attention); transformers {transformers.__version__} builds "
                        f"{type(base).__name__} differently")
    if base.config.is_decoder or getattr(base.config, "add_cross_attention", False):
        raise TypeError(f"fk.patch.hf patches encoders only; this {type(base).__name__} is a decoder "
                        "(config.is_decoder / add_cross_attention)")
    return base


def merge_modules(base: nn.Module) -> list:
    """Names of the learned merge modules a patch added (``encoder.layer.1.fk_refine``, ...)."""
    return [f"encoder.layer.{i}.{name}" for i, layer in enumerate(base.encoder.layer)
            for name in ("fk_refine", "fk_pyra") if getattr(layer, name, None) is not None]


def is_patched(model: nn.Module) -> bool:
    try:
        return getattr(_base_model(unwrap_peft(model)), "fk_config", None) is not None
    except TypeError:
        return False


def ensure_layer(layer: nn.Module) -> nn.Module:
    """Swap a ``BertLayer`` / ``RobertaLayer`` to the patched class (idempotent): called as transformers
    calls it, the original layer (plus ``layer.fk_adapter`` beside the feed-forward, if set)."""
    t = type(layer)
    if t in _LAYERS:
        if getattr(layer, "is_decoder", False):
            raise TypeError(f"{t.__name__} is a decoder layer; fpet_kernels supports encoder layers only")
        layer.__class__ = _LAYERS[t]
    elif t not in _LAYER_BASES:
        raise TypeError(f"layer must be a transformers BertLayer or RobertaLayer, got {t.__name__}")
    return layer


def hf(model: nn.Module, method: str = "tome", r=None, prop_attn: bool = True, trace_source: bool = False,
       merge_layer: Optional[int] = None, refine: Optional[bool] = None, binary_refine: Optional[bool] = None,
       backend: Optional[str] = None, threshold=None):
    """Patch a transformers BERT / RoBERTa encoder in place for token merging; returns ``model``.
    Arguments as :func:`fpet_kernels.patch.timm` (``r``, ``threshold``, ``merge_layer``, ``refine``,
    ``binary_refine``, ``prop_attn``, ``backend``), same rules (an argument the method does not use
    raises naming it; a patched model raises). ``[CLS]`` (row 0) is protected; FPET merges a sequence
    as the grid ``(1, N - 1)``. ``trace_source``: the output carries ``token_map`` and ``kept``."""
    outer, model = model, unwrap_peft(model)
    base = _base_model(model)
    args = method_arguments(method, dict(r=r, merge_layer=merge_layer, refine=refine, binary_refine=binary_refine,
                                         threshold=threshold), "fk.patch.hf")
    if not isinstance(trace_source, bool):
        raise TypeError(f"trace_source must be a bool, got {type(trace_source).__name__}")
    layers = base.encoder.layer
    n = len(layers)
    cfg = MergeConfig(method=method, prop_attn=bool(prop_attn), backend=backend, class_token=True,
                      distill_token=False, num_prefix=1, r=None, trace_source=trace_source,
                      threshold=threshold)
    merge_layer, rs, _ = layer_settings(method, args, threshold, n)
    if method == "fpet":
        cfg.merge_layer = merge_layer
    if is_patched(base):  # checked after the arguments: a bad argument is named first
        raise already_patched("fk.patch.hf", base.fk_config.method, merge_modules(base))
    head_dim = layers[merge_layer].attention.self.attention_head_size if merge_layer is not None else None
    new = attach_merge_modules(base, layers, method, args, merge_layer, rs, head_dim, base.config.hidden_size)
    if method == "tome":
        cfg.r = args["r"]
    base.fk_config = cfg
    fk_model, _, _ = _PATCHED[type(base)]
    for layer in layers:
        ensure_layer(layer)
    base.__class__ = fk_model
    # transformers keys the outputs it can record (output_hidden_states) on the model's class name
    _CAN_RECORD_REGISTRY[base] = getattr(base, "_can_record_outputs", None)
    if outer is model:
        return model
    register_merge_modules(outer)
    for (i, name) in new:  # PEFT's wrappers (and their copies) follow the layer's mode too
        getattr(layers[i], name).train(layers[i].training)
    return outer


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`hf`: the original classes, no merge modules, no settings (AdaptFormer's adapters stay,
    their layers keep the patched class that adds them). Same outputs as before patching."""
    model = unwrap_peft(model)
    base = _base_model(model)
    for layer in base.encoder.layer:
        for name in ("fk_refine", "fk_pyra"):
            if hasattr(layer, name):
                delattr(layer, name)
        if type(layer) in _LAYER_BASES and getattr(layer, "fk_adapter", None) is None:
            layer.__class__ = _LAYER_BASES[type(layer)]
    base.__dict__.pop("fk_config", None)
    base.__class__ = getattr(base, "_fk_base_class", type(base))
    return model


def merge_state(model: nn.Module, **inputs) -> dict:
    """Run the patched text ``model`` on ``inputs`` (``input_ids``, ``attention_mask``, ...) under
    ``torch.no_grad()``: ``{"features", "size" [B, N'], "token_map" [B, N0], "kept" [per layer [B]]}``."""
    base = _base_model(unwrap_peft(model))
    if getattr(base, "fk_config", None) is None:
        raise ValueError("model is not patched by fpet_kernels.patch (fk.patch.hf)")
    with torch.no_grad():
        out, _ = base.forward_with_state(**inputs, track_tokens=True)
    return {"features": out.last_hidden_state, "size": out.size, "token_map": out.token_map, "kept": list(out.kept)}


register_patcher(Patcher("hf-text", owns, remove))
