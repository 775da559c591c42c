"""Threshold merging in ``fk.patch.timm`` (issue 21 item 2, the model layer): rows of one batch end with
different token counts, each image's valid outputs equal that image run alone, ``merge_state`` reports
the tokens each block kept, and a head that would pool padding is refused."""
import pytest
import torch

import fpet_kernels as fk
from fpet_kernels._checks import r_cap

timm = pytest.importorskip("timm")
from test_patch import tiny_vit  # noqa: E402

ATOL = 1e-9


def images(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64)
    x[1] = x[1].mean()  # a flat image: its patch tokens are alike, so it merges more than the others
    return x


# a tiny random ViT's keys are alike: thresholds near 1 make the rows differ
@pytest.mark.parametrize("method, kw", [("tome", dict(threshold=0.995)),
                                        ("tome", dict(r=4, threshold=[0.99, None, 0.995])),
                                        ("pyra", dict(r=4, threshold=0.995))])
def test_threshold_rows_equal_each_image_alone(method, kw):
    model = fk.patch.timm(tiny_vit().double(), method, **kw)
    x = images()
    st = fk.patch.merge_state(model, x)
    kept = torch.stack(st["kept"])  # [blocks, B]
    assert kept.shape == (3, 4) and st["features"].shape[1] == int(kept[-1].max())
    assert len(set(kept[-1].tolist())) > 1, "rows should end with different counts"
    logits = model(x)
    for b in range(4):
        alone = fk.patch.merge_state(model, x[b:b + 1])
        n = int(kept[-1, b])
        torch.testing.assert_close(st["features"][b, :n], alone["features"][0, :n], atol=ATOL, rtol=0)
        assert (st["features"][b, n:] == 0).all() and (st["size"][b, n:] == 0).all()
        assert torch.equal(st["size"][b, :n], alone["size"][0, :n])
        assert torch.equal(st["token_map"][b], alone["token_map"][0])
        assert [int(k[0]) for k in alone["kept"]] == kept[:, b].tolist()
        torch.testing.assert_close(logits[b], model(x[b:b + 1])[0], atol=ATOL, rtol=0)


def test_threshold_gradients_equal_each_image_alone():
    model = fk.patch.timm(tiny_vit().double(), "tome", threshold=0.995)
    x = images().requires_grad_(True)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (model(x) * w).sum().backward()
    for b in range(4):
        xb = x[b:b + 1].detach().requires_grad_(True)
        (model(xb) * w[b]).sum().backward()
        torch.testing.assert_close(x.grad[b], xb.grad[0], atol=1e-8, rtol=1e-6)


def test_threshold_that_merges_nothing_or_everything():
    base = tiny_vit().double()
    x = images()
    want = base.forward_features(x)
    model = fk.patch.timm(tiny_vit().double(), "tome", threshold=1.0)  # no cosine reaches 1 here
    st = fk.patch.merge_state(model, x)
    torch.testing.assert_close(st["features"], want, atol=ATOL, rtol=0)
    assert [k.tolist() for k in st["kept"]] == [[17] * 4] * 3
    fk.patch.remove(model)
    fk.patch.timm(model, "tome", threshold=-1.0)  # every row merges its cap in every block
    st = fk.patch.merge_state(model, x)
    n, counts = 17, []
    for _ in range(3):
        n -= r_cap(n, True, False)
        counts.append([n] * 4)
    assert [k.tolist() for k in st["kept"]] == counts and st["features"].shape[1] == n


def test_threshold_refuses_a_head_that_pools_padding():
    with pytest.raises(ValueError, match="global_pool"):
        fk.patch.timm(tiny_vit(global_pool="avg", class_token=False), "tome", threshold=0.5)
    fk.patch.timm(tiny_vit(global_pool="avg", class_token=False), "tome", r=2)  # r alone: as before
    with pytest.raises(ValueError, match="threshold"):
        fk.patch.timm(tiny_vit(), "tome", threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        fk.patch.timm(tiny_vit(), "fpet", threshold=0.5)
