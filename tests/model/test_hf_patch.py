"""fk.patch.hf (fpet_kernels/patch/hf_vit.py): transformers ViT / DeiT patched for token merging equal
the timm patch on the same weights (r = 0: identical to the unpatched model), remove() restores,
the merge modules train, no tensor state is left on modules."""
import copy
import pickle

import pytest
import torch

import fpet_kernels as fk

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTModel, ViTConfig,  # noqa: E402
                          ViTForImageClassification, ViTModel)

from fpet_kernels.patch import hf_vit as patch_hf  # noqa: E402

METHODS = ["tome", "fpet", "pyra"]
DIM, DEPTH, HEADS, CLASSES, IMG, PATCH = 48, 3, 3, 5, 32, 8
KW = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))


def tiny_timm(distilled=False, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    for p in model.parameters():  # random but non-trivial (zero-init heads and biases would hide errors)
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.02)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    if distilled:
        torch.nn.init.normal_(model.head_dist.weight, std=0.5)
    return model.to(dtype).eval()


def hf_config(distilled=False):
    cfg = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
               image_size=IMG, patch_size=PATCH, num_labels=CLASSES, layer_norm_eps=1e-6, hidden_act="gelu",
               qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return DeiTConfig(**cfg) if distilled else ViTConfig(**cfg)


def timm_to_hf(sd, prefix, distilled=False):
    """timm ViT state dict -> transformers ViT / DeiT keys (``prefix``: "vit." / "deit." or "")."""
    out = {f"{prefix}embeddings.cls_token": sd["cls_token"],
           f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
           f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           f"{prefix}layernorm.weight": sd["norm.weight"], f"{prefix}layernorm.bias": sd["norm.bias"]}
    if distilled:
        out[f"{prefix}embeddings.distillation_token"] = sd["dist_token"]
    for i in range(DEPTH):
        t, h = f"blocks.{i}.", f"{prefix}layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = sd[f"{t}attn.qkv.{name}"].chunk(3, dim=0)
            out.update({f"{h}attention.q_proj.{name}": q, f"{h}attention.k_proj.{name}": k,
                        f"{h}attention.v_proj.{name}": v,
                        f"{h}attention.o_proj.{name}": sd[f"{t}attn.proj.{name}"],
                        f"{h}layernorm_before.{name}": sd[f"{t}norm1.{name}"],
                        f"{h}layernorm_after.{name}": sd[f"{t}norm2.{name}"],
                        f"{h}mlp.fc1.{name}": sd[f"{t}mlp.fc1.{name}"], f"{h}mlp.fc2.{name}": sd[f"{t}mlp.fc2.{name}"]})
        for name in ("fk_refine", "fk_pyra"):  # the merge modules: same names on blocks and layers
            for key, val in sd.items():
                if key.startswith(f"{t}{name}."):
                    out[h + key[len(t):]] = val
    return out


def hf_twin(timm_model, kind, dtype=torch.float64):
    """The transformers model of ``kind`` ("vit", "vit-base", "deit-teacher", "deit-base") holding the weights of
    ``timm_model`` (patched or not: the merge modules are copied when both have them)."""
    distilled = kind.startswith("deit")
    cfg = hf_config(distilled)
    cls = {"vit": ViTForImageClassification, "vit-base": ViTModel, "deit-teacher": DeiTForImageClassificationWithTeacher,
           "deit-base": DeiTModel}[kind]
    model = (cls(cfg, add_pooling_layer=False) if kind.endswith("base") else cls(cfg)).to(dtype).eval()
    return model, cfg


def load_twin(hf_model, timm_model, kind):
    sd = timm_model.state_dict()
    prefix = {"vit": "vit.", "deit-teacher": "deit."}.get(kind, "")
    new = timm_to_hf(sd, prefix, kind.startswith("deit"))
    if kind == "vit":
        new.update({"classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]})
    elif kind == "deit-teacher":
        new.update({"cls_classifier.weight": sd["head.weight"], "cls_classifier.bias": sd["head.bias"],
                    "distillation_classifier.weight": sd["head_dist.weight"],
                    "distillation_classifier.bias": sd["head_dist.bias"]})
    missing, unexpected = hf_model.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "pooler" not in k], missing
    return hf_model


def images(bsz=2, dtype=torch.float64):
    return torch.randn(bsz, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)).to(dtype)


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def patch_timm(model, method, **kw):
    fk.patch.timm(model, method, **{**KW[method], **kw})
    if method == "pyra":  # PYRA starts as plain ToMe (b = 0): make the modulation matter
        for blk in model.blocks:
            if getattr(blk, "fk_pyra", None) is not None:
                torch.nn.init.normal_(blk.fk_pyra.b, std=0.5)
    if method == "fpet":  # the refinement starts as the identity (up = 0): make it matter
        for p in model.blocks[1].fk_refine.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


# ----------------------------------------------------------------------------- unpatched equality
@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_weight_mapping_gives_the_same_model(kind):
    """The twin is the same function before any patch (the test's key mapping is right)."""
    t = tiny_timm(distilled=kind.startswith("deit"))
    h = load_twin(hf_twin(t, kind)[0], t, kind)
    torch.testing.assert_close(logits(h, images()), logits(t, images()), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
@pytest.mark.parametrize("method", ["tome", "pyra"])
def test_r0_is_identical_to_unpatched(kind, method):
    t = tiny_timm(distilled=kind.startswith("deit"), dtype=torch.float32)
    h = load_twin(hf_twin(t, kind, torch.float32)[0], t, kind)
    x = images(dtype=torch.float32)
    expected = logits(h, x)
    fk.patch.hf(h, method, r=0)
    assert torch.equal(logits(h, x), expected)


# ----------------------------------------------------------------------------- equal to the timm patch
@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
@pytest.mark.parametrize("method", METHODS)
def test_equals_timm_patch(kind, method):
    """Same weights, same merge modules: the HF patch computes the timm patch's logits (float64,
    reference ops: the matchings cannot flip on rounding)."""
    t = patch_timm(tiny_timm(distilled=kind.startswith("deit")), method, backend="reference")
    h = hf_twin(t, kind)[0]
    fk.patch.hf(h, method, backend="reference", **KW[method])
    load_twin(h, t, kind)
    x = images()
    ref = logits(t, x)
    got = logits(h, x)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    # and merging did happen: unpatched logits differ
    fk.patch.remove(t)
    assert (logits(t, x) - ref).abs().max() > 1e-6  # far above the 1e-10 of the equality


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
@pytest.mark.parametrize("method, kw", [("tome", dict(threshold=0.995)), ("pyra", dict(r=4, threshold=[0.995, None, 0.99]))],
                         ids=["tome", "pyra"])
def test_threshold_equals_timm_patch(kind, method, kw):
    """Threshold merging (rows of different lengths, issue 21): the HF patch computes the timm patch's
    logits, features (padding rows 0), sizes and tokens kept per layer (the timm patch is held to
    per-image equivalence in test_patch_threshold.py)."""
    t = patch_timm(tiny_timm(distilled=kind.startswith("deit")), method, backend="reference", **kw)
    h = hf_twin(t, kind)[0]
    fk.patch.hf(h, method, backend="reference", trace_source=True, **{**KW[method], **kw})
    load_twin(h, t, kind)
    x = images(bsz=4)
    torch.testing.assert_close(logits(h, x), logits(t, x), atol=1e-10, rtol=1e-10)
    st = fk.patch.merge_state(t, x)
    assert len(set(st["kept"][-1].tolist())) > 1  # the rows differ in length
    with torch.no_grad():
        out = getattr(h, "vit", None) or h.deit
        out = out(x)
    torch.testing.assert_close(out.last_hidden_state, st["features"], atol=1e-10, rtol=1e-10)
    assert torch.equal(out.size, st["size"]) and torch.equal(out.token_map, st["token_map"])
    assert [k.tolist() for k in out.kept] == [k.tolist() for k in st["kept"]]


@pytest.mark.parametrize("method", METHODS)
def test_equals_timm_patch_float32_kernels(method):
    """float32 with the automatic backend (C++ kernels when built): equal token maps and sizes, close logits."""
    t = patch_timm(tiny_timm(dtype=torch.float32), method, trace_source=True)
    h = hf_twin(t, "vit-base", torch.float32)[0]
    fk.patch.hf(h, method, trace_source=True, **KW[method])
    load_twin(h, t, "vit-base")
    x = images(dtype=torch.float32)
    st = fk.patch.merge_state(t, x)
    t_out = st["features"]
    with torch.no_grad():
        out = h(x)
    assert torch.equal(out.token_map, st["token_map"])
    torch.testing.assert_close(out.size, st["size"], atol=0, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, t_out, atol=1e-5, rtol=1e-5)


def test_base_model_token_map_unmerges():
    h = hf_twin(None, "vit-base")[0]
    fk.patch.hf(h, "tome", r=3, trace_source=True)
    out = h(images())
    n0 = 1 + (IMG // PATCH) ** 2
    assert out.token_map.shape == (2, n0) and out.last_hidden_state.shape[1] == n0 - 9
    assert out.size.sum(1).flatten().tolist() == [n0, n0]
    full = fk.unmerge(out.last_hidden_state, out.token_map)
    assert full.shape == (2, n0, DIM)


# ----------------------------------------------------------------------------- remove, state, training
@pytest.mark.parametrize("kind", ["vit", "vit-base", "deit-teacher", "deit-base"])
@pytest.mark.parametrize("method", METHODS)
def test_remove_restores(kind, method):
    h = hf_twin(None, kind)[0]
    x = images()
    before = h(x)
    before = before.logits if hasattr(before, "logits") else before.last_hidden_state
    names = set(h.state_dict())
    fk.patch.hf(h, method, **KW[method])
    assert patch_hf.is_patched_hf(h)
    fk.patch.remove(h)
    assert not patch_hf.is_patched_hf(h)
    assert set(h.state_dict()) == names
    base = h if kind.endswith("base") else getattr(h, kind.split("-")[0])
    assert type(base) in (ViTModel, DeiTModel)
    assert all(type(lyr).__name__ in ("ViTLayer", "DeiTLayer") for lyr in base.layers)
    after = h(x)
    after = after.logits if hasattr(after, "logits") else after.last_hidden_state
    assert torch.equal(after, before)


@pytest.mark.parametrize("method", METHODS)
def test_no_tensor_state_between_forwards(method):
    h = hf_twin(None, "vit")[0]
    fk.patch.hf(h, method, trace_source=True, **KW[method])
    before = {id(m): dict(m.__dict__) for m in h.modules()}
    h(images())
    for m in h.modules():
        added = {k for k in m.__dict__ if k not in before[id(m)]}
        assert not added, f"{type(m).__name__} gained {added}"
        assert not any(isinstance(v, torch.Tensor) for k, v in m.__dict__.items() if not k.startswith("_")), m
    # the patched model deep-copies and pickles (real classes at module level)
    twin = copy.deepcopy(h)
    torch.testing.assert_close(logits(twin, images()), logits(h, images()))
    loaded = pickle.loads(pickle.dumps(h))
    assert type(loaded.vit) is patch_hf.FKViTModel


@pytest.mark.parametrize("method", ["fpet", "pyra"])
def test_merge_modules_train(method):
    h = hf_twin(None, "vit", torch.float32)[0]
    fk.patch.hf(h, method, **KW[method])
    mods = [m for lyr in h.vit.layers for m in (getattr(lyr, "fk_refine", None), getattr(lyr, "fk_pyra", None))
            if m is not None]
    assert mods
    h.train()
    loss = h(images(dtype=torch.float32)).logits.square().sum()
    loss.backward()
    grads = [p.grad for m in mods for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def merge_modules(base):
    return [m for lyr in base.layers for m in (getattr(lyr, "fk_refine", None), getattr(lyr, "fk_pyra", None))
            if m is not None]


def make_matter(base):
    """Fresh merge modules are the identity (FPET's up = 0, PYRA's b = 0): give them trained-looking values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in merge_modules(base):
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("method", ["fpet", "pyra"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_new_merge_modules_follow_the_model_mode(method, mode):
    h = hf_twin(None, "vit")[0].train(mode == "train")
    fk.patch.hf(h, method, **KW[method])
    mods = merge_modules(h.vit)
    assert mods and all(m.training == (mode == "train") for mod in mods for m in mod.modules())


def test_eval_model_is_deterministic_after_patching():
    h = hf_twin(None, "vit-base")[0]  # eval mode
    fk.patch.hf(h, "fpet", merge_layer=1, trace_source=True)
    make_matter(h)
    x = images(4)
    with torch.no_grad():
        a, b = h(x), h(x)
    assert torch.equal(a.token_map, b.token_map) and torch.equal(a.last_hidden_state, b.last_hidden_state)
    h.train()  # the check can fail: with the adapter's dropout on, forwards differ
    torch.manual_seed(0)
    with torch.no_grad():
        runs = [h(x).last_hidden_state for _ in range(4)]
    assert any(not torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("first", METHODS)
@pytest.mark.parametrize("second", METHODS)
def test_repatching_refuses_and_keeps_trained_merge_modules(first, second):
    h = hf_twin(None, "vit")[0]
    fk.patch.hf(h, first, **KW[first])
    make_matter(h.vit)
    mods = merge_modules(h.vit)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
    expected = logits(h, images())
    with pytest.raises(ValueError, match=r"already patched.*fk\.patch\.remove\(model\) first"):
        fk.patch.hf(h, second, **KW[second])
    assert h.vit.fk_config.method == first and merge_modules(h.vit) == mods
    for m, sd in zip(mods, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert torch.equal(logits(h, images()), expected)
    fk.patch.remove(h)
    fk.patch.hf(h, second, **KW[second])
    assert h.vit.fk_config.method == second


# which method uses which argument (docs/model_layer.md); prop_attn, trace_source, backend: all
USES = dict(tome={"r"}, fpet={"merge_layer", "refine", "binary_refine"}, pyra={"r"})
VALUES = dict(r=3, merge_layer=1, refine=False, binary_refine=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arg", list(VALUES) + ["grid"])
def test_arguments_the_method_does_not_use_raise(method, arg):
    h = hf_twin(None, "vit")[0]
    if arg == "grid":  # the HF patch takes the grid from the embeddings only
        with pytest.raises(TypeError, match="grid"):
            fk.patch.hf(h, method, grid=(4, 4), **KW[method])
    elif arg in USES[method]:
        fk.patch.hf(h, method, **{**KW[method], arg: VALUES[arg]})
        assert h.vit.fk_config.method == method
        if arg == "refine":
            assert not merge_modules(h.vit)
        if arg == "binary_refine":
            assert not h.vit.layers[1].fk_refine.binary
    else:
        with pytest.raises(ValueError, match=rf"{arg}=.* does not apply to method='{method}'"):
            fk.patch.hf(h, method, **{**KW[method], arg: VALUES[arg]})
    if arg not in USES[method]:
        assert not patch_hf.is_patched_hf(h)  # nothing was patched


def test_r_above_the_cap_is_said_once_and_model_r():
    import warnings
    h = hf_twin(None, "vit")[0]
    x = images()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fk.patch.hf(h, "tome", r=10)  # 17 tokens: layer 0 merges at most 8; 17 -> 9 -> 5 -> 3
        for _ in range(2):
            h(x)
    said = [w for w in record if "above what" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    msg = str(said[0].message)
    assert "r=10 is above what layer 0 can merge: its 17 tokens allow at most r = 8" in msg and "end as 3" in msg
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        h.vit.r = [8, 4, 2]  # exactly at the caps
    assert not record and h.vit.r == [8, 4, 2]
    with pytest.warns(UserWarning, match=r"r = 9 at layer 1\).*its 15 tokens allow at most r = 7"):
        h.vit.r = [2, 9, 2]
    with pytest.raises(ValueError, match="r"):
        h.vit.r = -1
    f = hf_twin(None, "vit")[0]
    fk.patch.hf(f, "fpet", merge_layer=1)
    assert f.vit.r is None
    with pytest.raises(ValueError, match="FPET has no r"):
        f.vit.r = 3
    p = hf_twin(None, "vit")[0]
    fk.patch.hf(p, "pyra", r=[3, 2, 2])
    assert p.vit.r == [3, 2, 2]
    with pytest.raises(ValueError, match="PYRA"):
        p.vit.r = 2


@pytest.mark.parametrize("method", METHODS)
def test_patched_model_runs_on_meta_tensors(method):
    import warnings
    real = hf_twin(None, "vit-base", torch.float32)[0]
    fk.patch.hf(real, method, trace_source=True, **KW[method])
    with torch.device("meta"):
        meta = hf_twin(None, "vit-base", torch.float32)[0]
    fk.patch.hf(meta, method, trace_source=True, **KW[method])
    assert all(p.is_meta for p in meta.parameters())
    x = images(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no compiled kernel for meta tensors: the reference" is expected
        out = meta(x.to("meta"))
    with torch.no_grad():
        ref = real(x)
    assert out.last_hidden_state.is_meta and out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert out.token_map.shape == ref.token_map.shape and out.size.shape == ref.size.shape


def test_output_hidden_states_follow_the_merges():
    h = hf_twin(None, "vit-base")[0]
    fk.patch.hf(h, "tome", r=3)
    out = h(images(), output_hidden_states=True)
    n0 = 1 + (IMG // PATCH) ** 2
    assert [s.shape[1] for s in out.hidden_states] == [n0, n0 - 3, n0 - 6, n0 - 9]


def test_refused_inputs_and_models():
    h = hf_twin(None, "vit")[0]
    fk.patch.hf(h, "tome", r=2)
    with pytest.raises(ValueError, match="output_attentions"):
        h(images(), output_attentions=True)
    with pytest.raises(ValueError, match="method"):
        fk.patch.hf(h, "nope")
    with pytest.raises(ValueError, match="merge_layer"):
        fk.patch.hf(h, "fpet", merge_layer=DEPTH)
    with pytest.raises(TypeError, match="ViTModel"):
        fk.patch.hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fk.patch.hf"):
        fk.patch.timm(h)


def test_peft_model_round_trip(tmp_path):
    peft = pytest.importorskip("peft")

    def base():
        torch.manual_seed(0)
        return hf_twin(None, "vit", torch.float32)[0]
    h = base()
    model = peft.get_peft_model(h, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    assert fk.patch.hf(model, "pyra", **KW["pyra"]) is model
    assert "fk_pyra" in model.peft_config["default"].modules_to_save
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(images(dtype=torch.float32)).logits.square().sum().backward()
    opt.step()
    model.eval()
    expected = logits(model, images(dtype=torch.float32))
    model.save_pretrained(tmp_path)
    fresh = fk.patch.hf(base(), "pyra", **KW["pyra"])  # the same base weights, patched the same way
    trained = model.get_base_model().vit.layers[0].fk_pyra.modules_to_save.default
    assert not torch.equal(trained.b, fresh.vit.layers[0].fk_pyra.b)  # fk_pyra trained: it must be saved
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    assert (logits(loaded, images(dtype=torch.float32)) - expected).abs().max().item() == 0
    fk.patch.remove(model)
    assert type(model.get_base_model().vit) is ViTModel
