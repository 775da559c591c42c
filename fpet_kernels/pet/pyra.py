"""PYRA's entry in the method registry: its merge module, the modulation, is a PET module.

``fk.patch.timm(model, "pyra")`` (and ``fk.patch.hf``) creates one
:class:`~fpet_kernels.patch.modules.PyraModulation` per merging block (``blocks[i].fk_pyra``), so PYRA
does not go through ``pet.apply``; registering its type here makes ``pet.mark_trainable`` train it,
``pet.parameter_report`` count it and ``pet.save`` / ``pet.load`` store it.
"""
from __future__ import annotations

from ..patch.modules import PyraModulation
from .registry import Method, register

__all__ = ["PyraModulation"]

register(Method("pyra", module_types=(PyraModulation,)))
