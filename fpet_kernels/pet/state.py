"""``pet.save`` / ``pet.load``: the state one task needs, in one safetensors file.

Method-blind: what a method stores in its own form (PaFi, HiWi) is its ``registry.MethodState``
(``save`` / ``check`` / ``write`` hooks in ``pafi.py`` / ``hiwi.py``); this module asks the registry.

What a file holds (tensor key prefixes; settings and fingerprints in the safetensors metadata):
  ``pet/<module>.<param>``  parameters of the PET modules (LoRA, AdaptFormer, the refinement adapter,
                           PYRA's modulation, ...); a 1-bit ``BinaryLinear`` weight is stored as
                           ``bits/<module>.weight`` (uint8, 8 signs a byte, ``pack_binary``) plus its
                           two floats (mu, sigma) in the metadata;
  ``pafi/<module>``        PaFi: the k delta values of each target only (the indices are recomputed from
                           the pre-trained weights and checked against the stored fingerprint);
  ``hiwi/<param>``         HiWi: the folded deltas ``f(P)`` of the target tensors;
  ``head/<name>.<key>``    the heads (``pet.HEAD_NAMES``): their full state dicts.

The metadata also holds ``checksum``: sha256 over every tensor (name, dtype, shape, bytes) and the other
metadata entries. ``load`` recomputes it and refuses a damaged file; a file written before the checksum
existed loads without that check. A file safetensors cannot read (empty, truncated, not safetensors)
raises ``ValueError`` naming the file.

``load`` checks, before changing anything, that the file holds the same PET methods as the model
(LoRA, AdaptFormer, ..., PaFi and HiWi; a model without PaFi layers gets them with the file's settings,
HiWi files load into the plain backbone), that the backbone matches (structure and a sample of values
of every frozen tensor), that the PET modules have the same names, shapes and settings, and for PaFi
that the mask fingerprint matches; any mismatch raises ``ValueError`` saying what differs. Switching a
model between tasks writes only the stored tensors: O(k) for PaFi, O(target size) for HiWi, the PET and
head parameters.

``save`` refuses a model that ``pet.fold`` folded (its trained deltas are inside the backbone weights
then, and the file would match no backbone but this folded one) unless ``allow_folded=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import BinaryLinear, pack_binary, unpack_binary
from .lora import LORA_TYPES
from .model import heads
from .registry import FOLDED_ATTR, entries, own_parameters, pet_modules

__all__ = ["save", "load", "FORMAT"]

FORMAT = "fpet_kernels.pet/1"
_SAMPLE = 16


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("pet.save / pet.load need the safetensors package: pip install safetensors") from e
    return st


# ----------------------------------------------------------------------------- what belongs to a task
def _stateful():
    """The registered methods that store their task in their own form (``registry.MethodState``)."""
    return [m for m in entries() if m.state is not None]


def _method_of_type(name: str) -> str:
    """The method name of a PET module type (the file's ``pet`` metadata holds type names), for messages."""
    for m in entries():
        if any(t.__name__ == name for t in m.module_types):
            return m.label or m.name
    return name


def _generic_pet(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """PET modules saved parameter by parameter (not those of a method with its own form: PaFi, HiWi)."""
    own = tuple(t for m in _stateful() for t in m.state.own_types)
    return [(n, m) for n, m in pet_modules(model) if not isinstance(m, own)]


def _norm_names(model: nn.Module) -> Dict[str, str]:
    """Parameter name -> the backbone's name (a LoRAQKV's ``qkv.base.weight`` is ``qkv.weight``)."""
    lora = [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    out = {}
    for name, _ in model.named_parameters():
        norm = name
        for p in lora:
            if name.startswith(p + ".base."):
                norm = p + "." + name[len(p) + 6:]
        out[name] = norm
    return out


def _backbone_fingerprint(model: nn.Module, skip_names=()) -> str:
    """sha256 over the frozen backbone tensors: names, shapes, dtypes and the first/last 16 values of each
    (O(number of tensors), not O(parameters)). PET parameters, heads and what a method's task changes in
    the backbone (PaFi-target weights, HiWi targets: ``MethodState.changed``) are left out."""
    skip = {id(p) for _, m in pet_modules(model) for _, p in own_parameters(m)}
    skip |= {id(p) for mod in heads(model).values() for p in mod.parameters()}
    for m in _stateful():
        if m.state.changed is not None:
            skip |= m.state.changed(model)
    names = _norm_names(model)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda t: names[t[0]]):
        if id(p) in skip or name in skip_names:
            continue
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).double().cpu()
        h.update(f"{names[name]}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _checksum(tensors: Dict[str, Tensor], meta: Dict[str, str]) -> str:
    """sha256 over the tensors (sorted names, dtype, shape, raw bytes) and the metadata entries other than
    ``checksum`` (as stored: JSON strings)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for k in sorted(meta):
        if k != "checksum":
            h.update(f"{k}={meta[k]}\n".encode())
    return "sha256:" + h.hexdigest()


def _file_methods(meta: Dict[str, object]) -> List[str]:
    """The PET methods a file's task uses (from its metadata)."""
    out = {_method_of_type(t[0]) for t in (meta.get("pet") or {}).values()}
    out |= {m.name for m in _stateful() if meta.get(m.name)}
    return sorted(out)


def _model_methods(model: nn.Module) -> List[str]:
    """The PET methods ``model`` holds: its PET module types, PaFi layers, HiWi layers or a loaded HiWi task."""
    out = {_method_of_type(type(m).__name__) for _, m in _generic_pet(model)}
    out |= {m.name for m in _stateful() if m.state.holds(model)}
    return sorted(out)


# ----------------------------------------------------------------------------- save
def save(model: nn.Module, path: str, allow_folded: bool = False) -> Dict[str, int]:
    """Write the task state of ``model`` to ``path`` (safetensors; see the module doc). Returns
    ``{"tensors": n, "bytes": size of the file}``.

    Save *before* ``pet.fold``: a model that ``pet.fold`` folded raises ``ValueError`` (its LoRA / PaFi /
    HiWi deltas are in the backbone weights then; a file saved from it loads only into that folded
    model). ``allow_folded=True`` saves it anyway, the folded weights being the backbone of the file (e.g.
    a new method trained on top of a folded one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(allow_folded, bool):
        raise TypeError(f"allow_folded must be a bool, got {type(allow_folded).__name__} {allow_folded!r}")
    folded = getattr(model, FOLDED_ATTR, None)
    if folded and not allow_folded:
        raise ValueError(f"model was folded by pet.fold ({', '.join(folded)}): its trained deltas are in the backbone "
                         "weights now and a file saved from it would load into no model but this folded one. "
                         "pet.save before pet.fold, or pass allow_folded=True to save a task whose backbone is "
                         "the folded model")
    tensors: Dict[str, Tensor] = {}
    meta: Dict[str, object] = {"format": FORMAT, "backbone": _backbone_fingerprint(model), "model": type(model).__name__}
    if folded:
        meta["folded"] = list(folded)
    # generic PET modules
    pet_meta, binary = {}, {}
    for name, mod in _generic_pet(model):
        pet_meta[name] = [type(mod).__name__, mod.extra_repr()]
        bin_w = {id(m.weight): m for m in mod.modules() if isinstance(m, BinaryLinear)}
        for pname, p in own_parameters(mod):
            key = f"{name}.{pname}" if name else pname
            if id(p) in bin_w:
                d = pack_binary(bin_w[id(p)])
                tensors[f"bits/{key}"] = d["bits"].contiguous()
                binary[key] = [d["mu"], d["sigma"], list(d["shape"]), str(d["dtype"]).replace("torch.", "")]
            else:
                tensors[f"pet/{key}"] = p.detach().contiguous()
    meta["pet"], meta["binary"] = pet_meta, binary
    # methods with their own form (PaFi: k deltas; HiWi: folded deltas)
    for m in _stateful():
        entry = m.state.save(model, tensors)
        if entry is not None:
            meta[m.name] = entry
    # heads
    head_meta = {}
    for hname, mod in heads(model).items():
        head_meta[hname] = type(mod).__name__
        for k, v in mod.state_dict().items():
            tensors[f"head/{hname}.{k}"] = v.detach().contiguous()
    meta["heads"] = head_meta
    if not tensors:
        raise ValueError(f"model ({type(model).__name__}) has no PET state and no head to save")
    st = _safetensors()
    tensors = {k: v.cpu() if v.device.type != "cpu" else v for k, v in tensors.items()}
    raw = {k: json.dumps(v) for k, v in meta.items()}
    raw["checksum"] = json.dumps(_checksum(tensors, raw))
    try:
        st.save_file(tensors, os.fspath(path), metadata=raw)
    except Exception as e:  # safetensors' I/O errors: a directory, a missing folder, no permission
        raise OSError(f"pet.save: cannot write path {os.fspath(path)!r}: {type(e).__name__}: {e}") from e
    return {"tensors": len(tensors), "bytes": os.path.getsize(path)}


# ----------------------------------------------------------------------------- load
def _read(path) -> Tuple[Dict[str, Tensor], Dict[str, object]]:
    """Tensors and decoded metadata of a ``save`` file; every way of not being one (missing, unreadable,
    not safetensors, another format, damaged data) raises naming ``path``."""
    _safetensors()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    fspath = os.fspath(path)
    if not os.path.isfile(fspath):
        raise FileNotFoundError(f"path {fspath!r}: no such file" if not os.path.exists(fspath)
                                else f"path {fspath!r} is not a file")
    from safetensors import safe_open
    try:
        with safe_open(fspath, framework="pt") as f:
            raw = f.metadata() or {}
            if raw.get("format") != json.dumps(FORMAT):
                raise ValueError(f"{fspath} is not a pet.save file (format {raw.get('format')!r}, "
                                 f"expected {json.dumps(FORMAT)!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors (header too small / too large / invalid, truncated data)
        raise ValueError(f"path {fspath!r} is not a readable pet.save (safetensors) file: "
                         f"{type(e).__name__}: {e}") from e
    stored = raw.get("checksum")
    if stored is not None:  # files written before the checksum existed have none
        try:
            stored = json.loads(stored)
        except ValueError:
            stored = None
        if stored != _checksum(tensors, raw):
            raise ValueError(f"{fspath} is damaged: its tensors or metadata do not match the checksum stored at "
                             "pet.save (sha256); the file was changed or corrupted after it was written")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except ValueError as e:
        raise ValueError(f"{fspath}: metadata entry is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta.get("backbone"), str):
        raise ValueError(f"{fspath}: metadata has no backbone fingerprint; the file is damaged")
    return tensors, meta


def _diff(kind: str, want, have) -> str:
    want, have = set(want), set(have)
    parts = []
    if want - have:
        parts.append(f"the file has {sorted(want - have)[:5]} which the model lacks")
    if have - want:
        parts.append(f"the model has {sorted(have - want)[:5]} which the file lacks")
    return f"{kind} differ: " + "; ".join(parts)


def load(model: nn.Module, path: str) -> nn.Module:
    """Load a :func:`save` file into ``model`` (in place; returns it). ``model`` is the same backbone with
    the same PET methods applied (PaFi is applied from the file's settings when the model has none);
    anything else raises ``ValueError`` before the model is changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    tensors, meta = _read(path)
    folded = getattr(model, FOLDED_ATTR, None)
    undo = []  # what preparing the model added (PaFi layers from the file's settings), undone on an error
    try:
        _check_methods(model, meta, path)
        for m in _stateful():
            if m.state.precheck is not None:
                m.state.precheck(model, meta.get(m.name))
        want_folded = meta.get("folded") or []
        if want_folded and sorted(want_folded) != sorted(folded or []):
            raise ValueError(f"{path} was saved (allow_folded=True) from a model folded by pet.fold "
                             f"({', '.join(want_folded)}), the model "
                             + (f"was folded ({', '.join(folded)})" if folded else "is not folded")
                             + ": it loads only into that folded model (or a copy of it)")
        for m in _stateful():
            fn = m.state.prepare(model, meta.get(m.name)) if m.state.prepare is not None else None
            if fn is not None:
                undo.append(fn)
        _check(model, tensors, meta, path)
    except Exception as e:
        if undo:  # deltas are zero: the backbone is unchanged; it was not folded by the user
            for fn in undo:
                fn(model)
            model.__dict__.pop(FOLDED_ATTR, None)  # that fold is not the user's pet.fold
            if folded is not None:
                object.__setattr__(model, FOLDED_ATTR, folded)
        if folded and isinstance(e, ValueError) and not meta.get("folded"):
            raise ValueError(f"{e} (the model was folded by pet.fold ({', '.join(folded)}): its weights are no "
                             "longer the pre-trained ones, load tasks into an unfolded backbone)") from e
        raise
    _write(model, tensors, meta)
    return model


def _check_methods(model: nn.Module, meta: Dict[str, object], path) -> None:
    """The file's PET methods against the model's (before the backbone: another method changes what the
    backbone fingerprint covers). A method with its own form (PaFi, HiWi) may be missing from the model
    (``load`` adds PaFi's layers; HiWi loads into the plain backbone)."""
    want, have = _file_methods(meta), _model_methods(model)
    missing = set(want) - set(have) - {m.name for m in _stateful()}
    extra = set(have) - set(want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"apply {sorted(missing)} to the model first (pet.apply / fk.patch) -- the file's "
                         "methods on the same backbone")
        if extra:
            parts.append(f"the model has {sorted(extra)}, which the file does not hold: load it into a model "
                         "without them (a fresh backbone with the file's methods applied)")
        raise ValueError(f"PET methods differ: {path} holds a task of {want or 'no PET method (heads only)'}, "
                         f"the model has {have or 'no PET method'}; " + "; ".join(parts))


def _check(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, object], path) -> None:
    skip = set()
    for m in _stateful():
        if m.state.skip_names is not None:
            skip |= m.state.skip_names(meta.get(m.name))
    if _backbone_fingerprint(model, skip_names=skip) != meta["backbone"]:
        raise ValueError(f"{path} was saved from another backbone (or other backbone weights) than "
                         f"{type(model).__name__}: backbone fingerprints differ")
    # generic PET modules: same names, types, settings, shapes
    have = {n: [type(m).__name__, m.extra_repr()] for n, m in _generic_pet(model)}
    want = meta.get("pet", {})
    if set(have) != set(want):
        raise ValueError(_diff("PET modules", want, have))
    for n in want:
        if have[n] != want[n]:
            raise ValueError(f"PET module {n!r} has other settings: file {want[n]}, model {have[n]}")
    params = {f"{n}.{p}" if n else p: t for n, m in _generic_pet(model) for p, t in own_parameters(m)}
    stored = {k[4:] for k in tensors if k.startswith("pet/")} | {k[5:] for k in tensors if k.startswith("bits/")}
    if set(params) != stored:
        raise ValueError(_diff("PET parameters", stored, params))
    for k, p in params.items():
        if f"pet/{k}" in tensors and tuple(tensors[f"pet/{k}"].shape) != tuple(p.shape):
            raise ValueError(f"PET parameter {k}: file shape {tuple(tensors[f'pet/{k}'].shape)}, "
                             f"model shape {tuple(p.shape)}")
        if k in meta.get("binary", {}) and tuple(meta["binary"][k][2]) != tuple(p.shape):
            raise ValueError(f"1-bit weight {k}: file shape {tuple(meta['binary'][k][2])}, model {tuple(p.shape)}")
    # methods with their own form (PaFi, HiWi)
    for m in _stateful():
        m.state.check(model, tensors, meta.get(m.name), path)
    # heads
    have_heads = heads(model)
    if set(have_heads) != set(meta.get("heads", {})):
        raise ValueError(_diff("heads", meta.get("heads", {}), have_heads))
    for hname, mod in have_heads.items():
        sd = mod.state_dict()
        keys = {k[len(hname) + 6:] for k in tensors if k.startswith(f"head/{hname}.")}
        if keys != set(sd):
            raise ValueError(_diff(f"head {hname!r} entries", keys, sd))
        for k, v in sd.items():
            if tuple(tensors[f"head/{hname}.{k}"].shape) != tuple(v.shape):
                raise ValueError(f"head {hname}.{k}: file shape {tuple(tensors[f'head/{hname}.{k}'].shape)}, "
                                 f"model shape {tuple(v.shape)} (another number of classes?)")


@torch.no_grad()
def _write(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, object]) -> None:
    for n, m in _generic_pet(model):
        bin_mods = {id(b.weight): b for b in m.modules() if isinstance(b, BinaryLinear)}
        for pname, p in own_parameters(m):
            key = f"{n}.{pname}" if n else pname
            if f"pet/{key}" in tensors:
                p.copy_(tensors[f"pet/{key}"].to(p.device, p.dtype))
                if id(p) in bin_mods:
                    bin_mods[id(p)].binary_stats = None
            else:
                mu, sigma, shape, dtype = meta["binary"][key]
                w = unpack_binary(dict(bits=tensors[f"bits/{key}"], mu=mu, sigma=sigma, shape=shape,
                                       dtype=getattr(torch, dtype)))
                p.copy_(w.to(p.device, p.dtype))
                bin_mods[id(p)].binary_stats = (mu, sigma)
    for m in _stateful():
        m.state.write(model, tensors, meta.get(m.name))
    for hname, mod in heads(model).items():
        sd = {k[len(hname) + 6:]: v for k, v in tensors.items() if k.startswith(f"head/{hname}.")}
        mod.load_state_dict(sd)
