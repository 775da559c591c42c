"""No host sync in a training step (issue 18): the index tensors an op's forward produced (or checked,
when the user gave them) are trusted by its backward, so no backward reads a value back to the host.

A sync is counted as a call of ``aten::_local_scalar_dense`` (what ``.item()``, ``int(t)``,
``bool(t)`` run) or of an op whose output shape depends on the data (``nonzero``,
``masked_select``, ``unique``): on a GPU each makes the CPU wait for the device. Two counters: a
``TorchDispatchMode`` sees every op called from Python (the public functions, the Triton launchers,
the autograd formulas), and the profiler sees the ops called inside the C++ kernels as well.

The training step (forward, backward, SGD step) of a patched tiny timm ViT, ToMe / FPET / PYRA, on
the fused path: backend "cpu" (the C++ kernels), the default (None), and "triton" (interpreter).
The trust is internal (``_checks.trusted_maps``, ``fpet_kernels._C._trust_maps``): user-given maps
are still checked, which the tests below show by counting the checks' syncs outside a backward.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import fpet_kernels as fk
from fpet_kernels import _backend, _checks
from fpet_kernels.ops import library

from helpers import REQUIRE_EXTENSION, is_live, missing_message, tiny_timm_vit

SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
                      "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"})


class SyncCounter(TorchDispatchMode):
    """Records every call of a syncing op made while active, with the package's frames that made it,
    and the package's registered ops called (``fpet::*``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.fpet_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("fpet::"):
            self.fpet_ops.add(name)
        if name in SYNC_OPS:
            where = [f"{f.filename.split('fpet_kernels/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                     if "fpet_kernels" in f.filename]
            self.calls.append(f"{name} from {' <- '.join(reversed(where)) or 'outside the package'}")
        return func(*args, **(kwargs or {}))


def dispatch_syncs(fn, ops: set | None = None) -> list[str]:
    """The syncing calls ``fn()`` makes from Python; the ``fpet::*`` ops it called are added to ``ops``."""
    with SyncCounter() as counter:
        fn()
    if ops is not None:
        ops |= counter.fpet_ops
    return counter.calls


def profiled_syncs(fn) -> list[str]:
    """Syncing ops at any depth (inside C++ kernels too), by the profiler's record of every aten op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in SYNC_OPS]


def _need(backend):
    if backend == "triton":
        if not fk.backends()["live"]["triton"]:
            pytest.skip("triton interpreter not available")
    elif backend == "cpu" and not is_live("cpu"):
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {missing_message('cpu')}", pytrace=False)
        pytest.skip(missing_message("cpu"))
    return backend


def _patched(method: str, backend):
    model = tiny_timm_vit()  # 16 patches + class token, 3 blocks, training mode
    kw = {"tome": dict(r=3), "fpet": dict(merge_layer=1), "pyra": dict(r=[3, 2, 2])}[method]
    fk.patch.timm(model, method=method, backend=backend, **kw)
    return model


def _train_step(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


# the fused op and its fused backward that a training step of each method must have run
FUSED = {"tome": ("tome_merge", "merge_wavg_backward"), "fpet": ("fpet_merge", "fpet_merge_backward"),
         "pyra": ("pyra_merge", "pyra_merge_backward")}


@pytest.mark.parametrize("method", ["tome", "fpet", "pyra"])
@pytest.mark.parametrize("backend", ["cpu", None, "triton"])
def test_training_step_has_no_host_sync(method, backend):
    _need(backend)
    model = _patched(method, backend)
    step = _train_step(model)
    step()  # first step outside the counters (lazy initialisation)
    ops: set = set()
    assert dispatch_syncs(step, ops) == []
    fused = backend if backend is not None else _backend.resolve(None, torch.device("cpu"), (torch.float32,))
    if fused != "reference":  # the step ran the fused kernels, forward and backward
        suffix = "_triton" if fused == "triton" else ""
        assert {f"fpet::{op}{suffix}" for op in FUSED[method]} <= ops, ops
    if backend != "triton":  # the interpreter's own bookkeeping is not the package's
        assert profiled_syncs(step) == []


def test_the_counters_see_a_sync():
    """Both counters catch ``.item()`` and a check of a user-given map (so the zeros above can fail)."""
    t = torch.tensor([3])
    tmap = torch.tensor([[0, 1, 1, 2]])
    x = torch.randn(1, 4, 2)

    def user_calls():
        t.item()
        fk.compose_token_map(tmap, tmap.clamp_max(1))  # a user-given map: checked (one sync)

    assert len(dispatch_syncs(user_calls)) == 2
    assert len(profiled_syncs(user_calls)) >= 2
    assert dispatch_syncs(lambda: fk.unmerge(x[:, :3], tmap, backend="reference"))


def _map_backward_calls(kernels):
    """The map-driven kernels a backward calls, with valid maps of a merge of 9 tokens into 5 rows."""
    b, n, c, n_out = 2, 9, 4, 5
    x, size = torch.randn(b, n, c), torch.rand(b, n, 1) + 0.5
    tmap = torch.arange(n).repeat(b, 1) // 2
    tmap[1, 3] = -1
    y, out_size = torch.randn(b, n_out, c), torch.rand(b, n_out, 1) + 1
    return [lambda: kernels.merge_wavg_backward(y, size, out_size, tmap), lambda: kernels.unmerge(y, tmap),
            lambda: kernels.merge_sum(x, tmap, n_out)]


def _pyra_backward_call(kernels, mutate=None):
    b, n, c, r = 2, 11, 6, 3
    x, metric = torch.randn(b, n, c), torch.randn(b, n, 4)
    a, bb, lnw, lnb = torch.randn(r, 1), torch.randn(1, c), torch.ones(c), torch.zeros(c)
    out, osz, src, dst, unm, _ = kernels.pyra_merge(x, metric, r, a, bb, lnw, lnb, None, True, False, 1e-5)
    if mutate is not None:
        src, dst, unm = mutate(src, dst, unm)
    go = torch.randn(out.shape)
    return lambda: kernels.pyra_merge_backward(go, None, x, None, out, osz, src, dst, unm, a, bb, lnw, lnb, 1e-5, False)


def _fpet_backward_call(kernels):
    b, p, h, w, c = 2, 1, 4, 4, 5
    n = p + h * w
    x, metric, size = torch.randn(b, n, c), torch.randn(b, n, 3), torch.rand(b, n, 1) + 0.5
    out, osz, tmap = kernels.fpet_merge(x, metric, size, p, h, w)
    go = torch.randn(out.shape)
    return lambda: kernels.fpet_merge_backward(go, None, x, metric, size, out, osz, tmap, p, h, w)


@pytest.mark.parametrize("family", ["cpu", "triton"])
def test_kernel_entries_trust_maps_inside_a_backward_only(family):
    """The kernel entries a backward calls: no sync inside ``trusted_maps()`` (a backward), and their
    checks of index tensors (a sync each in the Triton launchers) everywhere else."""
    _need(family)
    kernels = library.family(family)
    calls = _map_backward_calls(kernels) + [_pyra_backward_call(kernels), _fpet_backward_call(kernels)]
    for call in calls:
        with library.trusted_maps():
            assert dispatch_syncs(call) == []
            if family == "cpu":
                assert profiled_syncs(call) == []
        if family == "triton":  # the Triton launchers check user-given maps on the host
            assert dispatch_syncs(call), "a call outside a backward must check its maps"


def test_trust_is_internal_and_scoped():
    assert not _checks.maps_trusted()
    with library.trusted_maps():
        assert _checks.maps_trusted()
        with library.trusted_maps():
            assert _checks.maps_trusted()
        assert _checks.maps_trusted()
    assert not _checks.maps_trusted()
    with pytest.raises(KeyError):
        with library.trusted_maps():
            raise KeyError("inside")
    assert not _checks.maps_trusted()
    ext = _backend._EXT
    if ext is not None:  # the extension's own switch (its CUDA launchers) follows, and is restored
        assert ext._trust_maps(False) is False
        with library.trusted_maps():
            assert ext._trust_maps(True) is True
        assert ext._trust_maps(False) is False


def test_a_backward_runs_trusted(monkeypatch):
    """The autograd formula runs inside ``trusted_maps()``; the forward and a hook outside it do not."""
    _need("triton")
    from fpet_kernels.ops import tome_triton
    seen = []
    for name in ("tome_merge", "merge_wavg_backward"):  # the kernel entries, looked up at each call
        def spy(*args, _orig=getattr(tome_triton, name), _name=name):
            seen.append((_name, _checks.maps_trusted()))
            return _orig(*args)
        monkeypatch.setattr(tome_triton, name, spy)
    x = torch.randn(2, 9, 4, requires_grad=True)
    out, _, _ = fk.tome_merge(x, torch.randn(2, 9, 3), 2, backend="triton")
    out.register_hook(lambda g: seen.append(("hook", _checks.maps_trusted())))
    out.sum().backward()
    assert seen == [("tome_merge", False), ("hook", False), ("merge_wavg_backward", True)]
    assert not _checks.maps_trusted()


@pytest.mark.parametrize("family", ["cpu", "triton"])
def test_user_given_maps_are_still_checked(family):
    """Outside a backward a bad map or matching raises, on every kernel entry a backward calls."""
    _need(family)
    kernels = library.family(family)
    b, n, c, n_out = 2, 9, 4, 5
    tmap = torch.arange(n).repeat(b, 1) // 2
    tmap[0, 4] = n_out
    y, out_size = torch.randn(b, n_out, c), torch.ones(b, n_out, 1)
    with pytest.raises((RuntimeError, ValueError), match="token_map"):
        kernels.merge_wavg_backward(y, None, out_size, tmap)
    with pytest.raises((RuntimeError, ValueError), match="token_map"):
        kernels.unmerge(y, tmap)

    def swap(src, dst, unm):  # src_idx names an A row twice
        src = src.clone()
        src[0, 1] = src[0, 0]
        return src, dst, unm
    with pytest.raises((RuntimeError, ValueError), match="src_idx"):
        _pyra_backward_call(kernels, swap)()
