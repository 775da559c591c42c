"""The one registry of PET methods and PET module types, which ``apply``, ``fold``, ``save`` and ``load`` read.

Each method module (``lora.py``, ``adaptformer.py``, ``fpet.py``, ``pyra.py``, ``pafi.py``, ``hiwi.py``,
``xpeft.py``) declares itself once, when imported, with a :class:`Method` record:

- ``apply`` and ``accepted``: what ``pet.apply(model, name, **kw)`` calls and the keywords it accepts
  (None: the method is applied elsewhere, FPET's and PYRA's merge modules by ``fk.patch``);
- ``fold``: writes the method's trained state into the backbone's own modules (``pet.fold``);
- ``module_types``: the PET module types it adds, saved parameter by parameter by ``pet.save``
  (``label`` names the method in ``pet.load``'s messages);
- ``state``: a :class:`MethodState` when the method stores its task in its own form (PaFi's k deltas,
  HiWi's folded deltas) instead of as module parameters.

PET module types (:func:`register_pet_module`) are what :func:`pet_modules` finds in a model: their
parameters are the PET parameters (``pet_named_parameters()`` when the type defines it, else all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from torch import nn

from ..integrations import peft as _peft

__all__ = ["Method", "MethodState", "register", "register_method", "register_folder", "methods", "get", "entries",
           "folders", "register_pet_module", "is_pet_module", "pet_types", "pet_modules", "own_parameters",
           "FOLDED_ATTR", "mark_folded"]

#: Attribute ``pet.fold`` leaves on a model whose PET layers it folded: the sorted names of the folded
#: methods (a plain list on the model object, not a buffer). ``pet.save`` refuses such a model.
FOLDED_ATTR = "_fk_folded"


@dataclass(frozen=True)
class MethodState:
    """How ``pet.save`` / ``pet.load`` store a method whose task is not its modules' parameters. The file's
    metadata entry of the method is keyed by its name; its tensors by ``<name>/...``.

    ``modules(model)``: ``[(name, module)]`` of the method's layers (``present`` when any); ``present(model)``
    overrides that test (HiWi: also a loaded task); ``own_types``: PET module types saved by this form,
    not parameter by parameter; ``changed(model)``: ids of the backbone parameters the task changes (left
    out of the backbone fingerprint); ``skip_names(entry)``: parameter names the file's entry changes (the
    same, on load); ``save(model, tensors)``: adds the tensors and returns the metadata entry (None: no
    entry); ``prepare(model, entry)``: on load into a model without the method's layers, adds them from
    the file's settings (returns an ``undo(model)`` or None; HiWi loads into the plain backbone and has
    none); ``precheck(model, entry)``: refuses a model the file cannot load into at all; ``check(model, tensors, entry, path)``: raises ``ValueError`` on a mismatch (``entry`` None: the
    file has none); ``write(model, tensors, entry)``: loads the task."""
    modules: Callable
    save: Callable
    check: Callable
    write: Callable
    own_types: Tuple[type, ...] = ()
    present: Optional[Callable] = None
    changed: Optional[Callable] = None
    skip_names: Optional[Callable] = None
    prepare: Optional[Callable] = None
    precheck: Optional[Callable] = None

    def holds(self, model: nn.Module) -> bool:
        return bool(self.present(model) if self.present is not None else self.modules(model))


@dataclass(frozen=True)
class Method:
    """One PET method (see the module doc)."""
    name: str
    apply: Optional[Callable] = None
    accepted: frozenset = frozenset()
    fold: Optional[Callable] = None
    module_types: Tuple[type, ...] = ()
    label: Optional[str] = None
    state: Optional[MethodState] = None


_METHODS: Dict[str, Method] = {}
_FOLDERS: List[Callable] = []
_PET_TYPES: List[type] = []


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its module types become PET module types, its fold a folder)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a pet.registry.Method, got {type(method).__name__}")
    if method.name in _METHODS:
        raise ValueError(f"PET method {method.name!r} is already registered")
    _METHODS[method.name] = method
    for cls in method.module_types:
        register_pet_module(cls)
    if method.fold is not None:
        register_folder(method.fold)
    return method


def register_method(name: str, fn, accepted_kw) -> None:
    """Make ``pet.apply(model, name, **kw)`` call ``fn(model, **kw)`` (kw checked against ``accepted_kw``)."""
    register(Method(name, fn, frozenset(accepted_kw)))


def register_folder(fn) -> None:
    """Make :func:`~fpet_kernels.pet.fold` call ``fn(model)`` (weight-side methods register one)."""
    if fn not in _FOLDERS:
        _FOLDERS.append(fn)


def methods() -> Tuple[str, ...]:
    """Every method name :func:`~fpet_kernels.pet.apply` accepts."""
    return tuple(m.name for m in _METHODS.values() if m.apply is not None)


def get(name) -> Optional[Method]:
    """The record of ``pet.apply``'s method ``name`` (None: no such method)."""
    m = _METHODS.get(name) if isinstance(name, str) else None
    return m if m is not None and m.apply is not None else None


def entries() -> Tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def folders() -> Tuple[Callable, ...]:
    return tuple(_FOLDERS)


def mark_folded(model: nn.Module, names) -> None:
    """Add ``names`` (method names) to the folded methods recorded on ``model`` (:data:`FOLDED_ATTR`)."""
    names = {m for m in names if m}
    if names:
        done = set(getattr(model, FOLDED_ATTR, None) or ())
        object.__setattr__(model, FOLDED_ATTR, sorted(done | names))


# ----------------------------------------------------------------------------- PET module types
def register_pet_module(cls: type) -> type:
    """Declare ``cls`` a PET module type. Its PET parameters are ``cls.pet_named_parameters(self)``
    when it defines that method (e.g. a linear layer whose own weight stays frozen), else all of them."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if cls not in _PET_TYPES:
        _PET_TYPES.append(cls)
    return cls


def pet_types() -> tuple:
    return tuple(_PET_TYPES)


def is_pet_module(mod: nn.Module) -> bool:
    """True for an instance of a PET module type (built-in or registered)."""
    return isinstance(mod, pet_types())


def pet_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Outermost PET modules of ``model`` (a PET module nested in another is covered by its parent)."""
    types = pet_types()
    if isinstance(model, types):
        yield "", model
        return
    found: List[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, types) and not any(name.startswith(f + ".") for f in found) \
                and not _peft.is_frozen_copy(name):  # PEFT's frozen original of a modules_to_save copy
            found.append(name)
            yield name, mod


def own_parameters(mod: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """A PET module's own parameters: ``pet_named_parameters()`` when its type defines it (LoRA: all but
    the wrapped base layer), else all of them."""
    if hasattr(mod, "pet_named_parameters"):
        yield from mod.pet_named_parameters()
        return
    yield from mod.named_parameters()
