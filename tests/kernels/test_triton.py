"""Triton backend specifics. (Every generic test of the suite also runs with backend="triton": in
Triton's interpreter on CPU tensors, see conftest.py.) Here: the GPU tile shapes and the channel
split in the interpreter, ViT-L/14-at-448 sizes, the launch count of each op, the environment
switch, and compilation of every kernel for sm_90 without a GPU."""
import os

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels.ops import fpet_triton, pyra_triton, tome_triton
from fpet_kernels.ops.fpet import fpet_merge_reference, resolve_grid
from fpet_kernels.ops.pyra import pyra_merge_reference
from fpet_kernels.ops.tome import tome_merge_reference

from helpers import gen, gen_size

from helpers import REQUIRE_EXTENSION  # noqa: E402

# CI (FPET_REQUIRE_EXTENSION=1, or FPET_REQUIRE_TRITON=1) must not skip the Triton tests silently.
REQUIRE_TRITON = REQUIRE_EXTENSION or os.environ.get("FPET_REQUIRE_TRITON", "0") == "1"
LIVE = fk.backends()["live"]["triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_is_live_when_required():
    """In CI the Triton tests must not silently skip: triton ships with the CUDA builds of torch."""
    if not REQUIRE_TRITON and not LIVE:
        pytest.skip("triton is not live (no GPU and TRITON_INTERPRET unset, or triton missing)")
    assert LIVE, "FPET_REQUIRE_EXTENSION/FPET_REQUIRE_TRITON=1 but the triton backend is not live (triton missing, or no GPU and no TRITON_INTERPRET=1)"


needs_triton = pytest.mark.skipif(not LIVE and not REQUIRE_TRITON, reason="triton backend not live")


def _check(got, exp, atol=1e-5, rtol=1e-5, what=""):
    for i, (g, e) in enumerate(zip(got, exp)):
        if g.dtype == torch.int64:
            assert torch.equal(g.cpu(), e.cpu()), f"{what} output {i}: indices differ"
        else:
            torch.testing.assert_close(g.float().cpu(), e.float().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what} output {i}: {m}")


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The tile shapes the GPU runs (32-row tiles), instead of the interpreter's 64."""
    monkeypatch.setattr(tome_triton, "BLOCK", 32)
    monkeypatch.setattr(tome_triton, "BLOCK_J", 32)


@needs_triton
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("cls,dist", [(True, False), (False, True)])
def test_tome_and_pyra_gpu_tiles_and_channel_split(gpu_tiles, monkeypatch, split, cls, dist):
    monkeypatch.setattr(tome_triton, "SPLIT", split)
    bsz, n, c, d, r = 2, 197, 300, 64, 16
    x, metric, size = gen(bsz, n, c, seed=1), gen(bsz, n, d, seed=2), gen_size(bsz, n)
    x, metric, size = x.to(DEVICE), metric.to(DEVICE), size.to(DEVICE)
    got = tome_triton.tome_merge(x, metric, r, size, cls, dist)
    out, osz, m = tome_merge_reference(x, metric, r, size, cls, dist)
    _check(got, (out, osz) + tuple(m), what="tome_merge")
    a, b = gen(r, 1, seed=3).to(DEVICE), gen(1, c, seed=4).to(DEVICE)
    lw, lb = (1 + 0.1 * gen(c, seed=5)).to(DEVICE), (0.1 * gen(c, seed=6)).to(DEVICE)
    got = pyra_triton.pyra_merge(x, metric, r, a, b, lw, lb, size, cls, dist, 1e-5)
    out, osz, m = pyra_merge_reference(x, metric, r, a, b, lw, lb, size, cls, dist, 1e-5)
    _check(got, (out, osz) + tuple(m), atol=1e-4, rtol=1e-4, what="pyra_merge")


@needs_triton
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("p,grid", [(1, (14, 14)), (2, (9, 13)), (0, (7, 7))])
def test_fpet_gpu_tiles_and_channel_split(gpu_tiles, split, p, grid):
    h, w = grid
    bsz, n, c, d = 2, p + h * w, 300, 64
    x, metric, size = gen(bsz, n, c, seed=1), gen(bsz, n, d, seed=2), gen_size(bsz, n)
    x, metric, size = x.to(DEVICE), metric.to(DEVICE), size.to(DEVICE)
    got = fpet_triton.fpet_merge(x, metric, size, p, h, w, split=split)
    _check(got, fpet_merge_reference(x, metric, size, p, h, w), what="fpet_merge")


@needs_triton
@pytest.mark.parametrize("d", [512, 768])
def test_merges_at_large_metric_dim(d):
    """Metric dims beyond one BLOCK_D chunk (8 and 12 chunks of 64): the similarity tiles are
    accumulated over D, so D = 512 / 768 (598-786 KB of shared memory as whole rows) run; ToMe,
    PYRA and FPET against the reference, matching bit-identical."""
    bsz, n, c, r = 1, 37, 40, 6
    x, metric, size = gen(bsz, n, c, seed=1), gen(bsz, n, d, seed=2), gen_size(bsz, n)
    x, metric, size = x.to(DEVICE), metric.to(DEVICE), size.to(DEVICE)
    out, osz, m = tome_merge_reference(x, metric, r, size, True, False)
    _check(tome_triton.tome_merge(x, metric, r, size, True, False), (out, osz) + tuple(m), what=f"tome D={d}")
    a, b = gen(r, 1, seed=3).to(DEVICE), gen(1, c, seed=4).to(DEVICE)
    lw, lb = (1 + 0.1 * gen(c, seed=5)).to(DEVICE), (0.1 * gen(c, seed=6)).to(DEVICE)
    out, osz, m = pyra_merge_reference(x, metric, r, a, b, lw, lb, size, True, False, 1e-5)
    _check(pyra_triton.pyra_merge(x, metric, r, a, b, lw, lb, size, True, False, 1e-5), (out, osz) + tuple(m),
           atol=1e-4, rtol=1e-4, what=f"pyra D={d}")
    _check(fpet_triton.fpet_merge(x, metric, size, 1, 6, 6), fpet_merge_reference(x, metric, size, 1, 6, 6),
           what=f"fpet D={d}")


@needs_triton
def test_metric_chunks_with_a_tail(monkeypatch):
    """BLOCK_D = 16 with D = 40: three chunks, the last masked (the chunk loop's tail)."""
    monkeypatch.setattr(tome_triton, "BLOCK_D", 16)
    x, metric = gen(2, 45, 24, seed=7).to(DEVICE), gen(2, 45, 40, seed=8).to(DEVICE)
    out, osz, m = tome_merge_reference(x, metric, 9, None, False, True)
    _check(tome_triton.tome_merge(x, metric, 9, None, False, True), (out, osz) + tuple(m), what="tome tail")
    _check(fpet_triton.fpet_merge(x, metric, None, 0, 5, 9), fpet_merge_reference(x, metric, None, 0, 5, 9),
           what="fpet tail")


@needs_triton
@pytest.mark.parametrize("dist", [False, True])
def test_pyra_backward_over_source_blocks(monkeypatch, dist):
    """PYRA's backward over a (B, r / BLOCK_K) grid with the GPU's 32-source blocks: r = 70 gives
    three blocks (the last partial), whose partial channel and parameter sums are added in block
    order: equal to the reference, and bit-identical run to run."""
    from fpet_kernels.ops import pyra_triton_backward as pb
    from fpet_kernels.ops.pyra import pyra_merge_backward_reference
    monkeypatch.setattr(pb, "BLOCK_K", 32)
    bsz, n, c, r = 2, 145, 40, 70
    x, metric, size = gen(bsz, n, c, seed=1), gen(bsz, n, 16, seed=2), gen_size(bsz, n)
    a, b = gen(r, 1, seed=3), 0.5 * gen(1, c, seed=4)
    lw, lb = 1 + 0.2 * gen(c, seed=5), 0.1 * gen(c, seed=6)
    out, osz, m = pyra_merge_reference(x, metric, r, a, b, lw, lb, size, True, dist, 1e-5)
    args = (gen(bsz, n - r, c, seed=7), gen(bsz, n - r, 1, seed=8), x, size, out, osz, m.src_idx, m.dst_idx,
            m.unm_idx, a, b, lw, lb, 1e-5, dist)
    args = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args)
    got = pb.pyra_merge_backward(*args)
    exp = pyra_merge_backward_reference(*args)
    for i, (g, e) in enumerate(zip(got, exp)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g, e, atol=1e-5 * scale, rtol=1e-4, msg=lambda msg: f"grad {i}: {msg}")
    for g, h in zip(got, pb.pyra_merge_backward(*args)):
        assert torch.equal(g, h)


@needs_triton
@pytest.mark.slow
def test_vit_l14_448_sizes():
    """The largest shapes the issue names: N = 1025 tokens (32 x 32 + class), C = 1280, D = 128."""
    n, c, d = 1025, 1280, 128
    x, metric = gen(1, n, c, seed=1).to(DEVICE), gen(1, n, d, seed=2).to(DEVICE)
    out, osz, m = tome_merge_reference(x, metric, 300, None, True, False)
    _check(tome_triton.tome_merge(x, metric, 300, None, True, False), (out, osz) + tuple(m), what="tome N=1025")
    h, w = resolve_grid(n, 1)
    _check(fpet_triton.fpet_merge(x, metric, None, 1, h, w), fpet_merge_reference(x, metric, None, 1, h, w),
           what="fpet N=1025")


class _Launches:
    """Counts kernel launches (``kernel[grid](...)``) of the Triton modules."""

    def __init__(self, monkeypatch):
        self.names = []
        from fpet_kernels.ops import fpet_triton_backward
        for mod in (tome_triton, pyra_triton, fpet_triton, fpet_triton_backward):
            for name in dir(mod):
                if name.startswith("_") and name.endswith("_kernel"):
                    monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, kernel):
        log = self.names

        class Counted:
            def __getitem__(self, grid):
                log.append(name)
                return kernel[grid]
        return Counted()

    def take(self):
        out, self.names[:] = list(self.names), []
        return out


@needs_triton
def test_one_launch_per_op_call(monkeypatch):
    """tome_merge, pyra_merge and fpet_merge forward are ONE launch; unmerge one; FPET backward four
    (norms and g_den; scores; metric gradient; x gradient: fpet_triton_backward.py)."""
    launches = _Launches(monkeypatch)
    bsz, n, c, d = 2, 65, 64, 32
    x, metric, size = gen(bsz, n, c).to(DEVICE), gen(bsz, n, d, seed=1).to(DEVICE), gen_size(bsz, n).to(DEVICE)
    y, _, m = fk.tome_merge(x, metric, 8, size, True, backend="triton")
    assert launches.take() == ["_tome_merge_kernel"]
    fk.unmerge(y, m, backend="triton")
    assert launches.take() == ["_gather_kernel"]
    a, b, lw, lb = torch.zeros(8, 1), torch.ones(1, c), torch.ones(c), torch.zeros(c)
    fk.pyra_merge(x, metric, 8, *(t.to(DEVICE) for t in (a, b, lw, lb)), size, True, backend="triton")
    assert launches.take() == ["_tome_merge_kernel"]
    fk.fpet_merge(x, metric, size, True, backend="triton")
    assert launches.take() == ["_fpet_merge_kernel"]
    xg, mg = x.clone().requires_grad_(), metric.clone().requires_grad_()
    out, _ = fk.fpet_merge(xg, mg, size, True, backend="triton")
    launches.take()
    out.sum().backward()
    assert launches.take() == ["_fpet_bwd_prep_kernel", "_fpet_bwd_scores_kernel", "_fpet_bwd_metric_kernel",
                               "_fpet_bwd_x_kernel"]


@needs_triton
def test_environment_variable_selects_triton(monkeypatch):
    launches = _Launches(monkeypatch)
    monkeypatch.setenv("FPET_BACKEND", "triton")
    x, metric = gen(1, 37, 64).to(DEVICE), gen(1, 37, 32, seed=1).to(DEVICE)
    fk.tome_merge(x, metric, 4, class_token=True)
    assert launches.take() == ["_tome_merge_kernel"]


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    """Without TRITON_INTERPRET=1 the triton backend refuses CPU tensors, naming the argument."""
    if not LIVE:
        pytest.skip("triton backend not live")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, metric = gen(1, 37, 64), gen(1, 37, 32, seed=1)
    with pytest.raises(ValueError, match="backend='triton' runs on cuda tensors"):
        fk.tome_merge(x, metric, 4, backend="triton")
