"""Parameter-efficient tuning (PET) methods, one module each, behind one entry point.

    from fpet_kernels import pet
    pet.apply(model, "lora", rank=8)     # or "adaptformer", "pafi", "hiwi", ...: pet.methods() lists them
    pet.mark_trainable(model)            # PET parameters + heads train, the rest is frozen
    print(pet.format_report(pet.parameter_report(model)))
    pet.save(model, "task.safetensors"); pet.load(model, "task.safetensors")   # only what a task needs
    pet.fold(model)                      # LoRA / PaFi / HiWi written into the weights: the backbone's modules
                                         # (save before fold: pet.save refuses a folded model)

One method per layer: applying a method to a layer another one holds raises (``_targets.check_free``).

Modules:
  modules.py  LoRA, AdaptFormer, FPET's refinement adapter and 1-bit layers, PYRA's modulation;
              ``apply`` / ``mark_trainable`` / ``fold`` / ``parameter_report`` and the method registry
              (``register_method``) through which the other method modules plug into ``apply``.
  pafi.py     PaFi: task-agnostic magnitude-sparse tuning (``pafi_mask``), masked weight-gradient backward.
  hiwi.py     HiWi: adapters fed the pre-trained weights / biases, folded away after training.
  state.py    ``save`` / ``load`` of a task's state (safetensors, checksummed).
  _targets.py which layers PaFi / HiWi may touch; the one-method-per-layer check; what ``fold`` folded.
"""
from .modules import *  # noqa: F401,F403
from .modules import __all__ as _modules_all
from .pafi import PaFiLinear, pafi_fingerprint, pafi_indices, pafi_mask  # noqa: F401
from .hiwi import HiWiAdapter, HiWiLinear  # noqa: F401
from .state import load, save  # noqa: F401
from .xpeft import (XPeft, XPeftSite, add_profile, load_profile, mask_weights, profile_bytes, profile_names,  # noqa: F401
                    remove_profile, save_profile, set_profiles, train_profile)

__all__ = list(_modules_all) + ["PaFiLinear", "pafi_mask", "pafi_indices", "pafi_fingerprint", "HiWiAdapter",
                                "HiWiLinear", "save", "load", "XPeft", "XPeftSite", "add_profile", "load_profile",
                                "mask_weights", "profile_bytes", "profile_names", "remove_profile", "save_profile",
                                "set_profiles", "train_profile"]
