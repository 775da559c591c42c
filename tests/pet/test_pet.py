"""fpet_kernels.pet: binary layers, AdaptFormer, LoRA, FPET refinement adapter, PYRA modulation,
apply / mark_trainable / parameter_report. Tiny timm ViTs built in place (no downloads), CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpet_kernels import patch as fk_patch
from fpet_kernels import pet

timm_vit = pytest.importorskip("timm.models.vision_transformer")

EMBED, DEPTH, HEADS, CLASSES, IMG, PATCH = 64, 2, 2, 10, 32, 8
C_LEVEL = math.sqrt(2 / math.pi)


def tiny_vit(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = timm_vit.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
                                   num_classes=CLASSES, **kw)
    return m.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _reference_block_forward(blk, x):
    """The AdaptFormer block: ``x + attn(...)``, then ``x + mlp(norm2(x)) + adapter(x)``."""
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))) + blk.fk_adapter(x)


@pytest.fixture
def ensure_block():
    """``fpet_kernels.patch.ensure_block``: what ``pet.apply(model, "adaptformer")`` swaps each block with
    (``pet.adaptformer`` imports it at module level: the patch layer sits below the PET methods)."""
    return fk_patch.ensure_block


def _randomize(*linears, std=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in linears:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)


# ----------------------------------------------------------------------------- binarisation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarize_two_levels(dtype):
    w = (torch.randn(16, 24, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.05).to(dtype)
    q = pet.binarize(w)
    assert q.dtype == dtype and q.shape == w.shape
    levels = q.unique()
    assert levels.numel() == 2
    mu, sigma = w.double().mean(), w.double().std()
    torch.testing.assert_close(levels.double(), torch.stack([mu - C_LEVEL * sigma, mu + C_LEVEL * sigma]),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(q == levels[1], w >= w.mean())  # sign(w - mu)


def test_binarize_straight_through_gradient():
    w = torch.randn(8, 5, requires_grad=True)
    g = torch.randn(8, 5)
    q = pet.binarize(w)
    assert q.unique().numel() == 2  # exact levels also on the autograd path
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_binarize_constant_and_degenerate_weights():
    for w in (torch.zeros(4, 3), torch.full((4, 3), 0.3), torch.tensor([[2.5]])):
        q = pet.binarize(w.clone().requires_grad_())
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.detach(), w, rtol=0, atol=1e-7)
    assert torch.equal(pet.binarize(torch.zeros(4, 3)), torch.zeros(4, 3))
    lin = pet.BinaryLinear(3, 4)
    nn.init.zeros_(lin.weight)
    x = torch.randn(2, 3)
    assert torch.equal(lin(x), lin.bias.expand(2, 4))


def test_binary_linear_uses_binarized_weight():
    lin = pet.BinaryLinear(6, 5)
    x = torch.randn(3, 6)
    assert torch.equal(lin(x), F.linear(x, pet.binarize(lin.weight), lin.bias))
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,dtype", [((11, 37), torch.float32), ((8, 16), torch.float32),
                                         ((5, 3), torch.float64)])
def test_pack_unpack_round_trip(shape, dtype):
    torch.manual_seed(0)
    lin = pet.BinaryLinear(shape[1], shape[0]).to(dtype)
    d = pet.pack_binary(lin)
    n = shape[0] * shape[1]
    assert d["bits"].dtype == torch.uint8 and d["bits"].numel() == (n + 7) // 8
    assert isinstance(d["mu"], float) and isinstance(d["sigma"], float) and tuple(d["shape"]) == shape
    w = pet.unpack_binary(d)
    assert w.dtype == dtype and torch.equal(w, pet.binarize(lin.weight).detach())
    restored = nn.Linear(shape[1], shape[0]).to(dtype)
    with torch.no_grad():
        restored.weight.copy_(w)
        restored.bias.copy_(d["bias"])
    x = torch.randn(7, shape[1], dtype=dtype)
    assert torch.equal(restored(x), lin(x))


# ----------------------------------------------------------------------------- AdaptFormer
def test_adaptformer_adapter_math():
    ad = pet.AdaptFormerAdapter(EMBED).eval()
    assert ad.down.out_features == 64 and ad.scale == 0.1 and not isinstance(ad.up, pet.BinaryLinear)
    x = torch.randn(2, 5, EMBED)
    assert torch.equal(ad(x), torch.zeros_like(x))  # zero-init up
    _randomize(ad.down, ad.up)
    ref = 0.1 * F.linear(F.relu(F.linear(x, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)
    torch.testing.assert_close(ad(x), ref, rtol=1e-6, atol=1e-7)

    bad = pet.AdaptFormerAdapter(EMBED, bottleneck=8, scale=0.5, binary=True).eval()
    assert isinstance(bad.down, pet.BinaryLinear) and isinstance(bad.up, pet.BinaryLinear)
    assert torch.equal(bad(x), torch.zeros_like(x))
    _randomize(bad.down, bad.up)
    h = F.relu(F.linear(x, pet.binarize(bad.down.weight), bad.down.bias))
    torch.testing.assert_close(bad(x), 0.5 * F.linear(h, pet.binarize(bad.up.weight), bad.up.bias))


def test_adaptformer_block_end_to_end(ensure_block):
    model = tiny_vit()
    pet.apply(model, "adaptformer", bottleneck=16, scale=0.2)
    blk = model.blocks[0]
    assert isinstance(blk.fk_adapter, pet.AdaptFormerAdapter) and blk.fk_adapter.bottleneck == 16
    _randomize(blk.fk_adapter.down, blk.fk_adapter.up, std=0.1)
    x = torch.randn(2, 17, EMBED)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block_forward(blk, x), rtol=1e-5, atol=1e-6)


def test_adaptformer_with_real_patch():
    model = tiny_vit()
    pet.apply(model, "adaptformer")
    for blk in model.blocks:
        _randomize(blk.fk_adapter.down, blk.fk_adapter.up, std=0.1)
    x = torch.randn(2, 17, EMBED)
    with torch.no_grad():
        for blk in model.blocks:
            torch.testing.assert_close(blk(x), _reference_block_forward(blk, x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- LoRA
def test_lora_wraps_qkv():
    model = tiny_vit()
    bases = [blk.attn.qkv for blk in model.blocks]
    pet.apply(model, "lora", rank=4, scale=2.0)
    for blk, base in zip(model.blocks, bases):
        q = blk.attn.qkv
        assert isinstance(q, pet.LoRAQKV) and q.base is base
        assert q.weight is base.weight and q.bias is base.bias
        assert (q.in_features, q.out_features) == (EMBED, 3 * EMBED)
        assert q.lora_A_q.weight.shape == (4, EMBED) and q.lora_B_v.weight.shape == (EMBED, 4)
        assert q.lora_A_q.weight.abs().sum() > 0 and not q.lora_B_q.weight.any()
    with pytest.raises(ValueError, match="twice"):
        pet.apply(model, "lora")


def test_lora_touches_q_and_v_only():
    base = nn.Linear(EMBED, 3 * EMBED)
    lora = pet.LoRAQKV(base, rank=4, scale=0.5)
    _randomize(lora.lora_B_q, lora.lora_B_v, seed=5)
    x = torch.randn(3, 9, EMBED)
    out, ref = lora(x), base(x)
    d = EMBED
    assert torch.equal(out[..., d:2 * d], ref[..., d:2 * d])
    torch.testing.assert_close(out[..., :d], ref[..., :d] + 0.5 * lora.lora_B_q(lora.lora_A_q(x)))
    torch.testing.assert_close(out[..., 2 * d:], ref[..., 2 * d:] + 0.5 * lora.lora_B_v(lora.lora_A_v(x)))


@pytest.mark.parametrize("binary", [False, True])
def test_lora_fold_equals_forward(binary):
    model = tiny_vit()
    pet.apply(model, "lora", rank=8, scale=1.5, binary=binary)
    for i, blk in enumerate(model.blocks):
        _randomize(blk.attn.qkv.lora_B_q, blk.attn.qkv.lora_B_v, seed=10 + i)
    x = torch.randn(2, 17, EMBED)
    q = model.blocks[0].attn.qkv
    folded = q.merge()
    assert type(folded) is nn.Linear and folded.weight.shape == (3 * EMBED, EMBED)
    torch.testing.assert_close(folded(x), q(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = model(images())
        pet.merge_lora(model)
        assert not any(isinstance(m, pet.LoRAQKV) for m in model.modules())
        torch.testing.assert_close(model(images()), y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training step
def _apply(model, method, ensure_block):
    if method == "adaptformer":
        return pet.apply(model, "adaptformer", bottleneck=8)
    return pet.apply(model, "lora", rank=4, binary=(method == "lora-binary"))


@pytest.mark.parametrize("method", ["lora", "lora-binary", "adaptformer"])
def test_init_unchanged_and_one_step_trains_only_pet(method, ensure_block):
    model = tiny_vit()
    x, target = images(), torch.arange(4) % CLASSES
    with torch.no_grad():
        y0 = model(x)
    _apply(model, method, ensure_block)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)

    pet.mark_trainable(model)
    pet_ids = {id(p) for p in pet.pet_parameters(model)}
    head_ids = {id(p) for p in model.head.parameters()}
    assert pet_ids and not pet_ids & head_ids
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in pet_ids | head_ids), name
    qkv = model.blocks[0].attn.qkv
    if method != "adaptformer":
        assert not qkv.weight.requires_grad and not qkv.bias.requires_grad
        assert all(p.requires_grad for p in qkv.lora_parameters())

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    F.cross_entropy(model(x), target).backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= allowed
    assert any(not n.startswith("head.") for n in changed)  # a PET parameter moved, not only the head
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, before[n]), n
    with torch.no_grad():
        model.head.load_state_dict({k[5:]: before[k] for k in before if k.startswith("head.")})
        assert not torch.allclose(model(x), y0, atol=1e-6)  # the PET part alone changed the output


def test_mark_trainable_without_head():
    model = pet.apply(tiny_vit(), "lora", rank=2)
    pet.mark_trainable(model, train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{ab}_{qv}.weight" for i in range(DEPTH)
                         for ab in "AB" for qv in "qv"}


# ----------------------------------------------------------------------------- FPET / PYRA modules
def test_refinement_adapter():
    ra = pet.RefinementAdapter()
    assert (ra.dim, ra.hidden, ra.dropout.p) == (64, 32, 0.1)
    assert isinstance(ra.down, pet.BinaryLinear) and isinstance(ra.up, pet.BinaryLinear)
    metric = torch.randn(2, 9, 64, requires_grad=True)
    out = ra(metric)
    assert torch.isfinite(out).all() and torch.equal(out, metric.detach())  # f starts at exactly zero
    out.pow(2).sum().backward()
    assert metric.grad is None  # the metric is detached
    assert ra.up.weight.grad is not None and ra.up.weight.grad.abs().sum() > 0
    assert ra.down.weight.grad is not None

    _randomize(ra.up, seed=7)
    ra.zero_grad()
    ra.eval()
    out = ra(metric)
    assert not torch.equal(out, metric.detach())
    out.pow(2).sum().backward()
    assert metric.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ra.parameters())


def test_refinement_adapter_full_precision():
    ra = pet.RefinementAdapter(dim=16, hidden=4, dropout=0.0, binary=False)
    assert type(ra.up) is nn.Linear and ra.up.weight.shape == (16, 4)
    m = torch.randn(3, 16)
    assert torch.equal(ra(m), m)


def test_pyra_modulation():
    torch.manual_seed(0)
    mod = pet.PyraModulation(4, EMBED)
    assert mod.a.shape == (4, 1) and mod.b.shape == (1, EMBED)
    assert not mod.b.any() and mod.a.abs().sum() > 0 and mod.a.abs().max() <= 1.0  # kaiming, fan_in 1
    assert mod.ln_weight is mod.norm.weight and mod.ln_bias is mod.norm.bias
    assert mod.norm.normalized_shape == (EMBED,)
    assert {n for n, _ in mod.named_parameters()} == {"a", "b", "norm.weight", "norm.bias"}
    x, metric = torch.randn(2, 17, EMBED), torch.randn(2, 17, 16)
    out, size = mod(x, metric, class_token=True, backend="reference")
    assert out.shape == (2, 13, EMBED) and size.shape == (2, 13, 1)
    assert pet.PyraModulation(0, 8).a.shape == (0, 1)


# ----------------------------------------------------------------------------- report
def _vit_params() -> int:
    """Hand count for the tiny ViT (embed 64, depth 2, mlp 4x, 16 patches + cls, 10 classes)."""
    d, n_tok, hidden = EMBED, (IMG // PATCH) ** 2 + 1, 4 * EMBED
    patch_embed = 3 * PATCH * PATCH * d + d
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    return patch_embed + d + n_tok * d + DEPTH * block + 2 * d + (d * CLASSES + CLASSES)


def test_parameter_report_lora():
    model = tiny_vit()
    head = EMBED * CLASSES + CLASSES
    assert pet.parameter_report(model)["total_params"] == _vit_params() == 114250
    pet.mark_trainable(pet.apply(model, "lora", rank=4))
    rep = pet.parameter_report(model)
    lora = DEPTH * 4 * (4 * EMBED)  # A_q, B_q, A_v, B_v: rank x 64 each
    assert rep["total_params"] == _vit_params() + lora
    assert rep["trainable_params"] == lora + head and rep["head_params"] == head
    assert (rep["pet_params"], rep["binary_params"], rep["pet_bytes"]) == (lora, 0, 4 * lora)
    assert rep["by_type"] == {"LoRAQKV": (DEPTH, lora, 4 * lora)}
    text = pet.format_report(rep)
    assert f"{rep['total_params']:,}" in text and "LoRAQKV" in text


def test_parameter_report_binary_modules():
    model = pet.apply(tiny_vit(), "lora", rank=4, binary=True)
    model.blocks[1].fk_refine = pet.RefinementAdapter()         # binary 64 -> 32 -> 64
    model.blocks[1].fk_pyra = pet.PyraModulation(4, EMBED)
    pet.mark_trainable(model, train_head=False)
    rep = pet.parameter_report(model)
    # LoRA: 4 binary 256-weight matrices per block: 32 bytes of bits + mu, sigma (8 bytes) each.
    lora_p, lora_b = DEPTH * 4 * 256, DEPTH * 4 * (256 // 8 + 8)
    # Refinement: two binary 2048-weight matrices (256 + 8 bytes each), fp32 biases 32 + 64.
    ref_p, ref_b = 2 * 2048 + 32 + 64, 2 * (2048 // 8 + 8) + 4 * (32 + 64)
    pyra_p = 4 + EMBED + 2 * EMBED
    assert rep["by_type"] == {"LoRAQKV": (DEPTH, lora_p, lora_b), "RefinementAdapter": (1, ref_p, ref_b),
                              "PyraModulation": (1, pyra_p, 4 * pyra_p)}
    assert rep["pet_params"] == rep["trainable_params"] == lora_p + ref_p + pyra_p
    assert rep["binary_params"] == lora_p + 2 * 2048
    assert rep["pet_bytes"] == lora_b + ref_b + 4 * pyra_p == 320 + 912 + 784
    assert rep["pet_bytes_fp32"] == 4 * rep["pet_params"]
    assert rep["total_params"] == _vit_params() + rep["pet_params"]
    assert "1 bit" in pet.format_report(rep)


def test_adaptformer_binary_report(ensure_block):
    model = pet.mark_trainable(pet.apply(tiny_vit(), "adaptformer", bottleneck=8, binary=True))
    rep = pet.parameter_report(model)
    per_block_p = (EMBED * 8 + 8) + (8 * EMBED + EMBED)
    per_block_b = 2 * (EMBED * 8 // 8 + 8) + 4 * (8 + EMBED)
    assert (rep["pet_params"], rep["pet_bytes"]) == (DEPTH * per_block_p, DEPTH * per_block_b) == (2192, 864)
    assert rep["trainable_params"] == DEPTH * per_block_p + EMBED * CLASSES + CLASSES


# ----------------------------------------------------------------------------- with the merging patch
def test_lora_with_fpet_patch_marks_refinement_trainable():
    model = pet.apply(tiny_vit(), "lora", rank=2)
    fk_patch.timm(model, method="fpet", merge_layer=1)
    pet.mark_trainable(model)
    refine = model.blocks[1].fk_refine
    assert isinstance(refine, pet.RefinementAdapter) and pet.RefinementAdapter is fk_patch.modules.RefinementAdapter
    assert all(p.requires_grad for p in refine.parameters())
    assert model(images(2)).shape == (2, CLASSES)
    assert pet.parameter_report(model)["by_type"]["RefinementAdapter"][0] == 1


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    model = tiny_vit()
    cases = [
        (lambda: pet.apply(model, "prompt"), ValueError, "method"),
        (lambda: pet.apply(nn.Linear(2, 2), "lora"), TypeError, "model"),
        (lambda: pet.apply(nn.Sequential(), "lora"), TypeError, "model"),
        (lambda: pet.apply(model, "lora", rnak=4), TypeError, "rnak"),
        (lambda: pet.apply(model, "lora", rank=0), ValueError, "rank"),
        (lambda: pet.LoRAQKV(nn.Linear(4, 5)), ValueError, "qkv"),
        (lambda: pet.LoRAQKV(nn.Conv1d(4, 12, 1)), TypeError, "qkv"),
        (lambda: pet.LoRAQKV(nn.Linear(4, 12), rank=2.5), TypeError, "rank"),
        (lambda: pet.LoRAQKV(nn.Linear(4, 12), scale="big"), TypeError, "scale"),
        (lambda: pet.AdaptFormerAdapter(EMBED, bottleneck=0), ValueError, "bottleneck"),
        (lambda: pet.AdaptFormerAdapter(EMBED, dropout=1.5), ValueError, "dropout"),
        (lambda: pet.AdaptFormerAdapter(EMBED, binary=1), TypeError, "binary"),
        (lambda: pet.RefinementAdapter()(torch.randn(2, 3, 32)), ValueError, "metric"),
        (lambda: pet.PyraModulation(-1, EMBED), ValueError, "r"),
        (lambda: pet.PyraModulation(2, 0), ValueError, "dim"),
        (lambda: pet.mark_trainable(nn.Sequential(nn.Linear(2, 2))), ValueError, "train_head"),
        (lambda: pet.binarize(torch.ones(3, dtype=torch.int64)), TypeError, "w"),
        (lambda: pet.pack_binary(nn.Conv1d(2, 2, 1)), TypeError, "linear"),
        (lambda: pet.format_report({}), TypeError, "report"),
    ]
    for fn, exc, arg in cases:
        with pytest.raises(exc, match=arg):
            fn()
    # a failed apply leaves the model untouched
    assert all(type(blk.attn.qkv) is nn.Linear for blk in model.blocks)


def test_pyra_merge_runs_the_modulation_forward():
    """The PYRA merge step calls ``PyraModulation.forward`` (a forward hook on each ``fk_pyra`` sees the
    block's tokens and returns PYRA's merge), instead of unpacking the module's fields."""
    model = fk_patch.timm(tiny_vit(), method="pyra", r=[2, 2])
    seen = []
    for blk in model.blocks:
        blk.fk_pyra.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[1], out[0].shape[1])))
    with torch.no_grad():
        model(images(2))
    n = (IMG // PATCH) ** 2 + 1
    assert seen == [(n, n - 2), (n - 2, n - 4)]


def test_old_module_paths_still_resolve():
    """Pickles made before the split name ``fpet_kernels.pet.modules.<class>``: the names still resolve."""
    import pickle

    from fpet_kernels.pet import modules as old
    for name in ("LoRAQKV", "AdaptFormerAdapter", "RefinementAdapter", "PyraModulation", "BinaryLinear"):
        assert getattr(old, name) is getattr(pet, name)
    blob = pickle.dumps(pet.RefinementAdapter(8, 4), protocol=2).replace(b"fpet_kernels.patch.modules", b"fpet_kernels.pet.modules")
    assert b"fpet_kernels.pet.modules" in blob
    assert isinstance(pickle.loads(blob), pet.RefinementAdapter)
