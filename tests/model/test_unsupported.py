"""fk.patch.timm on models it does not support (fpet_kernels/integrations/support.py): a TypeError that
names the reason and what is supported, raised before the model is touched; never an AttributeError."""
import pytest
import torch

import fpet_kernels as fk

timm = pytest.importorskip("timm")
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, VisionTransformer  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _rope_mod():
    class WithRope(VisionTransformer):
        def __init__(self):
            super().__init__(**TINY)
            from timm.layers import RotaryEmbeddingCat
            self.rope = RotaryEmbeddingCat(16, in_pixels=False, feat_shape=[4, 4])
    return WithRope()


MODELS = {
    "eva": (lambda: Eva(**TINY), "Eva"),
    "eva02-rope": (lambda: Eva(**TINY, use_rot_pos_emb=True, swiglu_mlp=True), "Eva"),
    "vit-with-rope": (_rope_mod, "RoPE"),
    "parallel-things": (lambda: VisionTransformer(**TINY, block_fn=ParallelThingsBlock), "ParallelThingsBlock"),
    "parallel-scaling": (lambda: VisionTransformer(**TINY, block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
    "resnet": (lambda: timm.create_model("resnet10t", pretrained=False, num_classes=5), "not a timm VisionTransformer"),
    "linear": (lambda: torch.nn.Linear(4, 4), "not a timm VisionTransformer"),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["tome", "fpet", "pyra"])
def test_unsupported_model_raises_type_error_naming_what_is_supported(name, method):
    build, reason = MODELS[name]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    with pytest.raises(TypeError) as info:
        fk.patch.timm(model, method)
    msg = str(info.value)
    assert reason in msg
    assert "supported: timm VisionTransformer" in msg and "fk.patch.hf" in msg
    assert type(model) is cls and set(model.state_dict()) == set(before)  # untouched
    assert not any(n.startswith("fk_") or ".fk_" in n for n, _ in model.named_modules())


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fk.patch.timm("vit_base_patch16_224")


def test_eva_message_says_whether_it_has_rope():
    with pytest.raises(TypeError, match="EvaAttention with rotary position embeddings"):
        fk.patch.timm(Eva(**TINY, use_rot_pos_emb=True))
    with pytest.raises(TypeError, match=r"EvaAttention, not timm's Block") as info:
        fk.patch.timm(Eva(**TINY))  # EVA-01 style: absolute position embeddings, no RoPE
    assert "rotary" not in str(info.value)


def test_compiled_model_says_patch_first():
    model = VisionTransformer(**TINY)
    with pytest.raises(TypeError, match=r"torch.compile wrapper: patch the model first") as info:
        fk.patch.timm(torch.compile(model))
    assert "supported: timm VisionTransformer" in str(info.value)
    assert not any(n.startswith("fk_") or ".fk_" in n for n, _ in model.named_modules())


def test_hf_model_points_to_patch_hf():
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                                         intermediate_size=96, image_size=32, patch_size=8))
    with pytest.raises(TypeError, match=r"use fk.patch.hf"):
        fk.patch.timm(model)


def test_supported_variants_pass_the_check():
    from fpet_kernels.integrations.support import check_timm
    from timm.models.deit import VisionTransformerDistilled
    for model in (VisionTransformer(**TINY), VisionTransformer(**TINY, reg_tokens=2, init_values=0.1, qk_norm=True),
                  VisionTransformerDistilled(**TINY)):
        check_timm(model)
        check_timm(fk.patch.timm(model, "tome", r=2))  # a patched model still passes (re-patching)
