"""PEFT (``peft.PeftModel``) support for the model layer and the PET helpers.

    model = fk.patch.timm(model, "fpet")                      # patch first ...
    peft_model = get_peft_model(model, LoraConfig(target_modules=["qkv"],
                                modules_to_save=fk.integrations.peft.MERGE_MODULES))
    # ... or PEFT first: fk.patch.timm(peft_model, "fpet") registers the merge modules itself
    peft_model.save_pretrained(path)                         # LoRA + fk_refine / fk_pyra
    fresh = fk.patch.timm(timm.create_model(...), "fpet")    # the same patch on a fresh base model
    PeftModel.from_pretrained(fresh, path)                    # the same outputs

The merge modules (FPET's ``fk_refine``, PYRA's ``fk_pyra``) are registered as PEFT
``modules_to_save``: PEFT wraps each in a ``ModulesToSaveWrapper`` (a trainable copy per adapter,
the original kept frozen), trains and saves them with the adapter, and re-creates the wrapper on
``from_pretrained`` from the saved config. Attribute reads (``fk_pyra.a``) go to the active copy,
so the patched forward needs no change. peft is imported only when a PeftModel is seen.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

from torch import nn

#: Names of the learned merge modules the patches attach to blocks / layers.
MERGE_MODULES = ["fk_refine", "fk_pyra"]


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft unless one could be)."""
    if not type(model).__module__.startswith("peft"):
        return False
    from peft import PeftModel
    return isinstance(model, PeftModel)


def unwrap_peft(model):
    """The model a ``PeftModel`` wraps (its LoRA layers stay in place), else ``model`` itself."""
    if not is_peft_model(model):
        return model
    if model.active_peft_config.is_prompt_learning:
        raise TypeError("fpet_kernels patches do not support PEFT prompt-learning methods "
                        f"({model.active_peft_config.peft_type}); use LoRA-style adapters")
    return model.get_base_model()


_unwrap_peft = unwrap_peft  # the name the patches used before it was public


def merge_module_names(model: nn.Module) -> List[str]:
    """The names in :data:`MERGE_MODULES` that ``model`` holds (at any depth)."""
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [n for n in MERGE_MODULES if n in found]


def register_merge_modules(peft_model):
    """Make PEFT train and save the merge modules of a patched model: each adapter config lists them
    in ``modules_to_save`` and PEFT wraps them (idempotent); returns ``peft_model``. Called by
    ``fk.patch.timm`` / ``fk.patch.hf`` on a PeftModel; call it yourself after ``get_peft_model`` of
    an already patched model (or pass ``modules_to_save=MERGE_MODULES`` to the PEFT config)."""
    if not is_peft_model(peft_model):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    from peft.utils import _set_trainable
    names = merge_module_names(peft_model.get_base_model())
    if not names:
        return peft_model
    for adapter, cfg in peft_model.peft_config.items():
        if not hasattr(cfg, "modules_to_save"):
            raise TypeError(f"PEFT method {cfg.peft_type} has no modules_to_save: the merge modules cannot be "
                            "trained and saved with it")
        have = list(cfg.modules_to_save or [])
        cfg.modules_to_save = have + [n for n in names if n not in have]
        _set_trainable(peft_model, adapter, module_names=names, inference_mode=cfg.inference_mode,
                       activate_adapter=adapter in peft_model.active_adapters)
    return peft_model


def _adapter_parameters(model: nn.Module) -> Iterator[Tuple[str, str, nn.Parameter]]:
    """(module name, parameter name, parameter) of every PEFT adapter weight of the active adapters: the tuner layers'
    adapter layers (LoRA's ``lora_A`` / ``lora_B`` ...) and the trainable copies of modules_to_save."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper
    for mname, mod in model.named_modules():
        if not isinstance(mod, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        active = mod.active_adapters
        for layer_name in tuple(mod.adapter_layer_names):
            container = getattr(mod, layer_name, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for adapter in active:
                if adapter not in container:
                    continue
                item = container[adapter]
                prefix = f"{mname}.{layer_name}.{adapter}"
                if isinstance(item, nn.Parameter):
                    yield mname, prefix, item
                else:
                    for pname, p in item.named_parameters():
                        yield mname, f"{prefix}.{pname}", p


def peft_trainable_names(model: nn.Module) -> List[str]:
    """Names of the parameters PEFT trains in ``model`` (a PeftModel): its adapter weights and
    modules_to_save copies of the active adapters. Empty for any other model."""
    if not is_peft_model(model):
        return []
    return [n for _, n, _ in _adapter_parameters(model)]


def peft_trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters named by :func:`peft_trainable_names`, deduplicated."""
    if not is_peft_model(model):
        return []
    seen, out = set(), []
    for _, _, p in _adapter_parameters(model):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def is_frozen_copy(name: str) -> bool:
    """Whether module ``name`` is PEFT's frozen original inside a modules_to_save wrapper (not
    trained, not saved, not used while the adapter is active)."""
    return ".original_module" in f".{name}" or name.startswith("original_module")


def peft_report(model: nn.Module, seen: set) -> dict:
    """``{"peft <type>": (modules, params, bytes)}`` for the PEFT adapter weights of ``model`` not in
    ``seen`` (ids; updated), at 4 bytes a parameter: what ``pet.parameter_report`` adds for a PeftModel."""
    if not is_peft_model(model):
        return {}
    from peft.utils import AuxiliaryTrainingWrapper
    wrappers = {name for name, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    ptype = model.active_peft_config.peft_type
    key = f"peft {getattr(ptype, 'value', ptype)}"
    mods, n = set(), 0
    for mname, _, p in _adapter_parameters(model):
        if mname in wrappers or id(p) in seen:
            continue  # modules_to_save copies: PET modules are counted as such, heads as the head
        seen.add(id(p))
        mods.add(mname)
        n += p.numel()
    return {key: (len(mods), n, 4 * n)} if n else {}
