"""PaFi (Liao, Meng, Monz, ACL 2023): task-agnostic sparse fine-tuning of the pre-trained weights with
the smallest absolute magnitude.

    pet.apply(model, "pafi", ratio=0.005)   # the k smallest-|w| entries of each target nn.Linear weight train
    pet.mark_trainable(model)               # the k-vectors ``pafi_delta`` (+ heads) train, all else frozen
    ...train...
    pet.fold(model)                         # plain nn.Linear layers again (the weights hold W0 + delta)

Selection rule (:func:`pafi_mask`): per weight matrix (``scope="matrix"``, default) or over all eligible
entries at once (``scope="global"``), the ``k = max(1, round(ratio * n))`` entries of smallest
``|w|`` of the pre-trained weight, ties broken by the lower flat (row-major) index (in module order for
``scope="global"``). It depends on the pre-trained weights and the settings only: every task shares it.

Training cost: each target becomes a :class:`PaFiLinear` (an ``nn.Linear`` subclass sharing the original
``weight``/``bias`` Parameters) with one trainable parameter, ``pafi_delta`` [k]. The forward is the plain
dense layer on ``weight``, which holds ``W0 + scatter(delta)``: a forward pre-hook compares
``pafi_delta._version`` with the version last written and, when the optimiser (or ``load``) changed
the delta in place, rewrites the k entries (``index_put``, O(k)). The backward computes ``grad_x`` as the
frozen layer does and the k weight-gradient entries with ``fpet_kernels.ops.sparse.masked_weight_grad``:
no dense ``[out, in]`` weight gradient, optimiser state for k values only. The layer input the op needs
is rebuilt in the backward from what the GELU / LayerNorm node before the layer keeps anyway, when there
is one (:func:`_input_source`), so PaFi keeps about as much memory as a frozen layer. (A delta changed through
``.data`` bypasses the version counter: call :meth:`PaFiLinear.sync` after such writes.)
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import sparse
from . import _targets
from .registry import Method, MethodState, register, register_pet_module

__all__ = ["pafi_mask", "pafi_indices", "PaFiLinear", "apply_pafi", "fold_pafi", "pafi_modules", "pafi_fingerprint",
           "SCOPES"]

SCOPES = ("matrix", "global")


# ----------------------------------------------------------------------------- selection rule
def _ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(float(ratio)):
        raise TypeError(f"ratio must be a real number in (0, 1], got {type(ratio).__name__} {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return float(ratio)


def _budget(ratio: float, n: int) -> int:
    return min(n, max(1, int(math.floor(ratio * n + 0.5))))


_SAMPLE = 4096  # values sampled to bound the k-th smallest from above (see _smallest)


def _smallest(values: Tensor, k: int) -> Tensor:
    """Flat indices (ascending) of the k smallest ``values`` (1-D), ties by the lower index.

    The same set as the first k of a stable sort (the rule's definition), in O(n) without sorting: an
    upper bound ``hi`` of the k-th smallest value from the k-th-and-a-margin smallest of an evenly strided
    sample; the candidates ``values <= hi`` (when they are at least k -- else all entries: the result never
    depends on the sample); the k-th smallest ``t`` of the candidates (``torch.kthvalue``), which is the
    k-th smallest of all since every entry up to it is a candidate; every candidate below ``t``, then the
    lowest-index ones equal to ``t`` up to k."""
    n = values.numel()
    if values.dtype.itemsize < 4:  # exact and order-preserving; kthvalue on every device and dtype
        values = values.float()
    if n and bool(torch.isnan(values.max())):  # max propagates NaN
        raise ValueError("weight holds NaN: the magnitude ranking is undefined")
    if k >= n:
        return torch.arange(n, device=values.device)
    cand = None
    if n > 4 * _SAMPLE:
        sample = values[::n // _SAMPLE]
        expect = k * sample.numel() / n
        r = int(math.ceil(expect + 4.0 * math.sqrt(expect) + 16))
        if r < sample.numel():
            hi = torch.kthvalue(sample, r).values
            cand = (values <= hi).nonzero().flatten()
            if cand.numel() < k:
                cand = None
    cv = values if cand is None else values[cand]
    t = torch.kthvalue(cv, k).values
    chosen = cv < t
    need = k - int(chosen.sum())
    chosen[(cv == t).nonzero().flatten()[:need]] = True
    return chosen.nonzero().flatten() if cand is None else cand[chosen]


def pafi_indices(weight: Tensor, ratio: float) -> Tensor:
    """Row-major flat indices (int64, ascending) of the entries :func:`pafi_mask` selects."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating torch.Tensor, got {type(weight).__name__}")
    if weight.numel() == 0:
        raise ValueError("weight must have at least one element")
    ratio = _ratio(ratio)
    return _smallest(weight.detach().abs().flatten(), _budget(ratio, weight.numel()))


def pafi_mask(weight: Tensor, ratio: float) -> Tensor:
    """PaFi's selection for one tensor: a bool tensor of ``weight``'s shape, True at the
    ``k = max(1, round(ratio * weight.numel()))`` entries of smallest absolute value (ties: lower
    row-major flat index first). ``ratio`` must be in (0, 1]."""
    idx = pafi_indices(weight, ratio)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[idx] = True
    return mask.view(weight.shape)


def _global_indices(weights: Sequence[Tensor], ratio: float) -> List[Tensor]:
    """``scope="global"``: one ranking over all entries, concatenated in module order."""
    dt = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    flat = torch.cat([w.detach().abs().flatten().to(dt) for w in weights])
    idx = _smallest(flat, _budget(ratio, flat.numel()))
    out, start = [], 0
    for w in weights:
        sel = idx[(idx >= start) & (idx < start + w.numel())] - start
        out.append(sel)
        start += w.numel()
    return out


# ----------------------------------------------------------------------------- the layer
def _saved_hooks_active() -> bool:
    """True when ``saved_tensors_hooks`` (checkpointing, offloading) are active: the input is then saved
    plainly, so that reading another node's saved tensors never runs their unpack hook in the forward."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _input_source(x: Tensor):
    """How the backward can rebuild ``x`` from tensors the autograd graph keeps anyway, or None.

    The masked weight gradient needs the layer input; a frozen layer (LoRA's run) keeps none. When ``x`` is
    the untouched output of a GELU (timm ``Mlp`` fc2, BERT ``output.dense``), the GELU node already keeps its
    input ``h``: saving ``h`` and recomputing ``gelu(h)`` in the backward gives ``x`` bit for bit (the same
    elementwise op on the same values). When ``x`` is the output of a LayerNorm (timm ``norm2`` -> fc1, BERT
    ``attention.output.LayerNorm`` -> ``intermediate.dense``), the LayerNorm node keeps its input, mean and
    rstd: ``(input - mean) * rstd * weight + bias`` rebuilds ``x`` up to rounding. Anything else (or ``x``
    written in place since it was produced, a different dtype/shape, saved-tensor hooks, tracing) is saved
    as it is."""
    node = x.grad_fn
    if node is None or x._version != 0 or _saved_hooks_active() or torch.compiler.is_compiling():
        return None
    name = type(node).__name__
    try:
        if name == "GeluBackward0":
            h = node._saved_self
            if h.shape == x.shape and h.dtype == x.dtype and h.device == x.device:
                return "gelu", (h,), node._saved_approximate
        elif name == "NativeLayerNormBackward0":
            inp, w, b = node._saved_input, node._saved_weight, node._saved_bias
            mean, rstd = node._saved_result1, node._saved_result2
            if (inp.shape == x.shape and inp.dtype == x.dtype and inp.device == x.device
                    and len(node._saved_normalized_shape) == 1 and mean.numel() * x.shape[-1] == x.numel()):
                return "layer_norm", (inp, mean, rstd, w, b), None
    except (AttributeError, RuntimeError):
        return None
    return None


def _rebuild_rows(kind: Optional[str], saved, extra, start: int, end: int) -> Tensor:
    """Rows ``start:end`` of the layer input flattened to 2-D: the saved input itself (``kind`` None) or
    rebuilt from the tensors of :func:`_input_source`."""
    if kind is None:
        x = saved[0]
        return x.reshape(-1, x.shape[-1])[start:end]
    if kind == "gelu":
        h = saved[0]
        return F.gelu(h.reshape(-1, h.shape[-1])[start:end], approximate=extra)
    inp, mean, rstd, w, b = saved
    inp2 = inp.reshape(-1, inp.shape[-1])[start:end]  # LayerNorm over the last dimension (_input_source)
    acc = mean.dtype if mean.dtype.itemsize >= inp.dtype.itemsize else inp.dtype
    y = (inp2.to(acc) - mean.reshape(-1, 1)[start:end]) * rstd.reshape(-1, 1)[start:end]
    if w is not None:
        y = y * w.reshape(-1).to(acc)
    if b is not None:
        y = y + b.reshape(-1).to(acc)
    return y.to(inp.dtype)


def _chunk_rows(m: int) -> int:
    """Rows per call of the masked weight-gradient op in the backward: the op (and the rebuilt input)
    allocates transposed copies of its row block, so the M rows go in about 8 blocks of at least 128."""
    return max(128, -(-m // 8))


class _PaFiLinearFn(torch.autograd.Function):
    """``y = F.linear(x, weight, bias)``; gradients: x (dense, as a frozen layer), bias when it trains,
    ``delta`` through the masked weight-gradient op; never the dense weight gradient. ``source`` (from
    :func:`_input_source`, or None): the tensors ``x`` is rebuilt from instead of saving ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, cols, backend, source):
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.source = None
        if not ctx.needs_input_grad[3]:
            keep = (None,)
        elif source is None:
            keep = (x,)
        else:
            ctx.source = (source[0], len(source[1]), source[2])
            keep = source[1]
        ctx.save_for_backward(weight, rows, cols, *keep)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, rows, cols, *keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_x = g_b = g_d = None
        if need[0]:
            g_x = dy.matmul(weight.to(dy.dtype))
        if ctx.has_bias and need[2]:
            g_b = dy.reshape(-1, dy.shape[-1]).sum(0)
        if need[3]:
            g2 = dy.reshape(-1, dy.shape[-1])
            m, step = g2.shape[0], _chunk_rows(g2.shape[0])
            kind, extra = (None, None) if ctx.source is None else (ctx.source[0], ctx.source[2])
            if step >= m:
                g_d = sparse.call(ctx.backend, g2, _rebuild_rows(kind, keep, extra, 0, m).to(g2.dtype), rows, cols)
            else:  # row blocks, partial sums in float32 (float64)
                acc = torch.float64 if g2.dtype == torch.float64 else torch.float32
                g_d = None
                for s0 in range(0, m, step):
                    part = sparse.call(ctx.backend, g2[s0:s0 + step].to(acc),
                                       _rebuild_rows(kind, keep, extra, s0, s0 + step).to(acc), rows, cols)
                    g_d = part if g_d is None else g_d.add_(part)
                g_d = g_d.to(dy.dtype)
        if need[1]:
            raise RuntimeError("PaFiLinear's weight must stay frozen (it holds W0 + scatter(pafi_delta)); "
                               "train pafi_delta instead (pet.mark_trainable)")
        return g_x, None, g_b, g_d, None, None, None, None


@register_pet_module
class PaFiLinear(nn.Linear):
    """``nn.Linear`` whose weight entries at ``pafi_index`` are ``pafi_base + pafi_delta`` (see the module
    doc). Buffers (not saved in ``state_dict``; recomputed from the pre-trained weight): ``pafi_index``
    (flat), ``pafi_rows``, ``pafi_cols``, ``pafi_base`` (the pre-trained values there)."""

    def __init__(self, linear: nn.Linear, index: Tensor, settings: Dict[str, object], backend: Optional[str] = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: optimisers / tied weights stay valid
        self.bias = linear.bias
        w = self.weight
        index = index.to(device=w.device, dtype=torch.int64)
        self.register_buffer("pafi_index", index, persistent=False)
        self.register_buffer("pafi_rows", index // self.in_features, persistent=False)
        self.register_buffer("pafi_cols", index % self.in_features, persistent=False)
        self.register_buffer("pafi_base", w.detach().flatten()[index].clone(), persistent=False)
        self.pafi_delta = nn.Parameter(torch.zeros(index.numel(), dtype=w.dtype, device=w.device))
        self.pafi_settings = dict(settings)
        self.backend = backend
        self.recompute_input = True  # see _input_source; False: always save the input
        self._synced = self.pafi_delta._version
        self.register_forward_pre_hook(PaFiLinear._sync_hook)
        self._register_load_state_dict_pre_hook(self._load_plain_keys)

    def pet_named_parameters(self):
        yield "pafi_delta", self.pafi_delta

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``pafi_base + pafi_delta`` into the k entries of ``weight`` (O(k))."""
        flat = self.weight.view(-1)
        flat.index_copy_(0, self.pafi_index, (self.pafi_base + self.pafi_delta).to(flat.dtype))
        self._synced = self.pafi_delta._version

    @staticmethod
    def _sync_hook(mod, args):
        if mod.pafi_delta._version != mod._synced:
            mod.sync()

    def _load_plain_keys(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A plain checkpoint's ``weight`` is the new pre-trained weight: the base values are taken from it
        (the mask stays: re-apply PaFi to recompute it) and ``pafi_delta`` keeps its value when absent."""
        w = state_dict.get(prefix + "weight")
        if w is None:
            return
        if prefix + "pafi_delta" not in state_dict:
            state_dict[prefix + "pafi_delta"] = self.pafi_delta.detach().clone()
        delta = state_dict[prefix + "pafi_delta"]
        w = w.clone()
        with torch.no_grad():
            self.pafi_base.copy_(w.flatten()[self.pafi_index.to(w.device)].to(self.pafi_base.dtype))
            w.view(-1)[self.pafi_index.to(w.device)] = (self.pafi_base.to(w.device) + delta.to(w.device)).to(w.dtype)
        state_dict[prefix + "weight"] = w
        self._synced = -1  # the delta parameter is about to be overwritten: resync at the next forward

    def forward(self, x: Tensor) -> Tensor:
        if self.pafi_delta.requires_grad and torch.is_grad_enabled():
            be = sparse.resolve_backend(self.backend, x.device, x.dtype)
            source = _input_source(x) if self.recompute_input else None
            return _PaFiLinearFn.apply(x, self.weight, self.bias, self.pafi_delta, self.pafi_rows, self.pafi_cols, be,
                                       source)
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's ``weight``/``bias`` (which hold W0 + delta)."""
        self.sync()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        out.weight = self.weight
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.pafi_index.numel()}, ratio={self.pafi_settings.get('ratio')}"


# ----------------------------------------------------------------------------- model level
def pafi_modules(model: nn.Module) -> List[Tuple[str, PaFiLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PaFiLinear)]


def _resolve_targets(model: nn.Module, targets) -> List[Tuple[str, nn.Linear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(targets, str) and targets in _targets.PRESETS:
        found = _targets.block_linears(model, targets)
    else:
        found = _targets.pattern_linears(model, targets)
    if not found:
        raise ValueError(f"no eligible module: targets={targets!r} matches no nn.Linear of {type(model).__name__}")
    return found


def apply_pafi(model: nn.Module, ratio: float = 0.005, targets: Union[str, Sequence[str]] = "qkv_ffn",
               scope: str = "matrix", backend: Optional[str] = None) -> nn.Module:
    """``pet.apply(model, "pafi", ...)``: every target ``nn.Linear`` becomes a :class:`PaFiLinear`.

    ``ratio`` (0, 1]: the budget, a fraction of each target's weight entries (``scope="matrix"``) or of
    all targets' entries (``scope="global"``). ``targets``: a preset of ``_targets.PRESETS`` --
    ``"qkv_ffn"`` (default: every nn.Linear inside the transformer blocks except the attention output
    projection, whose input is the one PaFi would keep beyond LoRA's memory; see docs/pafi_hiwi.md),
    ``"blocks"`` (all of them), ``"attention"``, ``"qkv"``, ``"ffn"`` -- or regex patterns matched against
    qualified module names. ``backend``: of the masked weight-gradient op."""
    ratio = _ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if backend is not None and backend not in sparse.BACKENDS:
        raise ValueError(f"backend must be None or one of {sparse.BACKENDS}, got {backend!r}")
    if pafi_modules(model):
        raise ValueError("model already has PaFi layers; method='pafi' was applied twice")
    found = _resolve_targets(model, targets)
    _targets.check_free(model, [name for name, _ in found], "pafi")  # before the masks are computed
    if scope == "matrix":
        indices = [pafi_indices(lin.weight, ratio) for _, lin in found]
    else:
        indices = _global_indices([lin.weight for _, lin in found], ratio)
    settings = dict(ratio=ratio, scope=scope, targets=targets if isinstance(targets, str) else list(targets))
    return _targets.replace_modules(model, [(name, PaFiLinear(lin, idx, settings, backend))
                                            for (name, lin), idx in zip(found, indices)])


def fold_pafi(model: nn.Module) -> nn.Module:
    """Replace every :class:`PaFiLinear` by a plain ``nn.Linear`` holding ``W0 + scatter(delta)``."""
    return _targets.fold_modules(model, pafi_modules(model))


def pafi_fingerprint(model: nn.Module) -> str:
    """sha256 of the PaFi settings, and per target its name, shape, dtype, selected indices and the
    pre-trained values there: equal for two models exactly when a task's deltas mean the same thing."""
    h = hashlib.sha256()
    mods = pafi_modules(model)
    if not mods:
        raise ValueError("model has no PaFi layers (pet.apply(model, 'pafi') first)")
    h.update(repr(sorted(mods[0][1].pafi_settings.items())).encode())
    for name, m in mods:
        h.update(f"{name}|{tuple(m.weight.shape)}|{m.weight.dtype}".encode())
        h.update(m.pafi_index.cpu().numpy().tobytes())
        h.update(m.pafi_base.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- pet.save / pet.load
def _save_state(model: nn.Module, tensors: Dict[str, Tensor]):
    """``pafi/<module>``: the k delta values of each target; the metadata: settings, mask fingerprint."""
    pafi = pafi_modules(model)
    if not pafi:
        return None
    entry = {"settings": pafi[0][1].pafi_settings, "fingerprint": pafi_fingerprint(model),
             "modules": [n for n, _ in pafi]}
    for n, m in pafi:
        tensors[f"pafi/{n}"] = m.pafi_delta.detach().contiguous()
    return entry


def _prepare_state(model: nn.Module, entry):
    """A model without PaFi layers gets them from the file's settings (undone by folding the zero deltas)."""
    if not entry or pafi_modules(model):
        return None
    s = entry["settings"]
    apply_pafi(model, ratio=s["ratio"], targets=s["targets"], scope=s["scope"])
    return fold_pafi


def _check_state(model: nn.Module, tensors: Dict[str, Tensor], entry, path) -> None:
    pafi = pafi_modules(model)
    if entry:
        fp = pafi_fingerprint(model)
        if fp != entry["fingerprint"]:
            raise ValueError("PaFi mask fingerprint differs: the file was saved from another backbone or with other "
                             f"mask settings (file: {entry['settings']}, model: {pafi[0][1].pafi_settings})")
    elif pafi:
        raise ValueError(f"model has PaFi layers but {path} holds no PaFi deltas")


def _write_state(model: nn.Module, tensors: Dict[str, Tensor], entry) -> None:
    for n, m in pafi_modules(model):
        m.pafi_delta.copy_(tensors[f"pafi/{n}"].to(m.pafi_delta.device, m.pafi_delta.dtype))
        m.sync()


register(Method("pafi", apply_pafi, frozenset({"ratio", "targets", "scope", "backend"}), fold=fold_pafi,
                state=MethodState(modules=pafi_modules, save=_save_state, check=_check_state, write=_write_state,
                                  own_types=(PaFiLinear,), prepare=_prepare_state,
                                  changed=lambda model: {id(m.weight) for _, m in pafi_modules(model)})))
