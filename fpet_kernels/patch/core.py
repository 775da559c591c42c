"""What every model patch shares, independent of the model library: the merge configuration, the
merge state that flows through the blocks, attention returning the merge metric, one merge step
(ToMe, FPET or PYRA) on the public ops, and the registry of patchers (:class:`Patcher`: which models
each owns and how it removes itself, what ``fk.patch.remove`` asks).

Nothing here keeps state: a merging block is a function ``(x, state) -> (x, state)``, where
``state`` is a :class:`MergeState` (token sizes, the optional token map, the FPET grid and the
model's :class:`MergeConfig`) that the model creates at the start of each forward.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import r_cap
from ..ops.attention import attention_inputs, proportional_sdpa
from ..ops.fpet import fpet_merge
from ..ops.tome import compose_token_map, parse_r, tome_merge
from .modules import PyraModulation, RefinementAdapter

METHODS = ("tome", "fpet", "pyra")
#: The arguments only some methods use, and their defaults (``None`` passed = not given: the default).
#: ``prop_attn``, ``trace_source`` and ``backend`` apply to every method.
METHOD_ARGS = {"tome": ("r", "threshold"), "fpet": ("merge_layer", "refine", "binary_refine", "grid"),
               "pyra": ("r", "threshold")}
ARG_DEFAULTS = {"r": 16, "merge_layer": 6, "refine": True, "binary_refine": True, "grid": None, "threshold": None}
_ARG_ROLE = {"r": "the number of tokens merged per layer",
             "threshold": "the similarity threshold of threshold merging",
             "merge_layer": "FPET's merging layer", "refine": "FPET's refinement adapter",
             "binary_refine": "FPET's 1-bit refinement adapter", "grid": "FPET's checkerboard grid"}


@dataclass
class MergeConfig:
    """A patched model's merge settings (plain Python values, no tensors).

    ``r``: ToMe's schedule as the user gave it (int, list or ``(r, inflection)``; ``model.r``);
    ``merge_layer``: FPET's merging block; ``grid``: FPET's explicit ``(H, W)`` patch grid (None:
    from the patch embedding); ``num_prefix``: class, distillation and register tokens (never merged);
    ``trace_source``: the Hugging Face patch's output carries the merge state (timm: no effect, the state
    is asked for with ``forward_features_with_state``);
    ``threshold``: threshold merging (a float in [-1, 1] for every merging layer, or a per-layer list
    of floats / None): each row merges the A tokens whose best score reaches it, ``r`` (when given)
    capping it per layer; None: merge exactly ``r`` (capped)."""
    method: str
    prop_attn: bool = True
    backend: Optional[str] = None
    class_token: bool = True
    distill_token: bool = False
    num_prefix: int = 1
    r: object = 0
    merge_layer: Optional[int] = None
    grid: Optional[Tuple[int, int]] = None
    trace_source: bool = False
    threshold: object = None


class MergeState(NamedTuple):
    """The per-forward merge state passed from block to block (inputs and outputs, never stored).

    ``size`` [B, N, 1] float32 (None until the first merge: every token has size 1; a padded batch
    starts with its attention mask, 1 for a token and 0 for padding);
    ``token_map`` [B, N0] int64, the row now holding each of the N0 input tokens (-1: dropped or
    padding), or None when not tracked; ``grid`` the ``(H, W)`` patch grid of this input (FPET; None:
    square, from the token count; ``(1, N - p)`` for a sequence);
    ``config`` the model's :class:`MergeConfig`;
    ``padded``: tokens of size 0 are padding (an attention mask was given, or a threshold merge left
    rows of different lengths): the merges run per row (``padded=True``) and attention masks them;
    ``kept``: None (not tracked), or one ``[B]`` int64 tensor per layer run so far, the valid tokens
    each row holds after that layer (``record_kept``)."""
    size: Optional[Tensor]
    token_map: Optional[Tensor]
    grid: Optional[Tuple[int, int]]
    config: MergeConfig
    padded: bool = False
    kept: Optional[Tuple[Tensor, ...]] = None

    @staticmethod
    def start(x: Tensor, config: MergeConfig, grid=None, track_tokens: bool = False,
              mask: Optional[Tensor] = None, token_map: Optional[Tensor] = None) -> "MergeState":
        """The state before the first block for tokens ``x`` [B, N0, C]: sizes 1, identity map.
        ``mask`` [B, N0] bool (a padded batch, valid tokens first): sizes 1 / 0 and ``padded``;
        ``token_map``: the map to start from (a reordered batch) instead of the identity."""
        tmap = None
        if track_tokens:
            tmap = token_map if token_map is not None else \
                torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])
        size = None if mask is None else mask.to(torch.float32).unsqueeze(-1)
        return MergeState(size, tmap, grid, config, mask is not None, () if track_tokens else None)

    def record_kept(self, x: Tensor) -> "MergeState":
        """The state with this layer's count of valid tokens per row appended to ``kept`` (when tracked)."""
        if self.kept is None:
            return self
        if self.size is None:
            n = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        else:
            n = (self.size[..., 0] > 0).sum(1)
        return self._replace(kept=self.kept + (n,))

    def attention_size(self) -> Optional[Tensor]:
        """What attention adds ``log`` of to its logits: the sizes (proportional attention), or, without
        ``prop_attn``, the 0/1 padding mask of a padded batch; None: plain attention."""
        if self.size is None:
            return None
        if self.config.prop_attn:
            return self.size
        return (self.size > 0).to(self.size.dtype) if self.padded else None


def merges(r, threshold) -> bool:
    """Whether a layer with this ``r`` (None: uncapped) and ``threshold`` merges."""
    return (r > 0) if r is not None else threshold is not None


def check_thresholds(threshold, n_layers: int) -> List[Optional[float]]:
    """Per-layer thresholds from ``threshold`` (a number for every layer, a list per layer padded with
    None, or None); each a finite number in [-1, 1] (``ValueError`` / ``TypeError`` naming threshold)."""
    if threshold is None:
        return [None] * n_layers
    if isinstance(threshold, (list, tuple)):
        if len(threshold) > n_layers:
            raise ValueError(f"threshold has {len(threshold)} entries for {n_layers} layers")
        out = list(threshold) + [None] * (n_layers - len(threshold))
    else:
        out = [threshold] * n_layers
    for i, t in enumerate(out):
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"threshold must be a number in [-1, 1] (or a per-layer list of them / None), got "
                            f"{type(t).__name__} {t!r}" + (f" at layer {i}" if isinstance(threshold, (list, tuple)) else ""))
        if not -1.0 <= float(t) <= 1.0:  # NaN fails too
            raise ValueError(f"threshold must be in [-1, 1] (a cosine similarity), got {t!r}"
                             + (f" at layer {i}" if isinstance(threshold, (list, tuple)) else ""))
        out[i] = float(t)
    return out


def layer_schedule(config: MergeConfig, n_blocks: int, pyra_r: Optional[List[int]] = None):
    """Per block ``(r, threshold)``: ``r`` as :func:`schedule` (None: threshold merging without a cap)
    and the block's threshold (None: merge exactly r)."""
    ts = check_thresholds(config.threshold, n_blocks)
    if config.method == "tome" and config.r is None:
        return [(None, t) for t in ts]
    return list(zip(schedule(config, n_blocks, pyra_r), ts))


# ----------------------------------------------------------------------------- patch arguments
def method_arguments(method, given: Dict[str, object], call: str) -> Dict[str, object]:
    """Check ``method`` and the method-specific arguments of a patch call (``given``: name -> value,
    ``None`` meaning not given); returns them with the method's defaults filled in. An argument the
    method does not use raises a ``ValueError`` naming it, instead of being ignored."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in given.items():
        if value is not None and name not in METHOD_ARGS[method]:
            users = [m for m in METHODS if name in METHOD_ARGS[m]]
            raise ValueError(f"{call}: {name}={value!r} does not apply to method={method!r} ({name} is "
                             f"{_ARG_ROLE[name]}, used by method={' / '.join(map(repr, users))} only); leave it out")
    out = {name: (ARG_DEFAULTS[name] if given.get(name) is None else given[name])
           for name in METHOD_ARGS[method] if name in given}
    if method == "tome" and given.get("threshold") is not None and given.get("r") is None:
        out["r"] = None  # threshold merging without a cap (each layer's own cap, half its tokens)
    for name in ("refine", "binary_refine"):
        if name in out and not isinstance(out[name], bool):
            raise TypeError(f"{call}: {name} must be a bool, got {type(out[name]).__name__}")
    if method == "fpet" and given.get("binary_refine") is not None and not out["refine"]:
        raise ValueError(f"{call}: binary_refine={given['binary_refine']!r} does not apply with refine=False "
                         "(there is no refinement adapter to make 1-bit); leave it out")
    return out


def already_patched(call: str, method: str, modules: List[str]) -> ValueError:
    """The error for patching a model that is patched already: patching again would replace its
    learned merge modules (their training lost); ``fk.patch.remove`` first is the explicit way."""
    held = (f"its learned merge modules ({', '.join(modules)}) would be replaced by fresh ones and what they "
            "learned lost" if modules else "its merge settings would be replaced")
    hint = "; to change ToMe's r, set model.r" if method == "tome" else ""
    return ValueError(f"{call}: the model is already patched for token merging (method={method!r}); patching it "
                      f"again is refused because {held}. Call fk.patch.remove(model) first (it removes the merge "
                      f"modules), then patch{hint}")


def capped_layers(rs: List[int], n_tokens: int, config: MergeConfig) -> Tuple[List[Tuple[int, int, int, int]], int]:
    """Walk the per-layer schedule ``rs`` over an input of ``n_tokens`` tokens as the merges do
    (``r`` capped at half the mergeable tokens, spec 1.1): ``([(layer, r, cap, tokens there)] of
    the layers whose r is above their cap, tokens after the last layer)``."""
    cls, dist, p = config.class_token, config.distill_token, config.num_prefix
    capped, n = [], n_tokens
    for i, r in enumerate(rs):
        if r <= 0:
            continue
        cap = r_cap(n, cls, dist) if p == int(cls) + int(dist) else r_cap(n - p, False, False)
        if r > cap:
            capped.append((i, r, cap, n))
        n -= min(r, cap)
    return capped, n


def warn_capped(rs: List[int], n_tokens: Optional[int], config: MergeConfig, r_arg, layer: str,
                stacklevel: int = 3) -> None:
    """Say once (one warning, at patch time or when ``model.r`` is set) when the schedule asks a
    layer to merge more tokens than it can (the ops cap r silently, spec 1.1): names ``r``, the cap
    and the first capped layer, and how many tokens the capped schedule leaves. A cap on the last
    merging layer alone is not said: ToMe's own schedules end that way (r = 16 on ViT-B/16 leaves
    21 tokens for the 12th block, which merges 10)."""
    if n_tokens is None or config.method == "fpet" or any(r is None for r in rs):
        return
    capped, n_end = capped_layers(rs, n_tokens, config)
    last = max((i for i, r in enumerate(rs) if r > 0), default=-1)
    if not capped or [c[0] for c in capped] == [last]:
        return
    i, r, cap, n = capped[0]
    given = f"r={r_arg!r}" if isinstance(r_arg, int) else f"r={r_arg!r} (r = {r} at {layer} {i})"
    warnings.warn(
        f"fpet_kernels.patch: {given} is above what {layer} {i} can merge: its {n} tokens allow at most r = {cap} "
        f"(half the tokens that may merge; r counts tokens merged per {layer}); the merge caps it there "
        f"({len(capped)} of {len(rs)} {layer}s capped), so the {n_tokens} input tokens end as {n_end} (for the "
        "model's configured input size). Choose a smaller r to keep more tokens.", UserWarning, stacklevel=stacklevel)


def layer_settings(method: str, args: dict, threshold, n_layers: int):
    """The per-layer settings of a patch call, validated (errors name the argument):
    ``(merge_layer, rs, thresholds)``: FPET's merging layer (None for ToMe / PYRA), or the per-layer r
    (None entries: uncapped threshold merging) and thresholds (None for FPET)."""
    if method == "fpet":
        merge_layer = args["merge_layer"]
        if isinstance(merge_layer, bool) or not isinstance(merge_layer, int) or not 0 <= merge_layer < n_layers:
            raise ValueError(f"merge_layer must be an int in [0, {n_layers}), got {merge_layer!r}")
        return merge_layer, None, None
    ts = check_thresholds(threshold, n_layers)  # validates
    rs = [None] * n_layers if args["r"] is None else parse_r(n_layers, args["r"])  # validates
    return None, rs, ts


def attach_merge_modules(model: nn.Module, layers, method: str, args: dict, merge_layer: Optional[int],
                         rs: Optional[list], head_dim: Optional[int], dim: int) -> dict:
    """Create the learned merge modules a method owns and put them on their layers: FPET's refinement
    adapter (``layers[merge_layer].fk_refine``, with ``refine``) and PYRA's modulation
    (``layers[i].fk_pyra`` where ``rs[i] > 0``). They follow the model's device and dtype and their
    layer's mode. Returns ``{(i, name): module}``."""
    new = {}
    if method == "fpet":
        if args["refine"]:
            new[(merge_layer, "fk_refine")] = RefinementAdapter(head_dim, head_dim // 2, binary=args["binary_refine"])
    elif method == "pyra":
        for i, rl in enumerate(rs):
            if rl > 0:
                new[(i, "fk_pyra")] = PyraModulation(rl, dim)
    ref = next(model.parameters(), None)
    for (i, name), mod in new.items():
        if ref is not None:
            mod.to(device=ref.device, dtype=ref.dtype)
        mod.train(layers[i].training)
        setattr(layers[i], name, mod)
    return new


class MergingModel:
    """What every patched model class adds to its library's (placed first in its bases): ``model.r`` and
    the per-layer schedules. Each patcher's subclass says what its merging units are (``fk_units``, called
    ``fk_unit`` in messages), how many tokens its configured input has (``fk_tokens``; None where that
    is not fixed, as for text) and why FPET / PYRA models have no settable r (``fk_fixed_r``)."""

    fk_config: MergeConfig
    fk_unit = "layer"

    def fk_units(self) -> list:
        raise NotImplementedError

    def fk_tokens(self) -> Optional[int]:
        return None

    def fk_fixed_r(self) -> str:
        raise NotImplementedError

    @property
    def r(self):
        """ToMe: the schedule as set (int, per-layer list, ``(r, inflection)``, or None: uncapped threshold
        merging), settable between forwards (validated; an r above a layer's cap is said). PYRA: the
        per-layer r of the learned modulation (read-only). FPET: None (no r; setting it raises)."""
        cfg = self.fk_config
        if cfg.method == "tome":
            return cfg.r
        return self.fk_schedule() if cfg.method == "pyra" else None

    @r.setter
    def r(self, value):
        cfg = self.fk_config
        if cfg.method != "tome":
            raise ValueError(self.fk_fixed_r())
        if value is None and cfg.threshold is not None:  # threshold merging without a cap
            cfg.r = None
            return
        rs = parse_r(len(self.fk_units()), value)  # validates
        warn_capped(rs, self.fk_tokens(), cfg, value, self.fk_unit, stacklevel=4)
        cfg.r = value

    def _fk_pyra_r(self) -> List[int]:
        pyra = [getattr(unit, "fk_pyra", None) for unit in self.fk_units()]
        return [0 if m is None else m.r for m in pyra]

    def fk_schedule(self) -> list:
        """Tokens merged by each layer in the next forward (FPET: 1 marks the merging layer; with a
        threshold, the cap of each layer, None: uncapped)."""
        return schedule(self.fk_config, len(self.fk_units()), self._fk_pyra_r())

    def fk_layer_schedule(self) -> list:
        """Per layer ``(r, threshold)`` of the next forward (:func:`layer_schedule`)."""
        return layer_schedule(self.fk_config, len(self.fk_units()), self._fk_pyra_r())


def check_grid(grid) -> Tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def schedule(config: MergeConfig, n_blocks: int, pyra_r: Optional[List[int]] = None) -> List[int]:
    """Per block: how many tokens it merges (FPET: 1 at ``merge_layer`` = "merge the checkerboard here")."""
    if config.method == "tome":
        return [None] * n_blocks if config.r is None else parse_r(n_blocks, config.r)
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


def _pad_tokens(x: Tensor, metric: Tensor, size: Optional[Tensor], n: int):
    """``x``, ``metric`` and ``size`` with padding tokens (size 0, values 0) appended up to ``n`` tokens."""
    extra = n - x.shape[1]
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    return (F.pad(x, (0, 0, 0, extra)), F.pad(metric, (0, 0, 0, extra)), F.pad(size, (0, 0, 0, extra)))


def merge_step(x: Tensor, metric: Tensor, state: MergeState, r: Optional[int], refine: Optional[nn.Module] = None,
               pyra: Optional[nn.Module] = None, threshold: Optional[float] = None) -> Tuple[Tensor, MergeState]:
    """One merge after a block's attention: ``(x', state')``. ToMe merges ``r`` tokens; FPET the
    whole checkerboard of ``state.grid`` (square when None; metric refined by ``refine`` when given); PYRA ``r`` tokens
    modulated by ``pyra`` (a :class:`~fpet_kernels.patch.modules.PyraModulation`, whose forward merges).
    ``threshold`` (ToMe, PYRA): threshold merging, ``r`` then a cap (None: the op's own cap). A padded
    state (``state.padded``) merges per row (the ops' ``padded=True``); after a threshold merge the
    rows differ in length, so the state is padded from then on."""
    cfg, size = state.config, state.size
    cls, dist, p, backend = cfg.class_token, cfg.distill_token, cfg.num_prefix, cfg.backend
    padded = state.padded
    rows = dict(padded=padded, threshold=threshold) if (padded or threshold is not None) else {}
    if cfg.method == "fpet":
        n_grid = None if state.grid is None else state.grid[0] * state.grid[1]
        if n_grid is not None and x.shape[1] != p + n_grid:
            raise ValueError(f"FPET merges the {state.grid[0]} x {state.grid[1]} patch grid but block input has "
                             f"{x.shape[1]} tokens for {p} prefix tokens (patch dropout or a second merge "
                             "changed the tokens before the FPET layer?)")
        metric = refine(metric) if refine is not None else metric
        grid = state.grid
        n_in = x.shape[1]
        short = grid is not None and grid[0] == 1 and grid[1] < 4  # a sequence too short for FPET's matching:
        if short:  # padded to 4 tokens, the short-row rule (docs/semantics.md) merges it
            x, metric, size = _pad_tokens(x, metric, size, p + 4)
            grid = (1, 4)
        out, out_size, step = fpet_merge(x, metric, size, grid=grid, backend=backend,
                                         return_token_map=True, num_prefix=p, padded=padded or short)
        step = step[:, :n_in]
        if short:  # every row keeps its prefix and at most one row (static: no padding row is added)
            keep = p + min(n_in - p, 1)
            out, out_size = out[:, :keep], out_size[:, :keep]
    else:
        if cfg.method == "tome":
            def fn(x_, m_, s_, c=cls, d=dist):
                out_, out_size_, m = tome_merge(x_, m_, r, s_, c, d, backend=backend, **rows)
                return out_, out_size_, m.token_map
        else:
            def fn(x_, m_, s_, c=cls, d=dist):  # the PyraModulation's forward is PYRA's merge (its r rows)
                out_, out_size_, m = pyra(x_, m_, s_, c, d, backend=backend, return_matching=True, **rows)
                return out_, out_size_, m.token_map
        if p == int(cls) + int(dist):  # the flags describe every prefix token
            out, out_size, step = fn(x, metric, size)
        else:
            out, out_size, step = _split_prefix(lambda x_, m_, s_: fn(x_, m_, s_, False, False), x, metric, size, p)
    if out.shape[1] == 0 < x.shape[1]:  # a fully padded batch, trimmed to no row: keep one padding row
        out, out_size = F.pad(out, (0, 0, 0, 1)), F.pad(out_size, (0, 0, 0, 1))
    tmap = None if state.token_map is None else compose_token_map(state.token_map, step)
    return out, state._replace(size=out_size, token_map=tmap, padded=padded or threshold is not None)


# ----------------------------------------------------------------------------- patchers
class Patcher(NamedTuple):
    """A model library's patch, as ``fk.patch.remove`` sees it: ``owns(model)`` says whether ``model`` is
    one of the classes it patches (patched or not), ``remove(model)`` undoes its patch. Each patch module
    (``timm_vit.py``, ``hf_vit.py``) registers one when imported; a patched model's class lives in that
    module, so the module is imported whenever such a model exists (unpickled ones included)."""
    name: str
    owns: Callable[[nn.Module], bool]
    remove: Callable[[nn.Module], nn.Module]


PATCHERS: List[Patcher] = []


def register_patcher(patcher: Patcher) -> Patcher:
    """Add ``patcher`` (once per name)."""
    if not any(p.name == patcher.name for p in PATCHERS):
        PATCHERS.append(patcher)
    return patcher


def patcher_of(model: nn.Module) -> Optional[Patcher]:
    """The registered patcher owning ``model``, or None."""
    return next((p for p in PATCHERS if p.owns(model)), None)
