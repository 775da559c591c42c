"""No host sync in a training step (issue 18): the index tensors an op's forward produced (or checked,
when the user gave them) are trusted by its backward, so no backward reads a value back to the host.

A sync is counted as a call of ``aten::_local_scalar_dense`` (what ``.item()``, ``int(t)``,
``bool(t)`` run) or of an op whose output shape depends on the data (``nonzero``,
``masked_select``, ``unique``): on a GPU each makes the CPU wait for the device. Two counters: a
``TorchDispatchMode`` sees every aten op called from Python outside the registered ops (the public
functions, the references, the model patch, the autograd formulas; a mode is switched off while it
handles a call, so it cannot see into an op), and the profiler sees the aten ops called inside the
registered ops ``fpet::*`` (the C++ kernels, the Triton launchers) at any depth.

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
from fpet_kernels import _checks
from fpet_kernels.ops import _backend
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


SCALAR_READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"})


def profiled_syncs(fn) -> list[str]:
    """Syncing ops at any depth, also inside the registered ops (the C++ kernels, the Triton launchers,
    the emulated CUDA launchers): the profiler records every aten op called, from Python or C++. A read
    made by an ATen op's own CPU implementation (e.g. ``std`` of a whole tensor reads its result
    back on CPU, not on a GPU) is not the package's and is not counted: counted are the reads whose
    caller (the first event above them other than ``item`` / ``is_nonzero``) is not an ``aten::`` op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = []
    for e in prof.events():
        if e.name not in SYNC_OPS or e.name == "aten::item":  # item: counted as its _local_scalar_dense
            continue
        p = e.cpu_parent
        while p is not None and p.name in SCALAR_READS:
            p = p.cpu_parent
        if p is None or not p.name.startswith("aten::"):
            found.append(f"{e.name} in {p.name if p is not None else 'Python'}")
    return found


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
    assert profiled_syncs(step) == []  # inside the registered ops too (C++ kernels, Triton launchers)


def test_the_dispatch_counter_sees_a_sync():
    """``.item()`` and the check of a user-given map are counted (so the zeros above can fail)."""
    t = torch.tensor([3])
    tmap = torch.tensor([[0, 1, 1, 2]])
    x = torch.randn(1, 4, 2)

    def user_calls():
        t.item()
        fk.compose_token_map(tmap, tmap.clamp_max(1))  # a user-given map: checked (one sync)
        fk.unmerge(x[:, :3], tmap, backend="reference")  # the same
    assert len(dispatch_syncs(user_calls)) == 3  # one each


def test_cuda_launchers_trust_maps_inside_a_backward_only(simt_ops):
    """The CUDA launchers (csrc/cuda/, run on the host by the emulator ``torch.ops.fpet_simt``): the
    token-map check (``check_map_range``) and PYRA's matching check (``check_pyra_matching``) read
    back one value each (a device sync on a GPU), and are skipped while the thread's trusted-maps
    state (csrc/trusted_maps.h, set by ``fpet_kernels._C._trust_maps`` inside a backward) is on."""
    calls = _map_backward_calls(simt_ops) + [_pyra_backward_call(simt_ops), _fpet_backward_call(simt_ops)]
    assert simt_ops.trust_maps(False) is False
    try:
        for call in calls:
            assert profiled_syncs(call), "outside a backward the launcher checks the map"
            assert simt_ops.trust_maps(True) is False
            assert profiled_syncs(call) == []
            assert simt_ops.trust_maps(False) is True
    finally:
        simt_ops.trust_maps(False)
    bad = _pyra_backward_call(simt_ops, lambda s, d, u: (s, d, u.flip(1).clone() if u.shape[1] > 1 else u))
    bad()  # the same rows in another order: valid
    dup = _pyra_backward_call(simt_ops, lambda s, d, u: (torch.cat([s[:, :1], s[:, :-1]], 1), d, u))
    with pytest.raises(RuntimeError, match="src_idx"):
        dup()  # checked outside a backward


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
            assert dispatch_syncs(call) == [] and profiled_syncs(call) == []
        if family == "triton":  # the Triton launchers check user-given maps on the host
            assert profiled_syncs(call), "a call outside a backward must check its maps"


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
