"""Parameter-efficient tuning (PET) methods, one module each, behind one entry point.

    from fpet_kernels import pet
    pet.apply(model, "lora", rank=8)     # or "adaptformer", ...: pet.methods() lists them
    pet.mark_trainable(model)            # PET parameters + head train, the rest is frozen
    print(pet.format_report(pet.parameter_report(model)))

Modules:
  modules.py  LoRA, AdaptFormer, FPET's refinement adapter and 1-bit layers, PYRA's modulation;
              ``apply`` / ``mark_trainable`` / ``parameter_report`` and the method registry
              (``register_method``) through which the other method modules plug into ``apply``.
"""
from .modules import *  # noqa: F401,F403
from .modules import __all__  # noqa: F401
from .xpeft import (XPeft, XPeftSite, add_profile, load_profile, mask_weights, profile_bytes, profile_names,  # noqa: F401,E402
                    remove_profile, save_profile, set_profiles, train_profile)
