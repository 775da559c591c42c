"""The timm model layer (fpet_kernels.patch): patched tiny ViTs against the same model run through
the project's reference ops, against an independent naive ToMe forward, prefix tokens, remove(),
training through the merges, torch.compile / torch.export."""
import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk

import spec_oracle as oracle

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

METHODS = ["tome", "fpet", "pyra"]


def tiny_vit(seed=0, distilled=False, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    cfg.update(kw)
    if distilled:
        from timm.models.deit import VisionTransformerDistilled
        model = VisionTransformerDistilled(**cfg)
    else:
        model = VisionTransformer(**cfg)
    for p in model.parameters():  # random but non-trivial (zero-init heads would hide errors)
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


VARIANTS = {
    "cls": dict(),
    "layerscale+qknorm": dict(init_values=0.1, qk_norm=True),
    "registers": dict(reg_tokens=2),
    "no-cls": dict(class_token=False, global_pool="avg"),
    "distilled": dict(distilled=True),
}


def images(bsz=2, seed=1):
    return torch.randn(bsz, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patch(model, method, backend, trace_source=True):
    kw = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))[method]
    fk.patch.timm(model, method, trace_source=trace_source, backend=backend, **kw)
    if method == "pyra":  # PYRA starts as plain ToMe (b = 0): make the modulation matter
        for blk in model.blocks:
            if getattr(blk, "fk_pyra", None) is not None:
                torch.nn.init.normal_(blk.fk_pyra.b, std=0.5)
    return model


def forward(model, x):
    with torch.no_grad():
        out = model(x)
    st = fk.patch.merge_state(model, x)
    torch.testing.assert_close(model.forward_head(st["features"]), out, atol=0, rtol=0)  # the same forward
    return out, st["size"], st["token_map"]


# ----------------------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_patched_model_matches_reference_ops(kernel_backend, method, variant):
    x = images()
    ref = patch(tiny_vit(**VARIANTS[variant]), method, "reference")
    got = patch(tiny_vit(**VARIANTS[variant]), method, kernel_backend)
    got.load_state_dict(ref.state_dict())  # the same learned merge parameters (PYRA, FPET refinement)
    out_r, size_r, map_r = forward(ref, x)
    out_k, size_k, map_k = forward(got, x)
    assert torch.equal(map_k, map_r)
    torch.testing.assert_close(size_k, size_r, atol=0, rtol=0)
    torch.testing.assert_close(out_k, out_r, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- independent ToMe forward
def naive_tome_logits(model, x, r):
    """ToMe's patched forward written naively: manual attention with + log(size), the spec oracle's
    matching, sizes merged as spec 1.9. Independent of fpet_kernels' ops and patch code."""
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        size = torch.ones(t.shape[0], t.shape[1], 1)
        for blk in model.blocks:
            a = blk.attn
            h = blk.norm1(t)
            bsz, n, c = h.shape
            qkv = a.qkv(h).reshape(bsz, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = a.q_norm(q), a.k_norm(k)
            logits = (q * a.scale) @ k.transpose(-1, -2) + size.log()[:, None, None, :, 0]
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, c)
            t = t + blk.ls1(a.proj(o))
            metric = k.mean(1)
            rows, sizes = [], []
            for b in range(bsz):
                src, dst, unm, _ = oracle.tome_match(metric[b].tolist(), r, True, False)

                def merge(rows_, mode, src=src, dst=dst, unm=unm):
                    return oracle.tome_merge_rows(rows_, src, dst, unm, mode)
                xr, sr = oracle.merge_wavg_rows(merge, t[b].tolist(), size[b].tolist())
                rows.append(xr)
                sizes.append(sr)
            t, size = torch.tensor(rows), torch.tensor(sizes)
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        return model.forward_head(model.norm(t))


def test_tome_patch_equals_naive_tome_forward():
    model = tiny_vit(init_values=0.1)
    x = images()
    expected = naive_tome_logits(model, x, 3)
    fk.patch.timm(model, "tome", r=3)
    torch.testing.assert_close(forward(model, x)[0], expected, atol=1e-5, rtol=1e-5)


def test_proportional_sdpa_is_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64) for _ in range(3))
    size = torch.randint(1, 9, (2, 11, 1), generator=g).double()
    scale = 16 ** -0.5
    expected = ((q @ k.transpose(-1, -2)) * scale + size.log()[:, None, None, :, 0]).softmax(-1) @ v
    torch.testing.assert_close(fk.patch.proportional_sdpa(q, k, v, size, scale), expected)


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_prefix_tokens_survive_every_merge(method, variant):
    model = patch(tiny_vit(**VARIANTS[variant]), method, None)
    p = model.num_prefix_tokens
    _, size, tmap = forward(model, images())
    n0 = tmap.shape[1]
    assert n0 == p + 16
    assert torch.equal(tmap[:, :p], torch.arange(p).expand(2, p)), "a prefix token was merged or moved"
    assert torch.equal(size[:, :p], torch.ones(2, p, 1)), "a token was merged into a prefix token"
    assert not (tmap[:, p:, None] == torch.arange(p)).any(), "a patch token was merged into a prefix token"
    n_out = size.shape[1]
    assert n_out == {"tome": n0 - 9, "pyra": n0 - 7, "fpet": p + 8}[method]
    assert torch.equal(size.sum(1).squeeze(-1), (tmap >= 0).sum(1).float())


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_bit_identical_outputs(method):
    model = tiny_vit()
    x = images()
    before = forward_plain(model, x)
    patch(model, method, None)
    assert not torch.allclose(forward_plain(model, x), before)
    fk.patch.remove(model)
    assert type(model) is VisionTransformer and all(type(b).__name__ == "Block" for b in model.blocks)
    assert torch.equal(forward_plain(model, x), before)
    assert not any(n.startswith(("fk_",)) or ".fk_" in n for n, _ in model.named_parameters())


def forward_plain(model, x):
    with torch.no_grad():
        return model(x)


def test_r_zero_uses_timm_attention_unchanged_and_r_is_settable():
    model = tiny_vit()
    x = images()
    before = forward_plain(model, x)
    fk.patch.timm(model, "tome", r=0)
    assert torch.equal(forward_plain(model, x), before)
    assert fk.patch.merge_state(model, x)["size"] is None
    model.r = 3
    assert fk.patch.merge_state(model, x)["size"].shape[1] == 17 - 9
    model.r = [3, 0, 1]
    assert fk.patch.merge_state(model, x)["size"].shape[1] == 17 - 4
    with pytest.raises(ValueError, match="r"):
        model.r = -2
    assert model.r == [3, 0, 1]


def test_prop_attn_off_matches_plain_sdpa_merging():
    model = tiny_vit()
    fk.patch.timm(model, "tome", r=3, prop_attn=False)
    out = forward_plain(model, images())
    fk.patch.remove(model)  # a patched model is not patched again (it would reset merge modules)
    fk.patch.timm(model, "tome", r=3, prop_attn=True)
    assert not torch.allclose(out, forward_plain(model, images()))


def test_unmerge_to_patch_grid_with_token_map():
    """trace_source: the compact map scatters merged features back to the 4 x 4 grid (dense tasks)."""
    model = patch(tiny_vit(), "tome", None)
    x = images()
    with torch.no_grad():
        feats, st = model.forward_features_with_state(x)
    tmap = st.token_map
    assert feats.shape == (2, 17 - 9, 48)
    full = fk.unmerge(feats, tmap)
    assert full.shape == (2, 17, 48)
    torch.testing.assert_close(full[0, 5], feats[0, tmap[0, 5]])


# ----------------------------------------------------------------------------- training
def test_fpet_refinement_adapter_trains_through_the_straight_through_estimator():
    model = tiny_vit()
    fk.patch.timm(model, "fpet", merge_layer=1)
    model.train()
    refine = model.blocks[1].fk_refine
    before = {n: p.detach().clone() for n, p in refine.named_parameters()}
    opt = torch.optim.SGD(refine.parameters(), lr=1.0)
    torch.manual_seed(0)
    loss = F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in refine.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the refinement adapter"
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in refine.named_parameters())


def test_pyra_parameters_get_gradients():
    model = patch(tiny_vit(), "pyra", None)
    model.train()
    loss = model(images()).square().mean()
    loss.backward()
    mod = model.blocks[0].fk_pyra
    for name, t in (("a", mod.a), ("b", mod.b), ("ln_weight", mod.norm.weight), ("ln_bias", mod.norm.bias)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- compile / export
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_fullgraph(method):
    model = patch(tiny_vit(), method, None, trace_source=False)
    x = images()
    expected = forward_plain(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_export():
    model = patch(tiny_vit(), "tome", None, trace_source=False)
    x = images()
    expected = forward_plain(model, x)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        fk.patch.timm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method"):
        fk.patch.timm(tiny_vit(), "nope")
    with pytest.raises(ValueError, match="merge_layer"):
        fk.patch.timm(tiny_vit(), "fpet", merge_layer=3)
    with pytest.raises(ValueError, match="r"):
        fk.patch.timm(tiny_vit(), "tome", r=-1)
    with pytest.raises(ValueError, match="not patched"):
        fk.patch.merge_state(tiny_vit(), images())
    with pytest.raises(TypeError, match="needs the input x"):
        fk.patch.merge_state(fk.patch.timm(tiny_vit(), "tome", r=2))
    with pytest.raises(ValueError, match="grid"):
        fk.patch.timm(tiny_vit(), "fpet", merge_layer=1, grid=(4, 0))
    with pytest.raises(ValueError, match="grid"):
        fk.patch.timm(tiny_vit(), "tome", r=2, grid=(4, 4))
