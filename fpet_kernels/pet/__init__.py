"""Parameter-efficient tuning (PET) methods, one module each, behind one entry point.

    from fpet_kernels import pet
    pet.apply(model, "lora", rank=8)     # or "adaptformer", "pafi", "hiwi", ...: pet.methods() lists them
    pet.mark_trainable(model)            # PET parameters + heads train, the rest is frozen
    print(pet.format_report(pet.parameter_report(model)))
    pet.save(model, "task.safetensors"); pet.load(model, "task.safetensors")   # only what a task needs
    pet.fold(model)                      # LoRA / PaFi / HiWi written into the weights: the backbone's modules
                                         # (save before fold: pet.save refuses a folded model)

One method per layer: applying a method to a layer another one holds raises (``_targets.check_free``).

Modules (imports run one way: ``fpet_kernels.layers`` and ``fpet_kernels.patch`` below, then
``registry`` <- the method modules <- ``model`` / ``state``):
  registry.py    the one method registry (``Method``: apply, accepted keywords, fold, module types, own
                 save form) that ``apply``, ``fold``, ``save`` and ``load`` read; PET module types.
  lora.py        LoRA on the fused qkv (``LoRAQKV``) or BERT's query / value (``LoRALinear``), ``merge_lora``.
  adaptformer.py AdaptFormer's parallel bottleneck adapter.
  fpet.py        FPET's entry: its merge module (``RefinementAdapter``, from ``fpet_kernels.patch.modules``).
  pyra.py        PYRA's entry: its merge module (``PyraModulation``, from ``fpet_kernels.patch.modules``).
  pafi.py        PaFi: task-agnostic magnitude-sparse tuning (``pafi_mask``), masked weight-gradient backward.
  hiwi.py        HiWi: adapters fed the pre-trained weights / biases, folded away after training.
  xpeft.py       X-PEFT: one shared adapter bank, a profile (mask) per task.
  model.py       ``apply`` / ``fold`` / ``mark_trainable`` / ``parameter_report`` and the task heads.
  state.py       ``save`` / ``load`` of a task's state (safetensors, checksummed), asking the registry.
  _targets.py    which layers PaFi / HiWi may touch; the one-method-per-layer check; what ``fold`` folded.
The 1-bit layers (``binarize``, ``BinaryLinear``, ``pack_binary``) live in ``fpet_kernels.layers``.
"""
from ..layers import BINARY_LEVEL, BinaryLinear, binarize, pack_binary, unpack_binary
from .registry import is_pet_module, methods, register_folder, register_method, register_pet_module
from .lora import LoRALinear, LoRAQKV, merge_lora
from .adaptformer import AdaptFormerAdapter
from .fpet import RefinementAdapter
from .pyra import PyraModulation
from .model import (HEAD_NAMES, METHODS, PET_MODULES, apply, fold, format_report, heads, mark_trainable,
                    parameter_report, pet_parameters)
from .pafi import PaFiLinear, pafi_fingerprint, pafi_indices, pafi_mask
from .hiwi import HiWiAdapter, HiWiLinear
from .state import load, save
from .xpeft import (XPeft, XPeftSite, add_profile, load_profile, mask_weights, profile_bytes, profile_names,
                    remove_profile, save_profile, set_profiles, train_profile)

__all__ = [
    "BINARY_LEVEL", "binarize", "BinaryLinear", "pack_binary", "unpack_binary", "AdaptFormerAdapter", "LoRAQKV", "LoRALinear",
    "RefinementAdapter", "PyraModulation", "PET_MODULES", "METHODS", "apply", "merge_lora", "mark_trainable",
    "pet_parameters", "parameter_report", "format_report", "register_method", "methods", "HEAD_NAMES",
    "register_pet_module", "is_pet_module", "register_folder", "fold", "heads",
    "PaFiLinear", "pafi_mask", "pafi_indices", "pafi_fingerprint", "HiWiAdapter", "HiWiLinear", "save", "load",
    "XPeft", "XPeftSite", "add_profile", "load_profile", "mask_weights", "profile_bytes", "profile_names",
    "remove_profile", "save_profile", "set_profiles", "train_profile",
]
