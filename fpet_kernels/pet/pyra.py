"""PYRA's entry in the method registry: its merge module, the modulation, is a PET module.

``fk.patch.timm(model, "pyra")`` (and ``fk.patch.hf``) creates one
:class:`~fpet_kernels.patch.modules.PyraModulation` per merging block (``blocks[i].fk_pyra``);
``pet.apply(model, "pyra", r=...)`` is the same call through the PET entry point (``fpet.apply_merge``).
Registering its type here makes ``pet.mark_trainable`` train it, ``pet.parameter_report`` count it and
``pet.save`` / ``pet.load`` store it.
"""
from __future__ import annotations

from torch import nn

from ..patch.modules import PyraModulation
from .fpet import _PATCH_KW, apply_merge
from .registry import Method, register

__all__ = ["PyraModulation"]


def apply_pyra(model: nn.Module, **kw) -> nn.Module:
    return apply_merge(model, "pyra", **kw)


register(Method("pyra", apply_pyra, _PATCH_KW["pyra"], module_types=(PyraModulation,)))
