"""What every model patch shares, independent of the model library: the merge configuration, the
merge state that flows through the blocks, attention returning the merge metric, and one merge step
(ToMe, FPET or PYRA) on the public ops.

Nothing here keeps state: a merging block is a function ``(x, state) -> (x, state)``, where
``state`` is a :class:`MergeState` (token sizes, the optional token map, the FPET grid and the
model's :class:`MergeConfig`) that the model creates at the start of each forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import attention_inputs, proportional_sdpa
from ..ops.fpet import fpet_merge
from ..ops.pyra import pyra_merge
from ..ops.tome import compose_token_map, parse_r, tome_merge

METHODS = ("tome", "fpet", "pyra")


@dataclass
class MergeConfig:
    """A patched model's merge settings (plain Python values, no tensors).

    ``r``: ToMe's schedule as the user gave it (int, list or ``(r, inflection)``; ``model.r``);
    ``merge_layer``: FPET's merging block; ``grid``: FPET's explicit ``(H, W)`` patch grid (None:
    from the patch embedding); ``num_prefix``: class, distillation and register tokens (never merged)."""
    method: str
    prop_attn: bool = True
    backend: Optional[str] = None
    class_token: bool = True
    distill_token: bool = False
    num_prefix: int = 1
    r: object = 0
    merge_layer: Optional[int] = None
    grid: Optional[Tuple[int, int]] = None


class MergeState(NamedTuple):
    """The per-forward merge state passed from block to block (inputs and outputs, never stored).

    ``size`` [B, N, 1] float32 (None until the first merge: every token has size 1);
    ``token_map`` [B, N0] int64, the row now holding each of the N0 input tokens (-1: dropped),
    or None when not tracked; ``grid`` the ``(H, W)`` patch grid of this input (FPET);
    ``config`` the model's :class:`MergeConfig`."""
    size: Optional[Tensor]
    token_map: Optional[Tensor]
    grid: Optional[Tuple[int, int]]
    config: MergeConfig

    @staticmethod
    def start(x: Tensor, config: MergeConfig, grid=None, track_tokens: bool = False) -> "MergeState":
        """The state before the first block for tokens ``x`` [B, N0, C]: sizes 1, identity map."""
        tmap = None
        if track_tokens:
            tmap = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])
        return MergeState(None, tmap, grid, config)


def check_grid(grid) -> Tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def schedule(config: MergeConfig, n_blocks: int, pyra_r: Optional[List[int]] = None) -> List[int]:
    """Per block: how many tokens it merges (FPET: 1 at ``merge_layer`` = "merge the checkerboard here")."""
    if config.method == "tome":
        return parse_r(n_blocks, config.r)
    if config.method == "fpet":
        return [int(i == config.merge_layer) for i in range(n_blocks)]
    return list(pyra_r)


# ----------------------------------------------------------------------------- attention
def attention_with_metric(attn: nn.Module, x: Tensor, size: Optional[Tensor], prop_attn: bool,
                          backend: Optional[str] = None):
    """A timm-style ``Attention`` (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``gate``, ``proj``) on
    ``x`` with its own submodules, returning ``(out, metric)``: ``metric`` [B, N, head_dim] is the
    keys averaged over heads; with ``size`` and ``prop_attn`` the logits get ``+ log(size)`` (folded
    into SDPA's inputs: ``ops/attention.py``, one Triton launch on GPU)."""
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


def merge_step(x: Tensor, metric: Tensor, state: MergeState, r: int, refine: Optional[nn.Module] = None,
               pyra: Optional[nn.Module] = None) -> Tuple[Tensor, MergeState]:
    """One merge after a block's attention: ``(x', state')``. ToMe merges ``r`` tokens; FPET the
    whole checkerboard of ``state.grid`` (metric refined by ``refine`` when given); PYRA ``r`` tokens
    modulated by ``pyra`` (a :class:`~fpet_kernels.pet.PyraModulation`)."""
    cfg, size = state.config, state.size
    cls, dist, p, backend = cfg.class_token, cfg.distill_token, cfg.num_prefix, cfg.backend
    if cfg.method == "fpet":
        n_grid = state.grid[0] * state.grid[1]
        if x.shape[1] != p + n_grid:
            raise ValueError(f"FPET merges the {state.grid[0]} x {state.grid[1]} patch grid but block input has "
                             f"{x.shape[1]} tokens for {p} prefix tokens (patch dropout or a second merge "
                             "changed the tokens before the FPET layer?)")
        metric = refine(metric) if refine is not None else metric
        out, out_size, step = fpet_merge(x, metric, size, grid=state.grid, backend=backend,
                                         return_token_map=True, num_prefix=p)
    else:
        if cfg.method == "tome":
            def fn(x_, m_, s_, c=cls, d=dist):
                out_, out_size_, m = tome_merge(x_, m_, r, s_, c, d, backend=backend)
                return out_, out_size_, m.token_map
        else:
            def fn(x_, m_, s_, c=cls, d=dist):
                out_, out_size_, m = pyra_merge(x_, m_, r, pyra.a, pyra.b, pyra.norm.weight, pyra.norm.bias, s_, c,
                                                d, eps=pyra.norm.eps, backend=backend, return_matching=True)
                return out_, out_size_, m.token_map
        if p == int(cls) + int(dist):  # the flags describe every prefix token
            out, out_size, step = fn(x, metric, size)
        else:
            out, out_size, step = _split_prefix(lambda x_, m_, s_: fn(x_, m_, s_, False, False), x, metric, size, p)
    tmap = None if state.token_map is None else compose_token_map(state.token_map, step)
    return out, MergeState(out_size, tmap, state.grid, cfg)
