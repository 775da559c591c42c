"""fk.patch.timm keeps what the user has (issue 19): the merge modules follow the model's train /
eval mode (an eval-mode model is deterministic after patching), patching a patched model is refused
instead of resetting trained merge modules, an argument the method does not use raises, an r above
what a block can merge is said once, and a patched model runs on meta tensors."""
import warnings

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.patch.core import MergeConfig, capped_layers, warn_capped

from helpers import tiny_timm_vit

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

METHODS = ["tome", "fpet", "pyra"]
KW = dict(tome=dict(r=3), fpet=dict(merge_layer=1), pyra=dict(r=[3, 2, 2]))
N0 = 17  # tiny_timm_vit: 16 patches + the class token
# which method uses which argument (docs/model_layer.md); prop_attn, trace_source, backend: all
USES = dict(tome={"r"}, fpet={"merge_layer", "refine", "binary_refine", "grid"}, pyra={"r"})
VALUES = dict(r=3, merge_layer=1, refine=False, binary_refine=False, grid=(4, 4))


def images(bsz=2, seed=1):
    return torch.randn(bsz, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def merge_modules(model):
    return [m for blk in model.blocks for m in (getattr(blk, "fk_refine", None), getattr(blk, "fk_pyra", None))
            if m is not None]


def make_matter(model):
    """Fresh merge modules are the identity (FPET's up = 0, PYRA's b = 0): give them trained-looking values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in merge_modules(model):
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------- mode
@pytest.mark.parametrize("method", ["fpet", "pyra"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_merge_modules_take_the_model_mode(method, mode):
    model = tiny_timm_vit().train(mode == "train")
    fk.patch.timm(model, method, **KW[method])
    mods = merge_modules(model)
    assert mods
    assert all(m.training == (mode == "train") for mod in mods for m in mod.modules())
    model.train(mode != "train")  # and they follow the model afterwards, as any submodule
    assert all(m.training == (mode != "train") for mod in mods for m in mod.modules())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_peft_wrapped_merge_modules_take_the_model_mode(mode):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_timm_vit().train(mode == "train"),
                                peft.LoraConfig(target_modules=["qkv"], r=4, lora_alpha=8))
    fk.patch.timm(model, "fpet", merge_layer=1)
    wrapper = model.get_base_model().blocks[1].fk_refine  # PEFT's ModulesToSaveWrapper and its copies
    assert type(wrapper).__name__ == "ModulesToSaveWrapper"
    assert all(m.training == (mode == "train") for m in wrapper.modules())


def test_eval_model_is_deterministic_after_patching():
    """The issue's case: fk.patch.timm(model.eval(), "fpet") left the refinement adapter (dropout 0.1)
    in training mode, so two eval forwards differed and merged different tokens."""
    model = fk.patch.timm(tiny_timm_vit(head_std=0.5).eval(), "fpet", merge_layer=1)
    make_matter(model)
    x = images(4)
    st1, st2 = fk.patch.merge_state(model, x), fk.patch.merge_state(model, x)
    assert torch.equal(st1["token_map"], st2["token_map"])
    assert torch.equal(st1["features"], st2["features"])
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # the check can fail: the same model in training mode (the adapter's dropout on) is not deterministic
    model.train()
    torch.manual_seed(0)
    runs = [fk.patch.merge_state(model, x)["features"] for _ in range(4)]
    assert any(not torch.equal(runs[0], r) for r in runs[1:])


# ----------------------------------------------------------------------------- re-patching
@pytest.mark.parametrize("first", METHODS)
@pytest.mark.parametrize("second", METHODS)
def test_repatching_refuses_and_keeps_trained_merge_modules(first, second):
    model = fk.patch.timm(tiny_timm_vit().eval(), first, **KW[first])
    make_matter(model)
    mods = merge_modules(model)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
    x = images()
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match=r"already patched.*fk\.patch\.remove\(model\) first"):
        fk.patch.timm(model, second, **KW[second])
    assert model.fk_config.method == first
    assert merge_modules(model) == mods  # the same module objects, not fresh ones
    for m, sd in zip(mods, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    # the explicit way: remove (dropping the merge modules), then patch
    fk.patch.remove(model)
    fk.patch.timm(model, second, **KW[second])
    assert model.fk_config.method == second


def test_repatch_error_names_the_trained_modules():
    model = fk.patch.timm(tiny_timm_vit(), "pyra", r=[3, 0, 2])
    with pytest.raises(ValueError, match=r"blocks\.0\.fk_pyra, blocks\.2\.fk_pyra"):
        fk.patch.timm(model, "pyra", r=[3, 0, 2])
    model = fk.patch.timm(tiny_timm_vit(), "tome", r=2)
    with pytest.raises(ValueError, match=r"set model\.r"):
        fk.patch.timm(model, "tome", r=3)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arg", list(VALUES))
def test_arguments_the_method_does_not_use_raise(method, arg):
    kw = {**KW[method], arg: VALUES[arg]}
    if arg in USES[method]:
        model = fk.patch.timm(tiny_timm_vit(), method, **kw)
        assert model.fk_config.method == method
        if arg == "r":
            assert model.r == (3 if method == "tome" else [3, 3, 3])
        if arg == "refine":
            assert not merge_modules(model)
        if arg == "binary_refine":
            assert not model.blocks[1].fk_refine.binary
        if arg == "grid":
            assert model.fk_config.grid == (4, 4)
    else:
        model = tiny_timm_vit()
        with pytest.raises(ValueError, match=rf"{arg}=.* does not apply to method='{method}'"):
            fk.patch.timm(model, method, **kw)
        assert type(model) is VisionTransformer  # nothing was patched


def test_none_means_not_given_and_defaults_are_kept():
    with pytest.warns(UserWarning, match="r=16 is above what block 0 can merge"):  # 17 tokens: at most 8
        model = fk.patch.timm(tiny_timm_vit(), "tome", merge_layer=None, refine=None, binary_refine=None, grid=None)
    assert model.r == 16
    model = fk.patch.timm(tiny_timm_vit(), "fpet", r=None, merge_layer=2)
    assert model.fk_config.merge_layer == 2 and model.blocks[2].fk_refine.binary
    with pytest.raises(ValueError, match=r"merge_layer must be an int in \[0, 3\), got 6"):
        fk.patch.timm(tiny_timm_vit(), "fpet")  # the default merge_layer=6 needs 7 blocks


def test_binary_refine_without_refine_raises():
    with pytest.raises(ValueError, match="binary_refine=True does not apply with refine=False"):
        fk.patch.timm(tiny_timm_vit(), "fpet", merge_layer=1, refine=False, binary_refine=True)
    with pytest.raises(TypeError, match="refine must be a bool"):
        fk.patch.timm(tiny_timm_vit(), "fpet", merge_layer=1, refine=1)


# ----------------------------------------------------------------------------- the cap on r
def capped_warnings(record):
    return [w for w in record if "above what" in str(w.message)]


@pytest.mark.parametrize("method", ["tome", "pyra"])
def test_r_above_the_cap_is_said_once(method):
    # 17 tokens: block 0 merges at most (17 - 1) // 2 = 8; r = 10 everywhere leaves 17 -> 9 -> 5 -> 3
    r = 10 if method == "tome" else [10, 10, 10]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = fk.patch.timm(tiny_timm_vit().eval(), method, r=r)
        for _ in range(3):
            feats = fk.patch.merge_state(model, images())["features"]
    said = capped_warnings(record)
    assert len(said) == 1, [str(w.message) for w in record]
    msg = str(said[0].message)
    assert f"r={r!r}" in msg and "block 0" in msg and "at most r = 8" in msg
    assert f"the {N0} input tokens end as 3" in msg
    assert feats.shape[1] == 3  # what the message says is what the model does
    assert said[0].filename == __file__  # points at the patch call


@pytest.mark.parametrize("r", [2, [8, 4, 2], (3, 0.5)])
def test_r_within_the_cap_says_nothing(r):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = fk.patch.timm(tiny_timm_vit(), "tome", r=r)
        model.r = [8, 4, 2]  # exactly at the cap of every block
    assert not capped_warnings(record)


def test_setting_model_r_above_the_cap_is_said():
    model = fk.patch.timm(tiny_timm_vit(), "tome", r=2)
    with pytest.warns(UserWarning, match=r"r=\[2, 9, 2\] \(r = 9 at block 1\).*its 15 tokens allow at most r = 7"):
        model.r = [2, 9, 2]  # block 1 sees 17 - 2 = 15 tokens: at most (15 - 1) // 2 = 7
    assert model.r == [2, 9, 2]  # set all the same (the ops cap it, as ToMe does)


def test_cap_walk_on_vit_b():
    """The issue's numbers: ViT-B/16 (197 tokens, class token), r = 100 in all 12 blocks ends at 2
    tokens. ToMe's own r = 16 caps only the last block (21 tokens there, 10 merge): not said."""
    cfg = MergeConfig("tome")
    capped, n_end = capped_layers([100] * 12, 197, cfg)
    assert n_end == 2 and capped[0] == (0, 100, 98, 197) and len(capped) == 12
    assert capped_layers([16] * 12, 197, cfg) == ([(11, 16, 10, 21)], 11)
    assert capped_layers([15] * 12, 197, cfg) == ([], 197 - 15 * 12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_capped([16] * 12, 197, cfg, 16, "block")
        assert not record
        warn_capped([100] * 12, 197, cfg, 100, "block")
        warn_capped([17] * 12, 197, cfg, 17, "block")  # block 10: 27 tokens, at most 13
    assert len(record) == 2
    assert "r=100 is above what block 0 can merge: its 197 tokens allow at most r = 98" in str(record[0].message)
    assert "end as 2" in str(record[0].message)
    assert "r=17 is above what block 10 can merge: its 27 tokens allow at most r = 13" in str(record[1].message)


# ----------------------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("method", METHODS)
def test_patched_model_runs_on_meta_tensors(method):
    real = fk.patch.timm(tiny_timm_vit().eval(), method, **KW[method])
    with torch.device("meta"):
        meta = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    fk.patch.timm(meta.eval(), method, **KW[method])
    assert all(p.is_meta for p in meta.parameters())  # the merge modules too
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no compiled kernel for meta tensors: the reference" is expected
        out = meta(x.to("meta"))
        feats, st = meta.forward_features_with_state(x.to("meta"))
        inter = meta.forward_intermediates(x.to("meta"), indices=[0, 2], intermediates_only=True)
    ref_feats, ref_st = real.forward_features_with_state(x)
    assert out.is_meta and out.shape == (2, 5)
    assert feats.is_meta and feats.shape == ref_feats.shape
    assert st.token_map.shape == ref_st.token_map.shape == (2, N0)
    assert st.size.shape == ref_st.size.shape
    assert [t.shape for t in inter] == [(2, 48, 4, 4)] * 2


def test_meta_training_step_reaches_the_merge_modules():
    with torch.device("meta"):
        meta = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    fk.patch.timm(meta, "fpet", merge_layer=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta(torch.empty(2, 3, 32, 32, device="meta")).sum().backward()
    grad = meta.blocks[1].fk_refine.down.weight.grad
    assert grad is not None and grad.is_meta and grad.shape == meta.blocks[1].fk_refine.down.weight.shape
