"""The timm patch: ToMe / FPET / PYRA merging in timm's ``VisionTransformer`` (and the distilled DeiT).

The instance keeps every timm submodule and weight; only its class changes, to one of the
module-level subclasses below (so the model pickles, deep-copies and exports):

- :class:`FKBlock` (timm ``Block``): called as timm calls it, ``blk(x)``, it computes timm's block
  (plus ``fk_adapter(x)`` beside the MLP when AdaptFormer set one); called with a merge state,
  ``blk(x, state=state, r=r)``, it returns ``(x, state)``: attention returning the merge metric
  (``+ log(size)`` once tokens carry sizes), then the merge, then timm's MLP branch.
- :class:`FKVisionTransformer` / :class:`FKVisionTransformerDistilled`: ``forward_features`` and
  ``forward_intermediates`` start a :class:`~fpet_kernels.patch.core.MergeState` from the patch
  embedding and pass it through the blocks (gradient checkpointing included); intermediates are
  unmerged back to the patch grid through the token map.

Nothing is stored on a module during a forward: the merge settings (:class:`MergeConfig`, plain
Python values) are the only thing the patch adds besides the learned merge modules
(``blocks[i].fk_refine`` for FPET, ``blocks[i].fk_pyra`` for PYRA).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops.tome import unmerge
from .core import (MergeConfig, MergeState, MergingModel, Patcher, already_patched, attach_merge_modules,
                   attention_with_metric, check_grid, layer_settings, merge_step, merges, method_arguments,
                   register_patcher, warn_capped)


# ----------------------------------------------------------------------------- block
class FKBlock(Block):
    """timm's ``Block`` with an optional merge after attention and an optional PET adapter beside
    the MLP (``fk_adapter``). Without ``state`` it is timm's block; with it, ``(x, state)`` in and out."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                state: Optional[MergeState] = None, r: Optional[int] = 0, threshold: Optional[float] = None):
        if state is None:
            if getattr(self, "fk_adapter", None) is None:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            return self._mlp_residual(x)
        cfg, size = state.config, state.attention_size()
        merge = merges(r, threshold)
        if merge or size is not None:
            if attn_mask is not None or is_causal:
                raise ValueError("token merging does not support attn_mask / is_causal")
            h, metric = attention_with_metric(self.attn, self.norm1(x), size, size is not None, cfg.backend)
        else:  # timm's own attention, unchanged
            h, metric = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal), None
        x = x + self.drop_path1(self.ls1(h))
        if merge:
            x, state = merge_step(x, metric, state, r, getattr(self, "fk_refine", None), getattr(self, "fk_pyra", None),
                                  threshold)
        return self._mlp_residual(x), state

    def _mlp_residual(self, x: Tensor) -> Tensor:
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        adapter = getattr(self, "fk_adapter", None)
        if adapter is None:
            return x + y
        # an adapter with ``fused_residual`` (X-PEFT) adds y itself, in the same fused op
        return x + (adapter(x, y) if getattr(adapter, "fused_residual", False) else y + adapter(x))


# ----------------------------------------------------------------------------- model
class _MergingViT(MergingModel):
    """What the patched model classes add to timm's (placed first in their bases)."""

    fk_unit = "block"

    def fk_units(self) -> list:
        return list(self.blocks)

    def fk_tokens(self) -> Optional[int]:
        return configured_tokens(self)

    def fk_fixed_r(self) -> str:
        cfg = self.fk_config
        if cfg.method == "fpet":
            return (f"model.r: method='fpet' has no r (it merges every checkerboard A token, about half "
                    f"the patch tokens, at merge_layer={cfg.merge_layer}); to move the merge: "
                    "fk.patch.remove(model), then fk.patch.timm(model, 'fpet', merge_layer=...)")
        return ("model.r: a PYRA model's per-layer r is fixed by its learned modulation "
                "(blocks[i].fk_pyra.a has r rows); fk.patch.remove(model) (dropping the modulation), "
                "then fk.patch.timm(model, 'pyra', r=...)")

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.forward_features_with_state(x, attn_mask, is_causal, track_tokens=False)[0]

    def forward_features_with_state(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                                    track_tokens: bool = True):
        """``forward_features`` returning ``(features [B, N', C], MergeState)``: the final sizes and
        (with ``track_tokens``) the token map of the N0 input tokens onto the N' output rows."""
        x, state = self._fk_embed(x, track_tokens)
        x, state, _ = self._fk_blocks(x, state, self.blocks, attn_mask, is_causal)
        x = self.norm(x)
        if state.padded:  # threshold merging: rows of different lengths, padding rows (size 0) are 0
            x = torch.where(state.size > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, state

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """timm's ``forward_intermediates`` (same arguments and outputs) with every returned feature
        unmerged back to the input tokens through the token map: the shapes of the unpatched model."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        bsz, _, height, width = x.shape
        x, state = self._fk_embed(x, track_tokens=True)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, state, inter = self._fk_blocks(x, state, blocks, attn_mask, is_causal, take, norm)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in inter] if p else None
        inter = [y[:, p:] for y in inter]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            inter = [y.reshape(bsz, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        final = None if intermediates_only else unmerge(self.norm(x), state.token_map, self.fk_config.backend)
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if final is not None:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (final, inter)

    # -- the stateless core
    def _fk_embed(self, img: Tensor, track_tokens: bool):
        """timm's stem (patch embedding, position embedding, patch dropout, pre-norm) and the merge
        state of its tokens (FPET: with this input's patch grid)."""
        feat = self.patch_embed(img)
        grid = self._fk_grid(img, feat) if self.fk_config.method == "fpet" else None
        x = self.norm_pre(self.patch_drop(self._pos_embed(feat)))
        return x, MergeState.start(x, self.fk_config, grid, track_tokens)

    def _fk_grid(self, img: Tensor, feat: Tensor):
        """The (H, W) patch grid: from the patch embedding (NHWC output with ``dynamic_img_size``,
        else its ``dynamic_feat_size`` of this image), checked against ``grid=`` when given."""
        found = None
        if feat.dim() == 4:  # NHWC, what _pos_embed flattens
            found = (int(feat.shape[1]), int(feat.shape[2]))
        elif hasattr(self.patch_embed, "dynamic_feat_size") and img.dim() == 4:
            h, w = self.patch_embed.dynamic_feat_size((img.shape[-2], img.shape[-1]))
            found = (int(h), int(w)) if h * w == feat.shape[1] else None
        want = self.fk_config.grid
        if want is None:
            if found is None:
                raise ValueError("FPET needs the patch grid, which this model's patch_embed does not give; "
                                 "pass it: fk.patch.timm(model, 'fpet', grid=(H, W))")
            return found
        if found is not None and found != want:
            raise ValueError(f"grid={want} was given but the patch embedding makes a {found[0]} x {found[1]} grid "
                             f"of this {tuple(img.shape[-2:])} input")
        return want

    def _fk_blocks(self, x: Tensor, state: MergeState, blocks, attn_mask=None, is_causal=False, take=(),
                   norm: bool = False):
        """Run ``blocks`` passing the state along; returns ``(x, state, [unmerged x of blocks in take])``."""
        sched = self.fk_layer_schedule()
        if (attn_mask is not None or is_causal) and any(merges(r, t) for r, t in sched):
            raise ValueError("token merging does not support attn_mask / is_causal")
        ckpt = self.grad_checkpointing and not torch.jit.is_scripting()
        taken = []
        for i, blk in enumerate(blocks):
            r, t = sched[i]
            if ckpt:  # non-reentrant: the state (sizes carry FPET's gradient) passes through checkpoint
                x, state = checkpoint(blk, x, attn_mask, is_causal, state, r, t, use_reentrant=False)
            else:
                x, state = blk(x, attn_mask, is_causal, state, r, t)
            state = state.record_kept(x)
            if i in take:
                taken.append(unmerge(self.norm(x) if norm else x, state.token_map, state.config.backend))
        return x, state, taken


class FKVisionTransformer(_MergingViT, VisionTransformer):
    """timm ``VisionTransformer`` with token merging (``fk.patch.timm``)."""


class FKVisionTransformerDistilled(_MergingViT, VisionTransformerDistilled):
    """timm ``VisionTransformerDistilled`` (DeiT with a distillation token) with token merging."""


PATCHED = {VisionTransformer: FKVisionTransformer, VisionTransformerDistilled: FKVisionTransformerDistilled}
BASES = {v: k for k, v in PATCHED.items()}


# ----------------------------------------------------------------------------- patch / remove
def check_model(model: nn.Module) -> nn.Module:
    if type(model) not in PATCHED and type(model) not in BASES:
        raise TypeError(f"model must be a timm VisionTransformer (or VisionTransformerDistilled), got "
                        f"{type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, FKBlock) or type(blk.attn) is not Attention:
            raise TypeError(f"model.blocks[{i}] is a {type(blk).__name__} with {type(blk.attn).__name__} attention; "
                            "fpet_kernels patches timm's standard Block / Attention only")
    return model


def ensure_block(block: nn.Module) -> nn.Module:
    """Swap a timm ``Block`` to :class:`FKBlock` (idempotent). Called as ``blk(x)`` it computes exactly
    timm's forward (plus ``block.fk_adapter(x)`` beside the MLP, if set)."""
    if type(block) is Block:
        block.__class__ = FKBlock
    elif type(block) is not FKBlock:
        raise TypeError(f"block must be a timm Block, got {type(block).__name__}")
    return block


def merge_modules(model: nn.Module) -> List[str]:
    """Names of the learned merge modules a patch added (``blocks.1.fk_refine``, ...)."""
    return [f"blocks.{i}.{name}" for i, blk in enumerate(getattr(model, "blocks", []))
            for name in ("fk_refine", "fk_pyra") if getattr(blk, name, None) is not None]


def configured_tokens(model: nn.Module) -> Optional[int]:
    """Tokens into the first block for the model's configured image size (None: not fixed)."""
    n = getattr(model.patch_embed, "num_patches", None)
    return None if not isinstance(n, int) else n + int(getattr(model, "num_prefix_tokens", 0))


def patch(model: nn.Module, method: str = "tome", r=None, prop_attn: bool = True, merge_layer: Optional[int] = None,
          refine: Optional[bool] = None, binary_refine: Optional[bool] = None, backend: Optional[str] = None,
          grid=None, threshold=None) -> nn.Module:
    """See :func:`fpet_kernels.patch.timm`."""
    check_model(model)
    args = method_arguments(method, dict(r=r, merge_layer=merge_layer, refine=refine, binary_refine=binary_refine,
                                         grid=grid, threshold=threshold), "fk.patch.timm")
    n_blocks = len(model.blocks)
    merge_layer, rs, ts = layer_settings(method, args, threshold, n_blocks)
    if method != "fpet":
        pool = getattr(model, "global_pool", "token")
        if any(t is not None for t in ts) and (getattr(model, "attn_pool", None) is not None
                                               or pool not in ("token", "")):
            raise ValueError(f"fk.patch.timm: threshold merging leaves padding rows (size 0) in the features, "
                             f"which the head's global_pool={pool!r} would pool with the tokens; it needs "
                             "global_pool='token' (the class token) or '' (pool the features yourself, "
                             "size-weighted: fk.patch.mean_pool(features, merge_state(model, x)['size']))")
    if type(model) in BASES:  # checked after the arguments: a bad argument is named first
        raise already_patched("fk.patch.timm", model.fk_config.method, merge_modules(model))
    cfg = MergeConfig(method=method, prop_attn=bool(prop_attn), backend=backend,
                      class_token=getattr(model, "cls_token", None) is not None,
                      distill_token=getattr(model, "dist_token", None) is not None,
                      num_prefix=int(getattr(model, "num_prefix_tokens", 0)),
                      grid=None if args.get("grid") is None else check_grid(args["grid"]), threshold=threshold)
    if method == "fpet":
        cfg.merge_layer = merge_layer
    elif method == "tome":
        cfg.r = args["r"]
    if method != "fpet":
        warn_capped(rs, configured_tokens(model), cfg, args["r"], "block", stacklevel=4)
    head_dim = model.blocks[merge_layer].attn.head_dim if merge_layer is not None else None
    attach_merge_modules(model, model.blocks, method, args, merge_layer, rs, head_dim,
                         model.blocks[0].attn.qkv.in_features)
    for blk in model.blocks:
        ensure_block(blk)
    model.fk_config = cfg
    model.__class__ = PATCHED[type(model)]
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: timm's classes, no merge modules or settings (PET adapters stay)."""
    if type(model) in BASES:
        model.__class__ = BASES[type(model)]
    model.__dict__.pop("fk_config", None)
    for blk in getattr(model, "blocks", []):
        for name in ("fk_refine", "fk_pyra"):
            if hasattr(blk, name):
                delattr(blk, name)
        if type(blk) is FKBlock and getattr(blk, "fk_adapter", None) is None:
            blk.__class__ = Block
    return model


def owns(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (patched or not): what :func:`remove` undoes."""
    return isinstance(model, VisionTransformer)


register_patcher(Patcher("timm", owns, remove))
