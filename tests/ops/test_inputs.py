"""Bad input gets a clear ValueError / TypeError / RuntimeError naming the argument (spec section 5)."""
from __future__ import annotations

import re

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.ops import library, tome
from helpers import gen

N, C, D = 17, 8, 4
ERRORS = (ValueError, TypeError, RuntimeError)


def _ok():
    return gen(2, N, C, seed=0), gen(2, N, D, seed=1), torch.ones(2, N, 1)


def _pyra_params(r=4, c=C):
    return torch.zeros(r, 1), torch.zeros(1, c), torch.ones(c), torch.zeros(c)


def _names(arg):
    """The message must name the argument as a word (``a``, ``size``, ``metric`` ...)."""
    return rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])"


# one row per bad call: (id, argument the message must name, callable)
def _cases():
    x, metric, size = _ok()
    a, b, lw, lb = _pyra_params()
    meta = torch.empty(2, N, D, device="meta")
    cases = []

    def add(arg, fn, id_):
        cases.append(pytest.param(arg, fn, id=id_))

    # ---- every merge entry point shares these: x, metric, size
    entry = {
        "tome_merge": lambda x, m, s: fk.tome_merge(x, m, 4, s, True, backend="reference"),
        "fpet_merge": lambda x, m, s: fk.fpet_merge(x, m, s, True, backend="reference"),
        "pyra_merge": lambda x, m, s: fk.pyra_merge(x, m, 4, a, b, lw, lb, s, True, backend="reference"),
    }
    for name, f in entry.items():
        add("x", lambda f=f: f(x[0], metric, size), f"{name}-x-rank2")
        add("x", lambda f=f: f(x[None], metric, size), f"{name}-x-rank4")
        add("metric", lambda f=f: f(x, metric[0], size), f"{name}-metric-rank2")
        add("size", lambda f=f: f(x, metric, size[..., 0]), f"{name}-size-rank2")
        add("metric", lambda f=f: f(x, metric[:, :-1], size), f"{name}-N-mismatch-metric")
        add("size", lambda f=f: f(x, metric, size[:, :-1]), f"{name}-N-mismatch-size")
        add("metric", lambda f=f: f(x, metric[:1], size), f"{name}-B-mismatch-metric")
        add("size", lambda f=f: f(x, metric, torch.ones(2, N, 2)), f"{name}-size-last-dim")
        add("x", lambda f=f: f(x.long(), metric, size), f"{name}-x-int")
        add("metric", lambda f=f: f(x, metric.int(), size), f"{name}-metric-int")
        add("size", lambda f=f: f(x, metric, size.long()), f"{name}-size-int")
        add("x", lambda f=f: f(x.bool(), metric, size), f"{name}-x-bool")
        add("metric", lambda f=f: f(x, meta, size), f"{name}-metric-device")
        add("size", lambda f=f: f(x, metric, size.to("meta")), f"{name}-size-device")
        add("x", lambda f=f: f(x.numpy(), metric, size), f"{name}-x-numpy")

    # ---- r
    add("r", lambda: fk.tome_merge(x, metric, -1, backend="reference"), "tome_merge-r-negative")
    add("r", lambda: fk.tome_merge(x, metric, 2.0, backend="reference"), "tome_merge-r-float")
    add("r", lambda: fk.tome_merge(x, metric, torch.tensor(2), backend="reference"), "tome_merge-r-tensor")
    add("r", lambda: fk.tome_match(metric, -3, backend="reference"), "tome_match-r-negative")
    add("r", lambda: fk.tome_match(metric, "4", backend="reference"), "tome_match-r-str")
    add("r", lambda: fk.bipartite_soft_matching(metric, -1), "bipartite_soft_matching-r-negative")
    add("r", lambda: fk.bipartite_soft_matching(metric, 1.5), "bipartite_soft_matching-r-float")
    add("r", lambda: fk.pyra_merge(x, metric, -1, a, b, lw, lb, backend="reference"), "pyra_merge-r-negative")
    add("r", lambda: fk.pyra_merge(x, metric, 4.0, a, b, lw, lb, backend="reference"), "pyra_merge-r-float")

    # ---- metric-only entry points
    add("metric", lambda: fk.tome_match(metric[0], 4, backend="reference"), "tome_match-metric-rank")
    add("metric", lambda: fk.tome_match(metric.long(), 4, backend="reference"), "tome_match-metric-int")
    add("metric", lambda: fk.bipartite_soft_matching(metric[0], 4), "bipartite_soft_matching-metric-rank")
    add("metric", lambda: fk.bipartite_diff_matching(metric.int(), True), "bipartite_diff_matching-metric-int")
    add("metric", lambda: fk.bipartite_diff_matching(metric[0], True), "bipartite_diff_matching-metric-rank")

    # ---- flags
    add("class_token", lambda: fk.tome_merge(x, metric, 4, None, 1, backend="reference"), "tome-class_token-int")
    add("distill_token", lambda: fk.tome_match(metric, 4, False, "yes", backend="reference"), "tome-distill-str")
    add("class_token", lambda: fk.fpet_merge(x, metric, None, None, backend="reference"), "fpet-class_token-None")

    # ---- FPET grid
    add("grid", lambda: fk.fpet_merge(x, metric, None, True, False, (3, 3), backend="reference"), "fpet-grid-wrong")
    add("grid", lambda: fk.fpet_merge(x, metric, None, True, False, (4, 4, 1), backend="reference"), "fpet-grid-3")
    add("grid", lambda: fk.fpet_merge(x, metric, None, True, False, (4.0, 4.0), backend="reference"),
        "fpet-grid-float")
    add("grid", lambda: fk.fpet_merge(x, metric, None, True, False, (-4, -4), backend="reference"), "fpet-grid-neg")
    add("grid", lambda: fk.fpet_merge(x, metric, None, True, False, 16, backend="reference"), "fpet-grid-int")
    add("grid", lambda: fk.bipartite_diff_matching(metric, True, False, (3, 5)), "diff_matching-grid-wrong")
    x18, m18 = gen(2, 18, C, seed=2), gen(2, 18, D, seed=3)  # 17 grid tokens after the class token: no grid
    add("grid", lambda: fk.fpet_merge(x18, m18, None, True, backend="reference"), "fpet-N-no-grid")
    add("grid", lambda: fk.bipartite_diff_matching(m18, True), "diff_matching-N-no-grid")

    # ---- PYRA parameters
    add("a", lambda: fk.pyra_merge(x, metric, 4, torch.zeros(3, 1), b, lw, lb, backend="reference"), "pyra-a-rows")
    add("a", lambda: fk.pyra_merge(x, metric, 4, torch.zeros(4), b, lw, lb, backend="reference"), "pyra-a-rank")
    add("a", lambda: fk.pyra_merge(x, metric, 4, torch.zeros(1, 4), b, lw, lb, backend="reference"), "pyra-a-T")
    add("a", lambda: fk.pyra_merge(x, metric, 4, a.long(), b, lw, lb, backend="reference"), "pyra-a-int")
    add("a", lambda: fk.pyra_merge(x, metric, 4, a.to("meta"), b, lw, lb, backend="reference"), "pyra-a-device")
    add("b", lambda: fk.pyra_merge(x, metric, 4, a, torch.zeros(1, C + 1), lw, lb, backend="reference"),
        "pyra-b-C")
    add("b", lambda: fk.pyra_merge(x, metric, 4, a, torch.zeros(C), lw, lb, backend="reference"), "pyra-b-rank")
    add("b", lambda: fk.pyra_merge(x, metric, 4, a, torch.zeros(C, 1), lw, lb, backend="reference"), "pyra-b-T")
    add("ln_weight", lambda: fk.pyra_merge(x, metric, 4, a, b, torch.ones(C - 1), lb, backend="reference"),
        "pyra-ln_weight-C")
    add("ln_weight", lambda: fk.pyra_merge(x, metric, 4, a, b, torch.ones(1, C), lb, backend="reference"),
        "pyra-ln_weight-rank")
    add("ln_bias", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, torch.zeros(C + 2), backend="reference"),
        "pyra-ln_bias-C")
    add("ln_bias", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, lb.int(), backend="reference"), "pyra-ln_bias-int")
    add("ln_bias", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, [0.0] * C, backend="reference"), "pyra-ln_bias-list")
    add("eps", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, lb, eps=0.0, backend="reference"), "pyra-eps-0")
    add("eps", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, lb, eps=-1e-5, backend="reference"), "pyra-eps-neg")

    # ---- closures: bad mode, wrong token count
    merge, unmerge = fk.bipartite_soft_matching(metric, 4, True)
    fmerge = fk.bipartite_diff_matching(metric, True)
    add("mode", lambda: merge(x, mode="max"), "tome-closure-mode")
    add("mode", lambda: merge(x, "avg"), "tome-closure-mode-positional")
    add("mode", lambda: fmerge(x, mode="min"), "fpet-closure-mode")
    add("x", lambda: merge(x[:, :-1]), "tome-closure-N")
    add("x", lambda: fmerge(x[:, :-1]), "fpet-closure-N")
    add("x", lambda: fk.merge_wavg(merge, x[:, :-1]), "merge_wavg-tome-N")
    add("x", lambda: fk.merge_wavg(fmerge, x[:, :-1]), "merge_wavg-fpet-N")
    add("x", lambda: fk.merge_wavg(merge, x[0]), "merge_wavg-x-rank")
    add("size", lambda: fk.merge_wavg(merge, x, torch.ones(2, N, 3)), "merge_wavg-size-last-dim")
    add("size", lambda: fk.merge_wavg(merge, x, torch.ones(2, N - 1, 1)), "merge_wavg-size-N")
    add("x", lambda: fk.merge_source(merge, x[0]), "merge_source-x-rank")

    # ---- unmerge
    m = fk.tome_match(metric, 4, True, backend="reference")
    y = gen(2, N - 4, C, seed=4)
    add("y", lambda: fk.unmerge(y[0], m, backend="reference"), "unmerge-y-rank")
    add("y", lambda: fk.unmerge(y[:, :-1], m, backend="reference"), "unmerge-y-N")
    add("y", lambda: fk.unmerge(y.long(), m, backend="reference"), "unmerge-y-int")
    add("token_map", lambda: fk.unmerge(y, m.token_map.int(), backend="reference"), "unmerge-map-int32")
    add("token_map", lambda: fk.unmerge(y, m.token_map[0], backend="reference"), "unmerge-map-rank")
    add("token_map", lambda: fk.unmerge(y, m.token_map[:1], backend="reference"), "unmerge-map-batch")
    add("token_map", lambda: fk.unmerge(y, m.token_map.to("meta"), backend="reference"), "unmerge-map-device")

    # ---- backend selection
    add("backend", lambda: fk.tome_merge(x, metric, 4, backend="cuda-ish"), "backend-unknown")
    add("backend", lambda: fk.tome_merge(x, metric, 4, backend=3), "backend-not-str")
    add("backend", lambda: fk.fpet_merge(x, metric, None, True, backend="nope"), "fpet-backend-unknown")
    add("backend", lambda: fk.pyra_merge(x, metric, 4, a, b, lw, lb, backend="nope"), "pyra-backend-unknown")
    add("backend", lambda: fk.unmerge(y, m, backend="nope"), "unmerge-backend-unknown")
    add("backend", lambda: fk.tome_match(metric, 4, backend="nope"), "tome_match-backend-unknown")
    add("backend", lambda: fk.tome_merge(x.double(), metric.double(), 4, backend="cpu"), "cpu-float64")
    add("backend", lambda: fk.fpet_merge(x.double(), metric, None, True, backend="cpu"), "fpet-cpu-float64")
    add("backend", lambda: fk.pyra_merge(x, metric, 4, a.double(), b, lw, lb, backend="cpu"), "pyra-cpu-float64")
    add("backend", lambda: fk.tome_merge(x, metric, 4, backend="cuda"), "cuda-on-cpu-tensors")
    return cases


@pytest.mark.parametrize("arg,fn", _cases())
def test_bad_input_raises_naming_argument(arg, fn):
    with pytest.raises(ERRORS) as info:
        fn()
    msg = str(info.value)
    assert re.search(_names(arg), msg), f"message does not name {arg!r}: {msg}"


def test_bad_env_backend_names_the_variable(monkeypatch):
    x, metric, _ = _ok()
    monkeypatch.setenv("FPET_BACKEND", "nope")
    with pytest.raises(ValueError, match="FPET_BACKEND"):
        fk.tome_merge(x, metric, 4)


def test_env_backend_selects_the_backend(monkeypatch):
    """FPET_BACKEND picks the backend when the call does not; an explicit argument wins."""
    x, metric, _ = _ok()
    monkeypatch.setenv("FPET_BACKEND", "reference")
    out, size, m = fk.tome_merge(x.double(), metric.double(), 4)  # float64: only the reference runs it
    assert out.dtype == torch.float64
    monkeypatch.setenv("FPET_BACKEND", "cpu")
    with pytest.raises(ERRORS, match="backend"):
        fk.tome_merge(x.double(), metric.double(), 4)  # cpu requested (by the env) for float64: an error
    out2, _, _ = fk.tome_merge(x.double(), metric.double(), 4, backend="reference")
    assert torch.equal(out, out2)


def test_auto_backend_runs_float64_on_the_reference():
    x, metric, _ = _ok()
    out, size, _ = fk.tome_merge(x.double(), metric.double(), 4)
    assert out.dtype == torch.float64 and size.dtype == torch.float64


def test_device_mismatch_x_on_meta():
    x, metric, size = _ok()
    with pytest.raises(ValueError, match=_names("metric")):
        fk.tome_merge(x.to("meta"), metric, 4, backend="reference")


@pytest.mark.parametrize("bad", [5, 9, -2])
def test_token_map_entries_out_of_range_raise(backend, bad):
    """A token map entry outside [-1, n_out) is an error on every backend (never a silent gather)."""
    y = gen(2, 5, 3, seed=5)
    x = gen(2, 6, 3, seed=6)
    tmap = torch.tensor([[0, 1, 2, 3, 4, 0]] * 2)
    tmap[1, 5] = bad
    with pytest.raises(ERRORS):
        fk.unmerge(y, tmap, backend=backend)
    with pytest.raises(ERRORS):
        library.dispatch(tome.MERGE_WAVG, backend, x.device, (), x, None, tmap, 5)
    if backend != "reference":  # the registered ops check their maps themselves
        with pytest.raises(ERRORS):
            library.family(backend).merge_sum(x, tmap, 5)
        with pytest.raises(ERRORS):
            library.family(backend).merge_wavg(x, None, tmap, 5)
