"""pet.save / pet.load (fpet_kernels.pet.state), plain checkpoints after pet.apply, and the heads
mark_trainable trains. Tiny timm ViTs, CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fpet_kernels import pet

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vit(seed=0, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, **kw).eval()


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)


@pytest.mark.parametrize("binary", [False, True])
def test_lora_round_trip_and_packing(binary, tmp_path):
    m = pet.apply(vit(), "lora", rank=4, binary=binary)
    pet.mark_trainable(m)
    _randomise(pet.pet_parameters(m))
    _randomise(m.head.parameters())
    want = m(X)
    path = str(tmp_path / "lora.safetensors")
    pet.save(m, path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        bits = [k for k in keys if k.startswith("bits/")]
        if binary:
            assert len(bits) == 8 and all(f.get_tensor(k).dtype == torch.uint8 for k in bits)
            for k in bits:  # 8 signs a byte
                n = m.get_parameter(k[5:]).numel()
                assert f.get_tensor(k).numel() == (n + 7) // 8
        else:
            assert not bits
        assert not any(".base." in k for k in keys)  # the frozen qkv is not stored
    fresh = pet.apply(vit(), "lora", rank=4, binary=binary)
    pet.load(fresh, path)
    assert torch.equal(fresh(X), want)
    # the stored size of a 1-bit LoRA is the packed size
    report = pet.parameter_report(m)
    import os
    head = sum(4 * p.numel() for p in m.head.parameters())
    assert os.path.getsize(path) < report["pet_bytes"] + head + 8192


def test_binary_reload_is_bit_exact_for_the_forward_weight(tmp_path):
    m = pet.apply(vit(), "lora", rank=4, binary=True)
    _randomise(pet.pet_parameters(m))
    lin = m.blocks[0].attn.qkv.lora_A_q
    w = lin.binary_weight().detach().clone()
    path = str(tmp_path / "b.safetensors")
    pet.save(m, path)
    fresh = pet.apply(vit(), "lora", rank=4, binary=True)
    pet.load(fresh, path)
    assert torch.equal(fresh.blocks[0].attn.qkv.lora_A_q.binary_weight(), w)
    # saving the reloaded model again gives the same bits
    pet.save(fresh, str(tmp_path / "b2.safetensors"))
    from safetensors.torch import load_file
    a, b = load_file(path), load_file(str(tmp_path / "b2.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adaptformer_and_head_switching(tmp_path):
    base = vit()
    files = []
    for seed in (1, 2):
        m = pet.apply(copy.deepcopy(base), "adaptformer", bottleneck=8)
        torch.manual_seed(seed)
        _randomise(pet.pet_parameters(m))
        _randomise(m.head.parameters())
        p = str(tmp_path / f"a{seed}.safetensors")
        pet.save(m, p)
        files.append((p, m(X)))
    served = pet.apply(copy.deepcopy(base), "adaptformer", bottleneck=8)
    for p, want in files + files[:1]:
        pet.load(served, p)
        assert torch.equal(served(X), want)


def test_load_errors(tmp_path):
    m = pet.apply(vit(), "lora", rank=4)
    p = str(tmp_path / "t.safetensors")
    pet.save(m, p)
    with pytest.raises(ValueError, match="another backbone"):
        pet.load(pet.apply(vit(seed=9), "lora", rank=4), p)
    with pytest.raises(ValueError, match="other settings"):
        pet.load(pet.apply(vit(), "lora", rank=4, scale=2.0), p)
    with pytest.raises(ValueError, match="PET modules differ"):
        pet.load(vit(), p)  # no LoRA applied
    with pytest.raises(ValueError, match="head"):
        big = pet.apply(vit(), "lora", rank=4)
        big.reset_classifier(7)
        pet.load(big, p)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a pet.save file"):
        pet.load(vit(), str(bad))


def test_plain_timm_state_dict_loads_after_lora():
    plain = vit(seed=3)
    m = pet.apply(vit(), "lora", rank=4)
    _randomise(pet.pet_parameters(m))
    lora_before = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}
    m.load_state_dict(plain.state_dict())  # strict: timm keys (qkv.weight) map onto qkv.base.weight
    assert torch.equal(m.blocks[0].attn.qkv.base.weight, plain.blocks[0].attn.qkv.weight)
    assert all(torch.equal(p, lora_before[n]) for n, p in m.named_parameters() if "lora_" in n)
    # with B = 0 (fresh LoRA) the model equals the plain one after loading its checkpoint
    z = pet.apply(vit(), "lora", rank=4)
    z.load_state_dict(plain.state_dict())
    assert torch.equal(z(X), plain(X))


def test_mark_trainable_trains_every_head():
    m = vit(global_pool="avg", fc_norm=True)
    assert isinstance(m.fc_norm, nn.LayerNorm)
    pet.apply(m, "lora", rank=2)
    pet.mark_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} <= trainable
    from timm.models.deit import VisionTransformerDistilled
    d = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    pet.mark_trainable(d)
    assert d.head_dist.weight.requires_grad and d.head.weight.requires_grad
    assert not d.blocks[0].attn.qkv.weight.requires_grad
    ap = vit(global_pool="map")
    pet.mark_trainable(ap)
    assert all(p.requires_grad for p in ap.attn_pool.parameters())
    with pytest.raises(ValueError, match="none of the heads"):
        pet.mark_trainable(nn.Sequential(nn.Linear(2, 2)))
