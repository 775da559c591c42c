"""HiWi (fpet_kernels.pet.hiwi): adapters fed the pre-trained weights / biases, computed once per forward,
folded away (backbone module types, equal outputs), saved as folded deltas. Tiny timm ViTs and BERTs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from fpet_kernels import pet

from test_pafi import MODELS, Wrap, tiny_bert, tiny_vit


def own_f(a, v):
    """The adapter written out: ReLU(x @ W_down / n + b_down) @ W_up / rank, x = v / rms(v) per row."""
    n, r = a.down.shape
    rms = v.pow(2).mean(-1, keepdim=True).sqrt()
    x = torch.where(rms > 0, v / rms, torch.zeros_like(v))
    return F.relu(x @ a.down / n + a.down_bias) @ a.up / r


def pretrained_like(m, seed=0):
    """Give every block nn.Linear a non-zero bias, at the scale of all-MiniLM-L6-v2's feed-forward biases
    (mean about -0.05, standard deviation about 0.1): random initialisation leaves them at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lin in pet._targets.block_linears(m):
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1 - 0.05)
    return m


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
    m, ref = pretrained_like(MODELS[kind]()), pretrained_like(MODELS[kind]())
    pet.apply(m, "hiwi", rank=4, targets=targets)
    x = Wrap.inputs(m)
    assert torch.equal(Wrap.out(m, x), Wrap.out(ref, x))  # W_up = 0: starts as the backbone
    _train(m)
    m.eval()
    # the adapted tensors follow the definition f(v) = ReLU(v W_down) W_up
    for n, mod in pet.hiwi.hiwi_modules(m):
        w, b = mod.adapted()
        if mod.hiwi_bias is not None:
            assert torch.allclose(b, mod.bias + own_f(mod.hiwi_bias, mod.bias))
        if mod.hiwi_weight is not None:
            assert torch.allclose(w, mod.weight + own_f(mod.hiwi_weight, mod.weight))
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
    backbone = pretrained_like(MODELS[kind]())
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


def wide_bert(seed: int = 0) -> nn.Module:
    """A tiny BERT whose feed-forward layer is MiniLM's width (1536), where the collapse was seen."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=1536, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _classify(m, lr, steps, seed=0):
    """AdamW on cross-entropy over fresh random batches and labels; per step ``{target: delta}`` and
    ``{target: active units}`` (the state before the first step first)."""
    pet.mark_trainable(m)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)

    def state():
        deltas, active = {}, {}
        for n, mod in pet.hiwi.hiwi_modules(m):
            deltas.update({f"{n}.{k}": d for k, d in mod.deltas().items()})
            active.update({f"{n}.{k}": a for k, a in mod.active_units().items()})
        return deltas, active

    history = [state()]
    for _ in range(steps):
        x = Wrap.inputs(m, seed=int(torch.randint(0, 2 ** 30, (1,), generator=g)))
        logits = Wrap.out(m, x)
        y = torch.randint(0, logits.shape[-1], logits.shape[:1], generator=g)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(state())
    return history


TRAIN_MODELS = {"vit": tiny_vit, "bert": tiny_bert, "wide_bert": wide_bert}


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
@pytest.mark.parametrize("targets", ["ffn_bias", "ffn"])
@pytest.mark.parametrize("kind", list(TRAIN_MODELS))
def test_deltas_move_on_every_target_of_a_pretrained_like_model(kind, targets, lr):
    m = pretrained_like(TRAIN_MODELS[kind]())
    pet.apply(m, "hiwi", rank=4, targets=targets)
    history = _classify(m, lr, steps=8)
    (d0, a0), (d_prev, _), (d_end, a_end) = history[0], history[-2], history[-1]
    assert len(d_end) == len(pet.hiwi.hiwi_modules(m)) * (2 if targets == "ffn" else 1)
    for t in d_end:
        assert not d0[t].any()  # W_up = 0: the model starts unchanged
        assert a0[t] == 4, t  # every unit starts active
        assert a_end[t] == 4, (t, a_end[t])  # ... and none died
        assert d_end[t].norm() > 0.1 * lr, (t, d_end[t].norm())  # the delta grew
        # still learning: the delta moved in each of the last two steps
        assert (d_end[t] - d_prev[t]).norm() > 0, t
        assert (d_prev[t] - history[-3][0][t]).norm() > 0, t


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
@pytest.mark.parametrize("kind", list(MODELS))
def test_zero_targets_warn_once_and_still_learn(kind, lr):
    m = MODELS[kind]()  # random initialisation: the feed-forward biases are zero
    zero = [n for n, lin in pet._targets.block_linears(m, "ffn") if not lin.bias.any()]
    assert len(zero) == 4
    with pytest.warns(UserWarning) as record:
        pet.apply(m, "hiwi", rank=4)
    msgs = [str(w.message) for w in record if "HiWi" in str(w.message)]
    assert len(msgs) == 1 and "4 of 4 targets are all zero" in msgs[0] and zero[0] + ".bias" in msgs[0]
    history = _classify(m, lr, steps=5)
    (d_prev, _), (d_end, a_end) = history[-2], history[-1]
    for t in d_end:
        assert a_end[t] == 4 and d_end[t].norm() > 0 and (d_end[t] - d_prev[t]).norm() > 0, t


def test_no_warning_when_targets_carry_values():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pet.apply(pretrained_like(tiny_vit()), "hiwi", rank=2, targets="ffn")
        # a weight target of a random-init model is not zero: no warning either
        pet.apply(tiny_vit(), "hiwi", rank=2, targets="ffn_weight")


def test_non_finite_target_is_refused():
    m = pretrained_like(tiny_bert())
    with torch.no_grad():
        m.bert.encoder.layer[1].output.dense.bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"targets: bert\.encoder\.layer\.1\.output\.dense\.bias holds NaN"):
        pet.apply(m, "hiwi")
    assert not pet.hiwi.hiwi_modules(m)  # nothing replaced


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_adam_step_on_a_unit_is_bounded_whatever_the_target_scale(scale):
    """The cause of the collapse: one Adam step moved a pre-activation by lr * sum|v|. With the input at
    unit RMS and the 1/n, a step moves it by at most about 2 lr, for any width and scale of the target."""
    torch.manual_seed(0)
    lr, n = 1e-2, 1536
    v = (torch.randn(n) * 0.1 - 0.05) * scale
    a = pet.HiWiAdapter(n, 8)
    opt = torch.optim.Adam(a.parameters(), lr=lr)
    target = torch.randn(n)
    h = [a.hidden(v).detach()]
    for _ in range(6):
        loss = (a(v) - target).square().sum() + (a(v) * torch.randn(n)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        h.append(a.hidden(v).detach())
    steps = torch.stack([b - c for b, c in zip(h[1:], h[:-1])]).abs()
    assert steps[1:].max() > 0.5 * lr  # the units do move (the first step only moves W_up)
    assert steps.max() <= 2.05 * lr
    assert (h[-1] > 0).all()
