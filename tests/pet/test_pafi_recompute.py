"""PaFi's backward rebuilds its input from tensors autograd keeps anyway (GELU input, LayerNorm input /
mean / rstd) instead of saving it, and calls the masked weight-gradient op in row blocks: the gradients
equal those of the plainly saved input and of dense autograd gathered at the mask; the target presets."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpet_kernels import pet
from fpet_kernels.pet import pafi as P

from test_pafi import MODELS, Wrap, tiny_bert, tiny_vit


def _spy(monkeypatch):
    kinds = []
    orig = P._rebuild_rows

    def spy(kind, saved, extra, start, end):
        kinds.append(kind)
        return orig(kind, saved, extra, start, end)

    monkeypatch.setattr(P, "_rebuild_rows", spy)
    return kinds


def _big_inputs(model):
    """Enough tokens that the backward runs the op in several row blocks (M > 128)."""
    g = torch.Generator().manual_seed(3)
    if isinstance(model, nn.Module) and hasattr(model, "blocks"):
        return (torch.randn(12, 3, 32, 32, generator=g),)  # 12 x 17 tokens
    return (torch.randint(0, 50, (8, 30), generator=g),)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("big", [False, True])
def test_rebuilt_input_gives_the_saved_input_gradients(kind, big, monkeypatch):
    grads, dense = [], MODELS[kind]()
    x = _big_inputs(dense) if big else Wrap.inputs(dense)
    kinds = _spy(monkeypatch)
    for recompute in (True, False):
        m = MODELS[kind]()
        pet.apply(m, "pafi", ratio=0.05)
        pet.mark_trainable(m)
        for _, mod in P.pafi_modules(m):
            mod.recompute_input = recompute
        Wrap.out(m, x).square().sum().backward()
        grads.append({n: mod.pafi_delta.grad.clone() for n, mod in P.pafi_modules(m)})
        if recompute:
            assert {"gelu", "layer_norm"} <= set(kinds), kinds  # both rebuilds ran
            assert None in kinds  # the attention projection's input is saved as it is
    Wrap.out(dense, x).square().sum().backward()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-5, atol=1e-7), n
        idx = dict(P.pafi_modules(m))[n].pafi_index
        want = dense.get_submodule(n).weight.grad.flatten()[idx]
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6), n


def _layer(n_in=6, n_out=5, ratio=0.3):
    lin = nn.Linear(n_in, n_out)
    layer = P.PaFiLinear(lin, P.pafi_indices(lin.weight, ratio), {"ratio": ratio})
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


def test_gelu_input_is_not_saved_again():
    layer = _layer()
    plain = copy.deepcopy(layer)
    plain.recompute_input = False
    h = torch.randn(4, 7, 6, requires_grad=True) * 1.0
    y = layer(F.gelu(h, approximate="tanh"))
    saved = y.grad_fn.saved_tensors[-1]
    assert saved.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()  # GELU's own input
    y.sum().backward()
    h2 = h.detach().requires_grad_()
    plain(F.gelu(h2, approximate="tanh")).sum().backward()
    assert torch.equal(layer.pafi_delta.grad, plain.pafi_delta.grad)  # bit for bit


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_output_is_rebuilt(affine):
    layer, norm = _layer(), nn.LayerNorm(6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        norm.requires_grad_(False)
    h = torch.randn(300, 6, requires_grad=True) * 3.0 + 1.0
    x = norm(h)
    assert P._input_source(x)[0] == "layer_norm"
    layer(x).square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    F.linear(x.detach(), w, layer.bias).square().sum().backward()
    assert torch.allclose(layer.pafi_delta.grad, w.grad.flatten()[layer.pafi_index], rtol=1e-5, atol=1e-6)


def test_input_saved_as_is_when_rebuilding_is_not_safe():
    h = torch.randn(3, 6, requires_grad=True)
    x = F.gelu(h * 1.0)
    assert P._input_source(x)[0] == "gelu"
    with torch.no_grad():
        x.add_(1.0)  # written in place since the GELU produced it
    assert P._input_source(x) is None
    x = F.gelu(h * 1.0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing, offloading
        assert P._input_source(x) is None
    assert P._input_source(torch.randn(3, 6)) is None
    assert P._input_source(torch.tanh(h)) is None
    ln = F.layer_norm(torch.randn(2, 3, 6, requires_grad=True), (3, 6))  # over two dimensions
    assert P._input_source(ln) is None


def test_presets_on_both_model_kinds():
    def names(model, targets):
        pet.apply(model, "pafi", ratio=0.01, targets=targets)
        return [n for n, _ in P.pafi_modules(model)]

    assert names(tiny_vit(), "qkv") == [f"blocks.{i}.attn.qkv" for i in range(2)]
    assert names(tiny_vit(), "attention") == [f"blocks.{i}.attn.{f}" for i in range(2) for f in ("qkv", "proj")]
    assert names(tiny_vit(), "qkv_ffn") == [f"blocks.{i}.{f}" for i in range(2) for f in ("attn.qkv", "mlp.fc1",
                                                                                         "mlp.fc2")]
    pre = "bert.encoder.layer"
    assert names(tiny_bert(), "qkv") == [f"{pre}.{i}.attention.self.{f}" for i in range(2)
                                         for f in ("query", "key", "value")]
    assert names(tiny_bert(), "qkv_ffn") == [f"{pre}.{i}.{f}" for i in range(2) for f in (
        "attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense", "output.dense")]
    assert names(tiny_bert(), "attention") == [f"{pre}.{i}.attention.{f}" for i in range(2) for f in (
        "self.query", "self.key", "self.value", "output.dense")]
    b = pet.apply(tiny_bert(), "hiwi", rank=2, targets="ffn1_bias")
    mods = pet.hiwi.hiwi_modules(b)
    assert [n for n, _ in mods] == [f"{pre}.{i}.intermediate.dense" for i in range(2)]
    assert all(m.hiwi_weight is None and m.hiwi_bias is not None for _, m in mods)
    v = pet.apply(tiny_vit(), "hiwi", rank=2, targets="ffn1_bias")
    assert [n for n, _ in pet.hiwi.hiwi_modules(v)] == [f"blocks.{i}.mlp.fc1" for i in range(2)]
