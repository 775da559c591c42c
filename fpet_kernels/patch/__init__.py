"""Token-merging patches for Vision Transformers (ToMe, FPET, PYRA) in one call.

    import fpet_kernels as fk
    fk.patch.timm(model, method="tome", r=16)                 # ToMe-compatible; model.r settable afterwards
    fk.patch.timm(model, method="fpet", merge_layer=6)        # one FPET merge, refinement adapter on the metric
    fk.patch.timm(model, method="pyra", r=[16] * 11 + [10])   # PYRA: per-layer r, learned modulation per layer
    feats, st = model.forward_features_with_state(x)          # features + MergeState (size, token_map)
    fk.patch.merge_state(model, x)                            # the same under no_grad, as a dict
    fk.patch.remove(model)                                    # the unpatched model again, same outputs

Stateless: the merge state (token sizes, token map, FPET's grid) is created at the start of every
forward and passed from block to block as an input and an output; no module keeps a tensor between
or after forwards. Gradient checkpointing, ``torch.export``, ``forward_intermediates``, deepcopy /
EMA, pickling and DistributedDataParallel work on a patched model (docs/model_layer.md).

Layout: ``core.py`` holds what any model library's patch shares (the configuration, the state,
attention returning the merge metric, one merge step on the public ops, the patcher registry that
:func:`remove` asks); ``modules.py`` the learned merge modules FPET and PYRA own (``RefinementAdapter``,
``PyraModulation``); ``timm_vit.py`` the timm classes, ``hf_vit.py`` the Hugging Face transformers ones.
timm (transformers) is imported only when a timm (transformers) model is patched, which is why those
two modules are imported inside :func:`timm` / :func:`hf`. Imports run one way: ``ops`` <-
``integrations`` <- ``fpet_kernels.layers`` <- this package <- ``fpet_kernels.pet``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..integrations import peft as _peft
from ..integrations import support
from ..ops.attention import attention_inputs, proportional_sdpa  # noqa: F401 (re-exported)
from .core import METHODS, MergeConfig, MergeState, patcher_of  # noqa: F401
from .modules import PyraModulation, RefinementAdapter  # noqa: F401

__all__ = ["timm", "hf", "remove", "merge_state", "mean_pool", "ensure_block", "MergeConfig", "MergeState", "METHODS"]


def timm(model: nn.Module, method: str = "tome", r=None, prop_attn: bool = True, trace_source: bool = False,
         merge_layer: Optional[int] = None, refine: Optional[bool] = None, binary_refine: Optional[bool] = None,
         backend: Optional[str] = None, grid=None, threshold=None) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place for token merging; returns the model.

    - ``method="tome"``: ToMe bipartite merging of ``r`` tokens per block (``r``: int, per-layer list,
      or ``(r, inflection)``; default 16; ``model.r`` can be changed between forwards).
    - ``method="fpet"``: one FPET merge after the attention of block ``merge_layer`` (0-based,
      default 6; every checkerboard A token goes), the metric refined by FPET's adapter (``refine``,
      default True; 1-bit with ``binary_refine``, default True), trained through the
      straight-through estimator. The checkerboard's ``(H, W)`` grid comes from the patch embedding
      of each input (non-square and ``dynamic_img_size`` models included); ``grid=(H, W)`` gives it
      where the patch embedding cannot (an error if both are known and differ). ``model.r`` raises:
      FPET has no r.
    - ``method="pyra"``: ToMe matching with PYRA's learned modulation; ``r`` per layer (a list or an
      int, default 16), a :class:`~fpet_kernels.patch.modules.PyraModulation` per merging block
      (``block.fk_pyra``); setting ``model.r`` raises (the modulation's size fixes r).

    - ``threshold`` (ToMe, PYRA; issue 21): threshold merging, a number in [-1, 1] for every block or
      a per-block list (None entries: merge exactly r there). Each row merges the A tokens whose best
      cosine score reaches the threshold; ``r`` is then a cap per block (ToMe: ``r=None`` means
      uncapped, i.e. each block's own cap, half its tokens; PYRA: r is the modulation's row count,
      default 16). Rows end with different counts: the batch keeps its longest row, the others are
      padded with rows of size 0 that later attention masks (``log 0``). How many tokens each block
      kept: :func:`merge_state`'s ``"kept"``.

    An argument the chosen method does not use (``r`` with "fpet"; ``merge_layer``, ``refine``,
    ``binary_refine`` or ``grid`` with "tome" / "pyra") raises ``ValueError`` naming it; ``None``
    means "not given". An ``r`` above what a block can merge (half its mergeable tokens, for the
    model's configured image size) is said once, in a warning naming r, the cap and the block.
    The merge modules are created in the mode (train / eval) of the block that holds them. A model
    that is patched already raises ``ValueError``: patching again would replace its learned merge
    modules; call :func:`remove` first.

    ``prop_attn``: proportional attention (``+ log(size)``) once tokens carry sizes.
    ``trace_source``: accepted for compatibility, no effect: the token map is computed whenever it
    is asked for (``forward_features_with_state``, ``merge_state``, ``forward_intermediates``).
    ``backend``: kernel backend of the merge ops (None: automatic; "reference": the pure-PyTorch ops)."""
    if not isinstance(trace_source, bool):
        raise TypeError(f"trace_source must be a bool, got {type(trace_source).__name__}")
    try:
        from . import timm_vit
    except ImportError as exc:  # pragma: no cover - timm is an optional dependency
        raise ImportError("fpet_kernels.patch.timm needs timm (pip install timm)") from exc
    outer, model = model, _peft.unwrap_peft(model)  # a peft.PeftModel: patch the model inside
    support.check_timm(model)
    timm_vit.patch(model, method=method, r=r, prop_attn=prop_attn, merge_layer=merge_layer, refine=refine,
                   binary_refine=binary_refine, backend=backend, grid=grid, threshold=threshold)
    if outer is model:
        return model
    _peft.register_merge_modules(outer)
    for blk in model.blocks:  # PEFT's wrappers (and their copies) follow the block's mode too
        for name in ("fk_refine", "fk_pyra"):
            if getattr(blk, name, None) is not None:
                getattr(blk, name).train(blk.training)
    return outer


def hf(model: nn.Module, method: str = "tome", **kw) -> nn.Module:
    """Patch a Hugging Face transformers model for token merging: ViT / DeiT (``fpet_kernels/patch/hf_vit.py``,
    docs/integrations.md), or a BERT-family text encoder, ``BertModel`` / ``RobertaModel`` and their
    ``*ForSequenceClassification`` (``fpet_kernels/patch/hf_bert.py``: ``attention_mask`` becomes the token
    sizes, ``threshold=`` merging, the output carries ``size``; :func:`mean_pool`; docs/model_layer.md)."""
    from . import hf_bert  # transformers is an optional dependency: imported when a model is patched
    if hf_bert.owns(_peft.unwrap_peft(model)):
        return hf_bert.hf(model, method, **kw)
    from . import hf_vit
    return hf_vit.hf(model, method, **kw)


def mean_pool(output, size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Size-weighted mean pooling of a (merged) sequence -> [B, C]: a patched text model's output (its
    ``last_hidden_state`` and ``size``), or ``mean_pool(hidden [B, N, C], size [B, N])``. Equals the
    ordinary masked mean (sentence-transformers) where nothing merged (``hf_bert.mean_pool``)."""
    from . import hf_bert
    return hf_bert.mean_pool(output, size)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`timm`: the original classes, no merge modules (PET adapters stay). Same outputs as
    before patching. A model that is not patched is returned unchanged. Also undoes :func:`hf`, and
    unpatches the model inside a ``peft.PeftModel``. Each patcher (``core.Patcher``: the timm and the
    Hugging Face one) says which models it owns and removes its own patch."""
    inner = _peft.unwrap_peft(model)
    if inner is not model:
        remove(inner)
        return model
    patcher = patcher_of(model)
    return patcher.remove(model) if patcher is not None else model


def merge_state(model: nn.Module, x: Optional[torch.Tensor] = None, **inputs) -> dict:
    """Run the patched ``model``'s features on ``x`` under ``torch.no_grad()`` and return
    ``{"features": [B, N', C], "size": [B, N', 1] or None (nothing merged), "token_map": [B, N0],
    "kept": [[B] int64 per block]}`` (for each of the N0 input tokens, the row now holding it; -1 for a
    token FPET dropped on a tie; ``fk.unmerge(features, token_map)`` scatters back to the tokens;
    ``kept[i][b]``: the valid tokens row b holds after block i, which differ per row with a threshold;
    ``torch.stack(kept).float().mean(1)`` is the mean per block).

    A patched text model (``fk.patch.hf`` on BERT / RoBERTa) takes its inputs as keywords:
    ``merge_state(model, input_ids=ids, attention_mask=mask)``; its ``size`` is [B, N'] (0: padding).

    The model keeps no state after a forward, so this is an explicit call with the input. To keep
    the autograd graph (a dense head trained on merged features), call
    ``model.forward_features_with_state(x)``, which returns ``(features, MergeState)``."""
    if inputs or x is None:
        from . import hf_bert
        if hf_bert.owns(_peft.unwrap_peft(model)):
            if x is not None:
                inputs["input_ids"] = x
            return hf_bert.merge_state(model, **inputs)
        if inputs:
            raise TypeError(f"merge_state: keyword inputs {sorted(inputs)} are for text models (fk.patch.hf on BERT / "
                            "RoBERTa); a ViT takes merge_state(model, x)")
    fn = getattr(model, "forward_features_with_state", None)
    if fn is None:
        raise ValueError("model is not patched by fpet_kernels.patch (fk.patch.timm)")
    if x is None:
        raise TypeError("merge_state(model, x) needs the input x: the merge state is not kept on the model after a "
                        "forward (it flows through the blocks); this call runs the features on x and returns it")
    with torch.no_grad():
        feats, st = fn(x, track_tokens=True)
    return {"features": feats, "size": st.size, "token_map": st.token_map, "kept": list(st.kept or ())}


def ensure_block(block: nn.Module) -> nn.Module:
    """Swap a timm ``Block`` to the patched block class (idempotent). Without merge state it computes
    exactly timm's forward (plus ``block.fk_adapter(x)`` beside the MLP, if set). A transformers
    ``BertLayer`` / ``RobertaLayer`` gets the patched text layer class the same way (``hf_bert.ensure_layer``:
    the adapter beside the feed-forward, inside its residual)."""
    if type(block).__module__.startswith(("transformers.", "fpet_kernels.patch.hf_bert")):
        from . import hf_bert
        return hf_bert.ensure_layer(block)
    from . import timm_vit
    return timm_vit.ensure_block(block)
