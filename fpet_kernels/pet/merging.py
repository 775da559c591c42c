"""FPET's and PYRA's entries in the method registry: their merge modules are PET modules.

``fk.patch.timm(model, "fpet")`` / ``"pyra"`` (and ``fk.patch.hf``) create the modules
(:class:`~fpet_kernels.patch.modules.RefinementAdapter`, :class:`~fpet_kernels.patch.modules.PyraModulation`),
so neither method goes through ``pet.apply``; registering their types here makes ``pet.mark_trainable``
train them, ``pet.parameter_report`` count them and ``pet.save`` / ``pet.load`` store them.
"""
from __future__ import annotations

from ..patch.modules import PyraModulation, RefinementAdapter
from .registry import Method, register

__all__ = ["RefinementAdapter", "PyraModulation"]

register(Method("fpet", module_types=(RefinementAdapter,), label="fpet (refinement)"))
register(Method("pyra", module_types=(PyraModulation,)))
