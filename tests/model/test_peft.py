"""PEFT with the model layer (fpet_kernels/integrations/peft.py): fk.patch.timm accepts a PeftModel;
FPET's fk_refine and PYRA's fk_pyra train and round-trip exactly through save_pretrained /
PeftModel.from_pretrained in both orders (PEFT then patch; patch then PEFT); pet.mark_trainable and
pet.parameter_report understand a PeftModel."""
import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import pet
from fpet_kernels.integrations import peft as fk_peft
from helpers import tiny_timm_vit  # noqa: E402

timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

KW = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))
MERGE_MODULE = dict(fpet="fk_refine", pyra="fk_pyra")


def tiny_vit(seed=0):
    return tiny_timm_vit(seed).eval()


def images(bsz=4, seed=1):
    return torch.randn(bsz, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def lora_config(**kw):
    return LoraConfig(target_modules=["qkv"], r=4, lora_alpha=8, **kw)


def train(model, steps=3):
    """A few SGD steps on every trainable parameter; returns the parameters that changed, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    model.train()
    for i in range(steps):
        loss = model(images(seed=10 + i)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}


def logits(model):
    with torch.no_grad():
        return model(images())


def module_changed(changed, method):
    return any(f".{MERGE_MODULE[method]}.modules_to_save." in n for n in changed)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method", ["fpet", "pyra"])
def test_peft_then_patch_round_trip(tmp_path, method):
    model = get_peft_model(tiny_vit(), lora_config())
    out = fk.patch.timm(model, method, **KW[method])
    assert out is model  # the PeftModel comes back, patched inside
    assert MERGE_MODULE[method] in model.peft_config["default"].modules_to_save
    changed = train(model)
    assert module_changed(changed, method), f"{MERGE_MODULE[method]} did not train: {sorted(changed)}"
    assert any("lora_B" in n for n in changed)
    expected = logits(model)
    model.save_pretrained(tmp_path)

    fresh = fk.patch.timm(tiny_vit(), method, **KW[method])  # reload: patch a fresh base, then PEFT loads
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert (logits(loaded) - expected).abs().max().item() == 0


@pytest.mark.parametrize("recipe", ["config", "register"])
@pytest.mark.parametrize("method", ["fpet", "pyra"])
def test_patch_then_peft_round_trip(tmp_path, method, recipe):
    base = fk.patch.timm(tiny_vit(), method, **KW[method])
    if recipe == "config":  # the merge modules named in the PEFT config
        model = get_peft_model(base, lora_config(modules_to_save=list(fk_peft.MERGE_MODULES)))
    else:  # or registered after get_peft_model
        model = fk_peft.register_merge_modules(get_peft_model(base, lora_config()))
    changed = train(model)
    assert module_changed(changed, method), f"{MERGE_MODULE[method]} did not train: {sorted(changed)}"
    expected = logits(model)
    model.save_pretrained(tmp_path)

    fresh = fk.patch.timm(tiny_vit(), method, **KW[method])
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert (logits(loaded) - expected).abs().max().item() == 0


def test_without_registration_peft_freezes_the_merge_module():
    """What the recipe fixes: plain get_peft_model of a patched model freezes fk_refine (documented)."""
    model = get_peft_model(fk.patch.timm(tiny_vit(), "fpet", merge_layer=1), lora_config())
    assert not any(p.requires_grad for p in model.get_base_model().blocks[1].fk_refine.parameters())
    fk_peft.register_merge_modules(model)
    assert all(p.requires_grad for p in model.get_base_model().blocks[1].fk_refine.modules_to_save.default.parameters())


def test_tome_patch_of_a_peft_model_matches_plain_patch():
    lora = get_peft_model(tiny_vit(), lora_config())
    train(lora, steps=1)
    twin = get_peft_model(tiny_vit(), lora_config())
    twin.load_state_dict(lora.state_dict())
    merged = twin.merge_and_unload()  # the same function as a plain timm model
    expected = logits(fk.patch.timm(merged, "tome", r=3))
    # patch the PeftModel itself: the LoRA layers stay and run inside the patched blocks
    fk.patch.timm(lora, "tome", r=3)
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    torch.testing.assert_close(logits(lora), expected, atol=1e-5, rtol=1e-5)
    fk.patch.remove(lora)
    assert type(lora.get_base_model()) is VisionTransformer


# ----------------------------------------------------------------------------- PET helpers
def test_mark_trainable_keeps_lora_and_merge_modules():
    model = fk.patch.timm(get_peft_model(tiny_vit(), lora_config()), "fpet", merge_layer=1)
    pet.mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A.default" in n for n in trainable) and any("lora_B.default" in n for n in trainable)
    assert any("fk_refine.modules_to_save.default" in n for n in trainable)
    assert not any("original_module" in n for n in trainable)
    assert any(n.endswith("head.weight") for n in trainable)
    assert not any(".qkv.base_layer." in n or "patch_embed" in n for n in trainable)
    assert set(fk_peft.peft_trainable_names(model)) <= trainable


def test_parameter_report_counts_lora():
    model = fk.patch.timm(get_peft_model(tiny_vit(), lora_config()), "fpet", merge_layer=1)
    rep = pet.parameter_report(model)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    refine = model.get_base_model().blocks[1].fk_refine.modules_to_save.default
    refine_params = sum(p.numel() for p in refine.parameters())
    assert rep["by_type"]["peft LORA"] == (3, lora_params, 4 * lora_params)
    assert rep["by_type"]["RefinementAdapter"][:2] == (1, refine_params)  # the trained copy only
    assert rep["pet_params"] == lora_params + refine_params
    assert rep["total_params"] == sum(p.numel() for p in model.parameters())
    assert "peft LORA" in pet.format_report(rep)
    assert fk_peft.peft_report(tiny_vit(), set()) == {}


def test_helpers_on_plain_models():
    m = tiny_vit()
    assert not fk_peft.is_peft_model(m)
    assert fk_peft._unwrap_peft(m) is m
    assert fk_peft.peft_trainable_names(m) == []
    with pytest.raises(TypeError, match="PeftModel"):
        fk_peft.register_merge_modules(m)
