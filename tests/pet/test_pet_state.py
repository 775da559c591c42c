"""pet.save / pet.load (fpet_kernels.pet.state), plain checkpoints after pet.apply, and the heads
mark_trainable trains; what must not lose trained state silently (stacked methods, save after fold),
damaged and unreadable files, messages that name the real cause. Tiny timm ViTs, CPU."""
from __future__ import annotations

import copy
import json
import os
import re
import struct

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
    with pytest.raises(ValueError, match="PET methods differ"):
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


# ----------------------------------------------------------------------------- nothing trained is lost silently
def _n_pafi(m):
    return len(pet.pafi.pafi_modules(m))


def test_stacking_methods_on_one_layer_raises_and_changes_nothing():
    m = pet.apply(vit(), "pafi", ratio=0.05)
    n = _n_pafi(m)
    assert n == 6  # qkv, fc1, fc2 of 2 blocks
    with pytest.raises(ValueError, match=r"method='hiwi' would replace .*\['pafi'\].*pet.fold"):
        pet.apply(m, "hiwi")
    assert _n_pafi(m) == n and not pet.hiwi.hiwi_modules(m)
    with pytest.raises(ValueError, match="another PET method holds"):
        pet.apply(m, "lora", rank=2)
    assert _n_pafi(m) == n and not any(isinstance(x, pet.LoRAQKV) for x in m.modules())
    h = pet.apply(vit(), "hiwi")
    with pytest.raises(ValueError, match=r"method='pafi' would replace .*\['hiwi'\]"):
        pet.apply(h, "pafi", ratio=0.05)
    assert not _n_pafi(h) and len(pet.hiwi.hiwi_modules(h)) == 4
    # LoRA holds attn.qkv: asking for it (the default qkv_ffn, "qkv", or a pattern) raises, not a silent skip
    for targets in ("qkv_ffn", "qkv", [r"attn\.qkv$"]):
        lo = pet.apply(vit(), "lora", rank=2)
        with pytest.raises(ValueError, match=r"\['lora'\]"):
            pet.apply(lo, "pafi", ratio=0.05, targets=targets)
        assert not _n_pafi(lo)
    with pytest.raises(ValueError, match=r"\['lora'\]"):
        pet.apply(pet.apply(vit(), "lora", rank=2), "hiwi", targets=[r"attn\.qkv\.bias$"])
    # after fold the layers are plain again: a second method may go there
    pet.fold(m)
    pet.apply(m, "hiwi")
    assert len(pet.hiwi.hiwi_modules(m)) == 4


def test_methods_on_different_layers_stack_and_round_trip(tmp_path):
    m = pet.apply(pet.apply(vit(), "lora", rank=2), "pafi", ratio=0.05, targets="ffn")
    assert [n for n, _ in pet.pafi.pafi_modules(m)] == [f"blocks.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")]
    pet.mark_trainable(m)
    _randomise(pet.pet_parameters(m))
    _randomise(m.head.parameters())
    want = m(X)
    path = str(tmp_path / "lp.safetensors")
    pet.save(m, path)
    fresh = pet.apply(vit(), "lora", rank=2)  # PaFi comes from the file
    pet.load(fresh, path)
    assert torch.equal(fresh(X), want)


@pytest.mark.parametrize("method,kw", [("pafi", dict(ratio=0.05)), ("hiwi", dict(targets="ffn_weight")),
                                       ("lora", dict(rank=2))])
def test_save_after_fold_raises_unless_allowed(method, kw, tmp_path):
    m = pet.apply(vit(), method, **kw)
    pet.mark_trainable(m)
    _randomise(pet.pet_parameters(m))
    before = str(tmp_path / "before.safetensors")
    pet.save(m, before)  # the documented order
    pet.fold(m)
    path = str(tmp_path / "after.safetensors")
    with pytest.raises(ValueError, match=rf"folded by pet.fold \({method}\).*save before pet.fold"):
        pet.save(m, path)
    assert not os.path.exists(path)
    with pytest.raises(TypeError, match="allow_folded"):
        pet.save(m, path, allow_folded=1)
    # explicit: the folded model is the backbone of the file; it loads into that model (or a copy) only
    pet.save(m, path, allow_folded=True)
    served = copy.deepcopy(m)
    pet.load(served, path)
    assert torch.equal(served(X), m(X))
    with pytest.raises(ValueError, match=r"saved \(allow_folded=True\) from a model folded .* is not folded"):
        pet.load(vit(), path)
    # the file saved before fold loads into a fresh backbone with the method (PaFi / HiWi: the plain one)
    fresh = vit() if method != "lora" else pet.apply(vit(), "lora", rank=2)
    pet.load(fresh, before)
    assert torch.allclose(fresh(X), m(X), atol=1e-5)
    # a folded model refuses the task with a message saying it was folded, and stays as it was
    with pytest.raises(ValueError, match=rf"the model was folded by pet.fold \({method}\)"):
        pet.load(m, before)
    assert not _n_pafi(m) and getattr(m, "_fk_folded") == [method]


# ----------------------------------------------------------------------------- messages that name the cause
def test_wrong_method_is_not_blamed_on_the_backbone(tmp_path):
    pafi_file = str(tmp_path / "pafi.safetensors")
    pet.save(pet.apply(vit(), "pafi", ratio=0.05), pafi_file)
    lora = pet.apply(vit(), "lora", rank=2)
    with pytest.raises(ValueError, match=r"PET methods differ: .* holds a task of \['pafi'\], the model has "
                                         r"\['lora'\]") as e:
        pet.load(lora, pafi_file)
    assert "backbone" not in str(e.value).split(";")[0]
    assert not _n_pafi(lora)  # nothing applied or changed
    lora_file = str(tmp_path / "lora.safetensors")
    pet.save(lora, lora_file)
    with pytest.raises(ValueError, match=r"PET methods differ: .*\['lora'\].*apply \['lora'\]"):
        pet.load(vit(), lora_file)
    with pytest.raises(ValueError, match=r"PET methods differ: .*the model has \['adaptformer', 'lora'\]"):
        pet.load(pet.apply(pet.apply(vit(), "lora", rank=2), "adaptformer", bottleneck=4), lora_file)
    with pytest.raises(ValueError, match=r"PET methods differ: .*the model has \['hiwi', 'lora'\]"):
        pet.load(pet.apply(pet.apply(vit(), "lora", rank=2), "hiwi"), lora_file)
    # the same method on another backbone is still blamed on the backbone
    with pytest.raises(ValueError, match="another backbone"):
        pet.load(pet.apply(vit(seed=5), "lora", rank=2), lora_file)


# ----------------------------------------------------------------------------- damaged and unreadable files
def _lora_file(tmp_path):
    m = pet.apply(vit(), "lora", rank=4)
    _randomise(pet.pet_parameters(m))
    path = str(tmp_path / "task.safetensors")
    pet.save(m, path)
    return m, path


def _data_start(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_corrupted_tensor_bytes_are_detected(tmp_path):
    m, path = _lora_file(tmp_path)
    raw = bytearray(open(path, "rb").read())
    start = _data_start(path)
    for pos in (start, (start + len(raw)) // 2, len(raw) - 1):  # first, a middle and the last data byte
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        p = str(tmp_path / f"bad{pos}.safetensors")
        open(p, "wb").write(bytes(bad))
        fresh = pet.apply(vit(), "lora", rank=4)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match=re.escape(p) + " is damaged"):
            pet.load(fresh, p)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    # the stored checksum is in the metadata
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["checksum"]).startswith("sha256:")


def test_file_without_checksum_still_loads(tmp_path):
    """Files written before the checksum existed: loaded, not checked."""
    m, path = _lora_file(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "checksum"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata=meta)
    fresh = pet.apply(vit(), "lora", rank=4)
    pet.load(fresh, old)
    assert torch.equal(fresh(X), m(X))
    # a changed metadata entry of a file with a checksum is detected too
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    meta["model"] = json.dumps("Other")
    edited = str(tmp_path / "edited.safetensors")
    save_file(tensors, edited, metadata=meta)
    with pytest.raises(ValueError, match="is damaged"):
        pet.load(pet.apply(vit(), "lora", rank=4), edited)


def test_unreadable_files_name_the_file(tmp_path):
    _, path = _lora_file(tmp_path)
    raw = open(path, "rb").read()
    cases = {
        "empty": b"",
        "seven": raw[:7],
        "truncated": raw[:-9],
        "header_only": raw[:_data_start(path)],
        "bad_header": struct.pack("<Q", 20) + b"{not json at all!!!}",
        "huge_header": struct.pack("<Q", 2 ** 40) + b"{}",
        "text": b"this is a plain text file, not a safetensors file\n" * 3,
    }
    for name, data in cases.items():
        p = str(tmp_path / f"{name}.safetensors")
        open(p, "wb").write(data)
        with pytest.raises(ValueError, match=re.escape(repr(p)) + " is not a readable pet.save"):
            pet.load(pet.apply(vit(), "lora", rank=4), p)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(tmp_path / "missing"))) + ": no such file"):
        pet.load(vit(), str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        pet.load(vit(), str(tmp_path))
    with pytest.raises(TypeError, match="path must be"):
        pet.load(vit(), 123)
    m = pet.apply(vit(), "lora", rank=4)
    for bad in (str(tmp_path), str(tmp_path / "no_such_dir" / "t.safetensors")):
        with pytest.raises(OSError, match="pet.save: cannot write path " + re.escape(repr(bad))):
            pet.save(m, bad)


def test_pafi_targets_of_the_wrong_type_name_the_argument():
    for bad in (123, 1.5, None, {"a": 1}):
        with pytest.raises(TypeError, match="targets must be"):
            pet.apply(vit(), "pafi", targets=bad)
    for bad in ([], [1], ["ok", 2]):
        with pytest.raises(TypeError, match="targets must be"):
            pet.apply(vit(), "pafi", targets=bad)
