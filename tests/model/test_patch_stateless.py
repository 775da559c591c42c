"""The stateless model layer (issue 11): the merge state flows through the block calls, so what
people fine-tune with works on a patched timm ViT: gradient checkpointing, torch.export followed by
eager use, forward_intermediates / get_intermediate_layers (unmerged to the patch grid), deepcopy /
ModelEmaV3 / torch.save / pickle after a training step, FPET on any patch grid, model.r errors."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from test_patch import images, patch, tiny_vit  # noqa: E402

METHODS = ["tome", "fpet", "pyra"]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def train_step(model, x, seed=0):
    """One SGD step on a fixed target; returns (logits, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    F.cross_entropy(out, torch.arange(x.shape[0]) % out.shape[-1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return out.detach(), grads


def tensor_attributes(model):
    """Every tensor a module holds outside its parameters and buffers (the issue's 'state on modules')."""
    found = []
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers"):
                continue
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(t, torch.Tensor) for t in vals):
                found.append(f"{name}.{k}")
    return found


def plain_attributes(model):
    return [(name, sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_")))
            for name, m in model.named_modules()]


# ----------------------------------------------------------------------------- nothing on the modules
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_backward_leave_no_state_on_modules(method):
    model = patch(tiny_vit(), method, None).train()
    before = plain_attributes(model)
    train_step(model, images())
    model.eval()
    assert tensor_attributes(model) == []
    model.train()
    assert plain_attributes(model) == before
    assert type(model).__module__ == "fpet_kernels.patch.timm_vit"
    assert all(type(b).__module__ == "fpet_kernels.patch.timm_vit" for b in model.blocks)


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("method", METHODS)
def test_grad_checkpointing_same_logits_and_grads(method):
    x = images(3)
    models = [patch(tiny_vit(init_values=0.1), method, None) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].set_grad_checkpointing(True)
    calls = []
    for blk in models[1].blocks:  # recomputation in backward calls every block a second time
        blk.register_forward_pre_hook(lambda *a: calls.append(1))
    out0, g0 = train_step(models[0], x)
    out1, g1 = train_step(models[1], x)
    assert len(calls) == 2 * len(models[1].blocks), "the blocks were not checkpointed"
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys()
    merge_params = [n for n in g0 if ".fk_" in n]
    assert method == "tome" or any(g0[n].abs().sum() > 0 for n in merge_params), "no gradient reached the merge"
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    # and again, after the step (nothing left over from the first forward)
    out0, g0 = train_step(models[0], x, seed=1)
    out1, g1 = train_step(models[1], x, seed=1)
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)


# ----------------------------------------------------------------------------- export, then eager
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_export_leaves_eager_model_patched(method):
    model = patch(tiny_vit(), method, None)
    x = images()
    with torch.no_grad():
        unpatched = fk.patch.remove(copy.deepcopy(model))(x)
        expected = model(x)  # a forward before the export (it used to crash the next forward)
    assert not torch.allclose(expected, unpatched)
    for _ in range(2):  # exports again, the same
        ep = torch.export.export(model, (x,))
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert any("fpet." in o for o in ops), f"no merge op in the exported graph: {sorted(ops)}"
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # the eager model: still patched
    assert tensor_attributes(model) == []


# ----------------------------------------------------------------------------- intermediates
INTERMEDIATE_KW = [
    dict(indices=[0, 2]),
    dict(indices=2, output_fmt="NLC", norm=True),
    dict(indices=[1], return_prefix_tokens=True, intermediates_only=True),
    dict(indices=[0, 1], output_dict=True, return_prefix_tokens=True, stop_early=True),
]


def _flat(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return [out]


@pytest.mark.parametrize("variant", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
@pytest.mark.parametrize("kw", INTERMEDIATE_KW)
def test_intermediates_without_merging_equal_timm(kw, variant):
    """r = 0: every output of forward_intermediates equals timm's own (the prefix split, reshape,
    norm, dict and stop_early handling are timm's contract)."""
    model = tiny_vit(**variant)
    x = images()
    with torch.no_grad():
        expected = _flat(model.forward_intermediates(x, **kw))
        fk.patch.timm(model, "tome", r=0)
        got = _flat(model.forward_intermediates(x, **kw))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_intermediates_are_unmerged_to_the_patch_grid(method):
    model = patch(tiny_vit(reg_tokens=1), method, None)
    plain = fk.patch.remove(copy.deepcopy(model))
    x = images()
    p = model.num_prefix_tokens
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in _flat(plain.forward_intermediates(x, indices=[0, 2]))]
        for _ in range(2):  # twice in a row
            final, inter = model.forward_intermediates(x, indices=[0, 2])
            assert [tuple(t.shape) for t in _flat((final, inter))] == shapes
            layers = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
            assert [tuple(t.shape) for t in layers] == shapes[1:]
            st = fk.patch.merge_state(model, x)
            # the final features: the merged rows scattered back through the token map
            torch.testing.assert_close(final, fk.unmerge(st["features"], st["token_map"]))
            spatial = inter[1].flatten(2).transpose(1, 2)  # [B, 16, C]
            tmap = st["token_map"][:, p:]
            for b in range(x.shape[0]):  # grid tokens merged into one row share its features
                for j in range(16):
                    k = int(tmap[b, j])
                    same = (tmap[b] == k).nonzero().flatten()
                    if k >= 0:
                        torch.testing.assert_close(spatial[b, same], spatial[b, j].expand(len(same), -1))
                    else:
                        assert not spatial[b, j].any()
            assert (st["size"][:, p:].squeeze(-1) > 1).any(), "nothing merged: the test would prove nothing"


# ----------------------------------------------------------------------------- copies and pickles
@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_ema_save_pickle_after_training_steps(method):
    from timm.utils import ModelEmaV3
    model = patch(tiny_vit(), method, None)
    x = images()
    train_step(model, x)
    train_step(model, x, seed=1)  # a second step: the first forward's graph must not linger
    ema = ModelEmaV3(model, decay=0.5)
    train_step(model, x, seed=2)
    ema.update(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), expected, atol=0, rtol=0)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected, atol=0, rtol=0)
        ema_out = ema.module.eval()(x)
        assert ema_out.shape == expected.shape and not torch.equal(ema_out, expected)
        fk.patch.remove(loaded)  # a loaded model unpatches like the original
        assert type(loaded) is VisionTransformer


# ----------------------------------------------------------------------------- FPET grids
def _checkerboard_respected(tmap, p, h, w):
    """Every B cell (i + j odd) keeps its own row; every A cell (i + j even) went to a B cell's row."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    is_b = ((ii + jj) % 2 == 1).flatten()
    for row in tmap[:, p:]:
        b_rows = row[is_b]
        if len(set(b_rows.tolist())) != len(b_rows):
            return False
        a_rows = row[~is_b]
        if not torch.isin(a_rows[a_rows >= 0], b_rows).all():
            return False
    return True


@pytest.mark.parametrize("dynamic", [True, False])
def test_fpet_takes_a_non_square_grid_from_patch_embed(dynamic):
    cfg = dict(img_size=(224, 320), patch_size=14, embed_dim=24, depth=2, num_heads=2, num_classes=3)
    if dynamic:
        cfg["dynamic_img_size"] = True
        hw, grid = (280, 420), (20, 30)   # 600 tokens: floor(sqrt) would guess a 25 x 24 grid
    else:
        cfg["patch_size"] = 16
        hw, grid = (224, 320), (14, 20)
    model = tiny_vit(**cfg)
    fk.patch.timm(model, "fpet", merge_layer=1)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    st = fk.patch.merge_state(model, x)
    assert _checkerboard_respected(st["token_map"], 1, *grid)
    assert not _checkerboard_respected(st["token_map"], 1, *grid[::-1]) or grid[0] == grid[1]
    na = fk.ops.fpet.grid_sizes(0, *grid)[0]
    assert st["size"].shape[1] == 1 + grid[0] * grid[1] - na
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert maps[0].shape == (1, 24, *grid)
    # an explicit grid: accepted when it agrees, an error when it contradicts the patch embedding
    # (the grid is set at patch time: remove first; the fresh refinement adapter starts as the identity)
    fk.patch.remove(model)
    fk.patch.timm(model, "fpet", merge_layer=1, grid=grid)
    torch.testing.assert_close(fk.patch.merge_state(model, x)["features"], st["features"])
    fk.patch.remove(model)
    fk.patch.timm(model, "fpet", merge_layer=1, grid=grid[::-1])
    with pytest.raises(ValueError, match="grid"):
        fk.patch.merge_state(model, x)


class OpaqueStem(torch.nn.Module):
    """A patch embedding that does not report its grid (no NHWC output, no dynamic_feat_size)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_fpet_grid_argument_when_patch_embed_cannot_tell():
    model = tiny_vit()
    fk.patch.timm(model, "fpet", merge_layer=1)
    x = images()
    expected = fk.patch.merge_state(model, x)
    model.patch_embed = OpaqueStem(model.patch_embed)
    with pytest.raises(ValueError, match=r"grid=\(H, W\)"):
        fk.patch.merge_state(model, x)
    refine = model.blocks[1].fk_refine.state_dict()
    fk.patch.remove(model)
    fk.patch.timm(model, "fpet", merge_layer=1, grid=(4, 4))
    model.blocks[1].fk_refine.load_state_dict(refine)
    got = fk.patch.merge_state(model, x)
    assert torch.equal(got["token_map"], expected["token_map"])
    torch.testing.assert_close(got["features"], expected["features"], atol=0, rtol=0)


# ----------------------------------------------------------------------------- model.r
def test_model_r_on_fpet_and_pyra_raises():
    fpet = patch(tiny_vit(), "fpet", None)
    with pytest.raises(ValueError, match="fpet.*no r"):
        fpet.r = 2
    assert fpet.r is None
    pyra = patch(tiny_vit(), "pyra", None)
    assert pyra.r == [3, 2, 2]
    with pytest.raises(ValueError, match="PYRA"):
        pyra.r = 2
    tome = patch(tiny_vit(), "tome", None)
    tome.r = 1
    assert fk.patch.merge_state(tome, images())["size"].shape[1] == 17 - 3


# ----------------------------------------------------------------------------- merge state
@pytest.mark.parametrize("method", METHODS)
def test_merge_state_holds_no_graph_and_with_state_keeps_it(method):
    model = patch(tiny_vit(), method, None).train()
    x = images()
    st = fk.patch.merge_state(model, x)
    assert not st["features"].requires_grad and st["features"].grad_fn is None
    assert st["size"].grad_fn is None and st["token_map"].dtype == torch.int64
    feats, state = model.forward_features_with_state(x)
    assert feats.grad_fn is not None
    assert torch.equal(state.token_map, st["token_map"])
    if method == "fpet":  # sizes carry FPET's straight-through gradient to the refinement adapter
        assert state.size.grad_fn is not None
