"""HiWi (fpet_kernels.pet.hiwi): adapters fed the pre-trained weights / biases, computed once per forward,
folded away (backbone module types, equal outputs), saved as folded deltas. Tiny timm ViTs and BERTs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpet_kernels import pet

from test_pafi import MODELS, Wrap, tiny_bert, tiny_vit


def _train(m, steps=3, lr=0.05):
    pet.mark_trainable(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    x = Wrap.inputs(m)
    for _ in range(steps):
        loss = Wrap.out(m, x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


def test_targets_resolve_on_both_model_kinds():
    v = pet.apply(tiny_vit(), "hiwi", rank=2)
    names = [n for n, _ in pet.hiwi.hiwi_modules(v)]
    assert names == [f"blocks.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")]
    b = pet.apply(tiny_bert(), "hiwi", rank=2)
    names = [n for n, _ in pet.hiwi.hiwi_modules(b)]
    assert names == [f"bert.encoder.layer.{i}.{f}.dense" for i in range(2) for f in ("intermediate", "output")]
    assert all(m.hiwi_weight is None and m.hiwi_bias is not None for _, m in pet.hiwi.hiwi_modules(b))
    p = pet.apply(tiny_vit(), "hiwi", rank=2, targets=[r"blocks\.0\.attn\.qkv\.weight$"])
    (name, mod), = pet.hiwi.hiwi_modules(p)
    assert name == "blocks.0.attn.qkv" and mod.hiwi_weight is not None and mod.hiwi_bias is None


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("targets", ["ffn_bias", "ffn_weight", "ffn"])
def test_forward_is_P_plus_f_P_and_fold_is_exact(kind, targets):
    m, ref = MODELS[kind](), MODELS[kind]()
    pet.apply(m, "hiwi", rank=4, targets=targets)
    x = Wrap.inputs(m)
    assert torch.equal(Wrap.out(m, x), Wrap.out(ref, x))  # W_up = 0: starts as the backbone
    _train(m)
    m.eval()
    # the adapted tensors follow the definition f(v) = ReLU(v W_down) W_up
    for n, mod in pet.hiwi.hiwi_modules(m):
        w, b = mod.adapted()
        if mod.hiwi_bias is not None:
            a = mod.hiwi_bias
            assert torch.allclose(b, mod.bias + F.relu(mod.bias @ a.down) @ a.up)
        if mod.hiwi_weight is not None:
            a = mod.hiwi_weight
            assert torch.allclose(w, mod.weight + F.relu(mod.weight @ a.down) @ a.up)
    out = Wrap.out(m, x)
    assert not torch.equal(out, Wrap.out(ref, x))
    pet.fold(m)
    assert [type(a) for a in m.modules()] == [type(b) for b in ref.modules()]
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert torch.equal(Wrap.out(m, x), out)


def test_adapter_runs_once_per_forward_not_per_token():
    m = pet.apply(tiny_vit(), "hiwi", rank=2, targets="ffn")
    calls = []
    for _, lin in pet.hiwi.hiwi_modules(m):
        for ad, param in ((lin.hiwi_weight, lin.weight), (lin.hiwi_bias, lin.bias.unsqueeze(0))):
            ad.register_forward_hook(lambda mod, args, out, p=param: calls.append(torch.equal(args[0], p)))
    Wrap.out(m, (torch.randn(5, 3, 32, 32),))
    assert len(calls) == 2 * len(pet.hiwi.hiwi_modules(m))  # once each, whatever the batch and token count
    assert all(calls)  # fed the pre-trained parameters, not hidden states


def test_only_adapters_and_head_train():
    m = pet.apply(tiny_bert(), "hiwi", rank=3)
    pet.mark_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".hiwi_bias." in n or n.startswith("classifier.") for n in trainable)


def test_bad_input():
    with pytest.raises(ValueError, match="rank"):
        pet.apply(tiny_vit(), "hiwi", rank=0)
    with pytest.raises(ValueError, match="no eligible module"):
        pet.apply(tiny_vit(), "hiwi", targets=[r"nothing\.here"])
    with pytest.raises(ValueError, match="no eligible module"):
        pet.apply(nn.Sequential(nn.Conv2d(3, 3, 1)), "hiwi")
    with pytest.raises(TypeError, match="targets"):
        pet.apply(tiny_vit(), "hiwi", targets=3)
    m = pet.apply(tiny_vit(), "hiwi")
    with pytest.raises(ValueError, match="twice"):
        pet.apply(m, "hiwi")
    with pytest.raises(TypeError, match="unexpected keyword"):
        pet.apply(tiny_vit(), "hiwi", ratio=0.1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_save_load_folded_deltas_and_switch(kind, tmp_path):
    backbone = MODELS[kind]()
    x = Wrap.inputs(backbone)
    files = []
    for seed in (1, 2):
        m = copy.deepcopy(backbone)
        pet.apply(m, "hiwi", rank=4)
        torch.manual_seed(seed)
        _train(m, lr=0.05 * seed)
        m.eval()
        path = str(tmp_path / f"hiwi{seed}.safetensors")
        info = pet.save(m, path)
        n_bias = sum(mod.bias.numel() for _, mod in pet.hiwi.hiwi_modules(m))
        head_bytes = sum(4 * p.numel() for h in pet.heads(m).values() for p in h.parameters())
        assert info["bytes"] < 4 * n_bias + head_bytes + 8192  # folded bias deltas + head, not the adapters
        files.append((path, Wrap.out(m, x)))
    served = copy.deepcopy(backbone)
    for path, want in files + files[:1]:
        pet.load(served, path)
        assert torch.allclose(Wrap.out(served, x), want, atol=1e-6)
    assert [type(a) for a in served.modules()] == [type(b) for b in backbone.modules()]
    with pytest.raises(ValueError, match="backbone|pre-trained"):
        pet.load(MODELS[kind](seed=5), files[0][0])
    unfolded = pet.apply(copy.deepcopy(backbone), "hiwi", rank=4)
    with pytest.raises(ValueError, match="unfolded HiWi"):
        pet.load(unfolded, files[0][0])
