"""FPET's entry in the method registry: its merge module, the refinement adapter, is a PET module.

``fk.patch.timm(model, "fpet")`` (and ``fk.patch.hf``) creates the module
(:class:`~fpet_kernels.patch.modules.RefinementAdapter`, ``blocks[i].fk_refine``), so FPET does not go
through ``pet.apply``; registering its type here makes ``pet.mark_trainable`` train it,
``pet.parameter_report`` count it and ``pet.save`` / ``pet.load`` store it.
"""
from __future__ import annotations

from ..patch.modules import RefinementAdapter
from .registry import Method, register

__all__ = ["RefinementAdapter"]

register(Method("fpet", module_types=(RefinementAdapter,), label="fpet (refinement)"))
