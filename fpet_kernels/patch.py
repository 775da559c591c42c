"""Token-merging patches for timm Vision Transformers (ToMe, FPET, PYRA) in one call.

    import fpet_kernels as fk
    fk.patch.timm(model, method="tome", r=16)                 # ToMe-compatible; model.r settable afterwards
    fk.patch.timm(model, method="fpet", merge_layer=6)        # one FPET merge, refinement adapter on the metric
    fk.patch.timm(model, method="pyra", r=[16] * 11 + [10])   # PYRA: per-layer r, learned modulation per layer
    fk.patch.remove(model)                                    # the unpatched model again, same outputs

How: the model's, and each block's, class is swapped for a subclass (the instance keeps every timm
submodule and weight; nothing is copied). A patched block runs timm's own ``norm1``, ``attn.qkv``,
``q_norm``/``k_norm``, ``proj``, ``ls1``/``ls2``, ``drop_path``, ``norm2`` and ``mlp``; only the
attention core changes when it must: it returns the keys averaged over heads (the merge metric)
from the same qkv projection, and with merged tokens adds ``log(size)`` to the logits exactly, by
folding it into one extra key channel (head dim padded to a multiple of 8) so SDPA's fused kernels
still run (spec section 4). Blocks that neither merge nor see merged sizes call timm's attention
unchanged. Prefix tokens (class, distillation, registers: ``model.num_prefix_tokens``) are never merged.

Per forward, the merge state (``size``, and with ``trace_source`` the compact ``token_map``
[B, N0] of the patch tokens onto the current tokens) lives in ``model._fk_info``; after a forward,
``fk.patch.merge_state(model)`` returns it (``fk.unmerge(y, token_map)`` scatters back to the grid).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops.attention import attention_inputs, proportional_sdpa  # noqa: F401 (re-exported)
from .ops.fpet import fpet_merge
from .ops.pyra import pyra_merge
from .ops.tome import compose_token_map, parse_r, tome_merge

METHODS = ("tome", "fpet", "pyra")


# ----------------------------------------------------------------------------- attention
def attention_with_metric(attn: nn.Module, x, size, prop_attn: bool, backend: Optional[str] = None):
    """timm ``Attention`` on ``x`` with its own submodules, returning ``(out, metric)``: ``metric``
    [B, N, head_dim] is the keys averaged over heads; with ``size`` and ``prop_attn`` the logits get
    ``+ log(size)`` (folded into SDPA's inputs: ``ops/attention.py``, one Triton launch on GPU)."""
    bsz, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)
    s = size if prop_attn else None
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        q, k, v, metric = attention_inputs(qkv, s, attn.num_heads, attn.scale, pad_v=True, backend=backend)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=attn.scale)[..., :attn.head_dim]
    else:  # q_norm / k_norm act per head: split first
        q, k, v = qkv.reshape(bsz, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        metric = k.mean(1)
        if s is not None:
            out = proportional_sdpa(q, k, v, s, attn.scale, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=attn.scale)
    out = out.transpose(1, 2).reshape(bsz, n, -1)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric


# ----------------------------------------------------------------------------- merges
def _split_prefix(fn, x, metric, size, p):
    """Run a ToMe-style merge on the tokens after ``p`` prefix tokens (registers: more prefix tokens
    than the class / distillation flags describe); the prefix rows pass through untouched."""
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    out, out_size, tmap = fn(x[:, p:], metric[:, p:], size[:, p:])
    prefix_map = torch.arange(p, device=x.device).expand(x.shape[0], p)
    return (torch.cat([x[:, :p], out], 1), torch.cat([size[:, :p].to(out_size.dtype), out_size], 1),
            torch.cat([prefix_map, tmap + p], 1))


def _merge(block, info, x, metric, size, r):
    method, backend = info["method"], info["backend"]
    cls, dist, p = info["class_token"], info["distill_token"], info["num_prefix"]
    flags_cover_prefix = p == int(cls) + int(dist)
    if method == "fpet":
        metric = block.fk_refine(metric) if getattr(block, "fk_refine", None) is not None else metric
        return fpet_merge(x, metric, size, backend=backend, return_token_map=True, num_prefix=p)
    if method == "tome":
        def fn(x_, m_, s_, c=cls, d=dist):
            out, out_size, m = tome_merge(x_, m_, r, s_, c, d, backend=backend)
            return out, out_size, m.token_map
    else:
        mod = block.fk_pyra

        def fn(x_, m_, s_, c=cls, d=dist):
            out, out_size, m = pyra_merge(x_, m_, r, mod.a, mod.b, mod.norm.weight, mod.norm.bias, s_, c, d,
                                          eps=mod.norm.eps, backend=backend, return_matching=True)
            return out, out_size, m.token_map
    if flags_cover_prefix:
        return fn(x, metric, size)
    return _split_prefix(lambda x_, m_, s_: fn(x_, m_, s_, False, False), x, metric, size, p)


class _FKBlock:
    """Mixin placed before timm's ``Block`` class: the block forward with an optional merge after
    attention and an optional PET adapter parallel to the MLP (``fk_adapter``)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        info = getattr(self, "_fk_info", None)
        r, size, prop = 0, None, False
        if info is not None and info["method"] is not None:
            r = info["r"][self._fk_index]
            size, prop = info["size"], info["prop_attn"]
        if r > 0 or (size is not None and prop):
            if attn_mask is not None or is_causal:
                raise ValueError("token merging does not support attn_mask / is_causal")
            h, metric = attention_with_metric(self.attn, self.norm1(x), size, prop, info["backend"])
        else:  # timm's own attention path, unchanged
            kw = {} if attn_mask is None and not is_causal else dict(attn_mask=attn_mask, is_causal=is_causal)
            h, metric = self.attn(self.norm1(x), **kw), None
        x = x + self.drop_path1(self.ls1(h))
        if r > 0:
            x, size, tmap = _merge(self, info, x, metric, size, r)
            info["size"] = size
            if info["trace_source"]:
                info["token_map"] = compose_token_map(info["token_map"], tmap)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        adapter = getattr(self, "fk_adapter", None)
        if adapter is not None:
            y = y + adapter(x)
        return x + y


class _FKModel:
    """Mixin placed before timm's ``VisionTransformer`` class: resets the merge state every forward."""

    def forward_features(self, *args, **kwargs):
        info = self._fk_info
        n = len(self.blocks)
        if info["method"] == "fpet":
            info["r"] = [1 if i == info["merge_layer"] else 0 for i in range(n)]
        elif info["method"] == "pyra":
            info["r"] = list(info["pyra_r"])
        else:
            info["r"] = parse_r(n, self.r)
        info["size"] = None
        info["token_map"] = None
        return super().forward_features(*args, **kwargs)


_SUBCLASSES: dict = {}


def _subclass(mixin, cls):
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"FK{cls.__name__}", (mixin, cls), {"_fk_base_class": cls})
    return _SUBCLASSES[key]


def _check_model(model):
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError as exc:  # pragma: no cover - timm is an optional dependency
        raise ImportError("fpet_kernels.patch.timm needs timm (pip install timm)") from exc
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        base = getattr(blk, "_fk_base_class", type(blk))
        if base is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"model.blocks[{i}] is a {base.__name__} with {type(blk.attn).__name__} attention; "
                            "fpet_kernels patches timm's standard Block / Attention only")
    return model


def ensure_block(block: nn.Module) -> nn.Module:
    """Swap a timm ``Block`` to the patched subclass (idempotent). Without merge state it computes
    exactly timm's forward (plus ``block.fk_adapter(x)`` parallel to the MLP, if set)."""
    if not hasattr(block, "_fk_base_class"):
        block.__class__ = _subclass(_FKBlock, type(block))
    return block


def timm(model: nn.Module, method: str = "tome", r=16, prop_attn: bool = True, trace_source: bool = False,
         merge_layer: int = 6, refine: bool = True, binary_refine: bool = True, backend: Optional[str] = None):
    """Patch a timm ``VisionTransformer`` in place for token merging; returns the model.

    - ``method="tome"``: ToMe bipartite merging of ``r`` tokens per block (``r``: int, per-layer list,
      or ``(r, inflection)``; ``model.r`` can be changed afterwards).
    - ``method="fpet"``: one FPET merge after the attention of block ``merge_layer`` (0-based; every
      checkerboard A token goes), the metric refined by FPET's adapter (``refine``; 1-bit with
      ``binary_refine``), trained through the straight-through estimator.
    - ``method="pyra"``: ToMe matching with PYRA's learned modulation; ``r`` per layer (a list or an
      int), a :class:`~fpet_kernels.pet.PyraModulation` per merging block (``block.fk_pyra``).

    ``prop_attn``: proportional attention (``+ log(size)``) once tokens carry sizes.
    ``trace_source``: keep the compact ``token_map`` [B, N0] (``merge_state(model)``).
    ``backend``: kernel backend of the merge ops (None: automatic; "reference": the pure-PyTorch ops)."""
    from .integrations import peft as _peft, support
    outer, model = model, _peft._unwrap_peft(model)  # a peft.PeftModel: patch the model inside
    support.check_timm(model)
    _check_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if hasattr(model, "_fk_info"):
        remove(model)
    n_blocks = len(model.blocks)
    info = dict(method=method, prop_attn=bool(prop_attn), trace_source=bool(trace_source), backend=backend,
                class_token=getattr(model, "cls_token", None) is not None,
                distill_token=getattr(model, "dist_token", None) is not None,
                num_prefix=int(getattr(model, "num_prefix_tokens", 0)), merge_layer=None, pyra_r=None,
                r=[0] * n_blocks, size=None, token_map=None)
    dim = model.blocks[0].attn.qkv.in_features
    if method == "fpet":
        if isinstance(merge_layer, bool) or not isinstance(merge_layer, int) or not 0 <= merge_layer < n_blocks:
            raise ValueError(f"merge_layer must be an int in [0, {n_blocks}), got {merge_layer!r}")
        info["merge_layer"] = merge_layer
        if refine:
            from .pet import RefinementAdapter
            head_dim = model.blocks[merge_layer].attn.head_dim
            model.blocks[merge_layer].fk_refine = RefinementAdapter(head_dim, head_dim // 2, binary=binary_refine)
    elif method == "pyra":
        info["pyra_r"] = parse_r(n_blocks, r)
        from .pet import PyraModulation
        for blk, rl in zip(model.blocks, info["pyra_r"]):
            if rl > 0:
                blk.fk_pyra = PyraModulation(rl, dim)
    else:
        parse_r(n_blocks, r)  # validates
        model.r = r
    for i, blk in enumerate(model.blocks):
        ensure_block(blk)
        blk._fk_info, blk._fk_index = info, i
    model._fk_info = info
    model.__class__ = _subclass(_FKModel, type(model))
    ref = next((p for p in model.parameters()), None)
    if ref is not None:  # new learned modules follow the model's device and dtype
        for blk in model.blocks:
            for name in ("fk_refine", "fk_pyra"):
                if getattr(blk, name, None) is not None:
                    getattr(blk, name).to(device=ref.device, dtype=ref.dtype)
    return _peft.register_merge_modules(outer) if outer is not model else model


def hf(model: nn.Module, method: str = "tome", **kw):
    """Patch a Hugging Face transformers ViT / DeiT for token merging (``fpet_kernels/patch_hf.py``)."""
    from . import patch_hf
    return patch_hf.hf(model, method, **kw)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`timm` (or :func:`hf`): the original classes, no merge modules (PET adapters stay).
    Same outputs as before patching."""
    from .integrations.peft import _unwrap_peft
    if _unwrap_peft(model) is not model:  # a peft.PeftModel: unpatch the model inside
        remove(_unwrap_peft(model))
        return model
    if type(model).__module__.startswith(("transformers.", "fpet_kernels.patch_hf")):
        from . import patch_hf
        return patch_hf.remove_hf(model)
    if hasattr(model, "_fk_info"):
        del model._fk_info
    if hasattr(model, "_fk_base_class"):
        model.__class__ = model._fk_base_class
    if "r" in model.__dict__:
        del model.__dict__["r"]
    for blk in getattr(model, "blocks", []):
        for name in ("fk_refine", "fk_pyra", "_fk_info", "_fk_index"):
            if hasattr(blk, name):
                delattr(blk, name)
        if hasattr(blk, "_fk_base_class") and getattr(blk, "fk_adapter", None) is None:
            blk.__class__ = blk._fk_base_class
    return model


def merge_state(model: nn.Module) -> dict:
    """After a forward: ``{"size": [B, N', 1] or None, "token_map": [B, N0] or None}`` (the map with
    ``trace_source=True``: for each token of the input sequence, the row now holding it)."""
    info = getattr(model, "_fk_info", None)
    if info is None:
        raise ValueError("model is not patched by fpet_kernels.patch.timm")
    return {"size": info["size"], "token_map": info["token_map"]}
