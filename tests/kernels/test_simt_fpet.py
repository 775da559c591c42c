"""The FPET CUDA kernels (csrc/cuda/fpet_merge.cuh) run on the host by the SIMT emulator
(``torch.ops.fpet_simt``, csrc/emu/), compared with the CPU kernels (``torch.ops.fpet``, checked
against the spec elsewhere): forward and straight-through backward, every dtype, prefix tokens,
odd grids, tied rows, both thread orders (a race shows as a differing result), fewer threads per
block, and a small multiprocessor count so that the forward's channel split is exercised."""
import pytest
import torch

from helpers import gen, gen_size

from fpet_kernels.ops.fpet import checkerboard, grid_sizes


# (order, threads): forward and reverse thread order, full and small blocks; sms=4 everywhere
CONFIGS = [pytest.param(0, 256, id="fwd256"), pytest.param(1, 256, id="rev256"),
           pytest.param(0, 64, id="fwd64"), pytest.param(1, 64, id="rev64")]

# (B, num_prefix, H, W, C, D)
SHAPES = [
    pytest.param(2, 0, 4, 4, 40, 16, id="p0-4x4"),
    pytest.param(2, 1, 5, 7, 72, 24, id="p1-5x7"),
    pytest.param(1, 2, 6, 5, 33, 8, id="p2-6x5"),
    pytest.param(1, 1, 3, 1, 20, 5, id="p1-3x1"),
    pytest.param(2, 1, 14, 14, 64, 64, id="p1-14x14"),
]

TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"),
          pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def configure(simt_ops):
    """Sets the emulator's thread order / block size / multiprocessors (conftest.py's ``simt_ops``
    resets them afterwards, and skips or fails when the emulator is missing)."""
    def set_(order, threads, sms=4):
        simt_ops.configure(order, threads, sms)
    return set_


def _inputs(B, p, H, W, C, D, dtype, mdtype, sdtype, ties, seed=0):
    N = p + H * W
    x = gen(B, N, C, dtype=torch.float32, seed=seed)
    metric = gen(B, N, D, dtype=torch.float32, seed=seed + 1)
    if ties:
        # A rows whose two best B columns are exact duplicates (a tie: no match), duplicate A rows
        # (two sources of one destination), and a B row that attracts several A rows.
        a_idx, b_idx = checkerboard(p, H, W)
        grid_b = b_idx[p:]
        if len(grid_b) >= 2:
            b1, b2 = grid_b[0], grid_b[-1]
            metric[:, b2] = metric[:, b1]
            for k, i in enumerate(a_idx[: max(1, len(a_idx) // 3)]):
                metric[:, i] = metric[:, b1] + 1e-2 * gen(B, D, seed=seed + 10 + k)
            if len(a_idx) >= 4:
                metric[:, a_idx[-1]] = metric[:, a_idx[-2]]
                metric[:, a_idx[-3]] = metric[:, grid_b[len(grid_b) // 2]] + 0.1 * gen(B, D, seed=seed + 99)
    size = None if sdtype is None else gen_size(B, N, dtype=sdtype, seed=seed + 2)
    return x.to(dtype), metric.to(mdtype), size


def _check_forward(got, exp, dtype, what):
    out, out_size, tmap = got
    eout, eout_size, etmap = exp
    assert torch.equal(tmap, etmap), f"{what}: token_map differs"
    assert out.dtype == eout.dtype and out_size.dtype == torch.float32
    assert out.shape == eout.shape and out_size.shape == eout_size.shape
    torch.testing.assert_close(out_size, eout_size, atol=1e-6, rtol=1e-6, msg=lambda m: f"{what} out_size: {m}")
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(out.float(), eout.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} out: {m}")


def _check_backward(got, exp, dtype, mdtype, what):
    gx, gm, gs = got
    egx, egm, egs = exp
    assert gx.dtype == egx.dtype and gm.dtype == egm.dtype and gs.dtype == torch.float32
    assert gx.shape == egx.shape and gm.shape == egm.shape and gs.shape == egs.shape
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(gx.float(), egx.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what} grad_x: {m}")
    torch.testing.assert_close(gs, egs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} grad_size: {m}")
    # grad_metric: a sum of many products with cancellations (dS's row sums, <n, dn>); float32
    # results differ by the order of the sums only, the last bits of the metric dtype otherwise.
    matol, mrtol = (1e-5, 1e-5) if mdtype == torch.float32 else TOLS[mdtype]
    scale = max(1.0, egm.float().abs().max().item())
    torch.testing.assert_close(gm.float(), egm.float(), atol=matol * scale, rtol=mrtol,
                               msg=lambda m: f"{what} grad_metric: {m}")


def _run_both(B, p, H, W, C, D, dtype, mdtype, sdtype, ties, grad_size, what, seed=0):
    x, metric, size = _inputs(B, p, H, W, C, D, dtype, mdtype, sdtype, ties, seed=seed)
    exp = torch.ops.fpet.fpet_merge(x, metric, size, p, H, W)
    got = torch.ops.fpet_simt.fpet_merge(x, metric, size, p, H, W)
    _check_forward(got, exp, dtype, what)
    out, out_size, tmap = exp
    grad_out = gen(*out.shape, seed=seed + 5).to(dtype)
    gsz = gen(*out_size.shape, seed=seed + 6) if grad_size else None
    args = (grad_out, gsz, x, metric, size, out, out_size, tmap, p, H, W)
    _check_backward(torch.ops.fpet_simt.fpet_merge_backward(*args), torch.ops.fpet.fpet_merge_backward(*args),
                    dtype, mdtype, what + " backward")
    return tmap


@pytest.mark.parametrize("order,threads", CONFIGS)
@pytest.mark.parametrize("B,p,H,W,C,D", SHAPES)
def test_fpet_shapes_and_orders(configure, order, threads, B, p, H, W, C, D):
    configure(order, threads)
    _run_both(B, p, H, W, C, D, torch.float32, torch.float32, torch.float32, ties=False, grad_size=True,
              what=f"order={order} threads={threads}")


@pytest.mark.parametrize("order,threads", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fpet_dtypes_and_ties(configure, order, threads, dtype):
    """x in every dtype; metric and size in the others (mixed dtypes, AnyPtr); tied and duplicate rows."""
    configure(order, threads)
    others = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d != dtype]
    tmap = _run_both(2, 1, 6, 7, 48, 16, dtype, others[0], others[1], ties=True, grad_size=False,
                     what=f"{dtype} order={order} threads={threads}")
    a_idx, _ = checkerboard(1, 6, 7)
    assert (tmap[:, a_idx] == -1).any(), "the tied rows must produce unmatched A tokens"
    counts = torch.stack([torch.bincount(r[r >= 0], minlength=1).max() for r in tmap[:, a_idx]])
    assert (counts >= 2).all(), "some destination must receive several sources"


@pytest.mark.parametrize("grad_size", [False, True], ids=["no_gsize", "gsize"])
@pytest.mark.parametrize("with_size", [False, True], ids=["no_size", "size"])
def test_fpet_optional_sizes(configure, with_size, grad_size):
    configure(1, 256)
    _run_both(2, 2, 5, 6, 40, 12, torch.float16, torch.float16, torch.float16 if with_size else None, ties=True,
              grad_size=grad_size, what=f"size={with_size} grad_size={grad_size}")


@pytest.mark.parametrize("sms", [1, 4, 64])
def test_fpet_channel_split(configure, sms):
    """One image, C = 200: 1 to 7 channel slices (slice 0 writes token_map and out_size)."""
    configure(0, 128, sms)
    _run_both(1, 1, 7, 7, 200, 20, torch.bfloat16, torch.float32, torch.float32, ties=True, grad_size=True,
              what=f"sms={sms}")


def test_fpet_large(configure):
    """N = 1025 (32 x 32 grid + 1 prefix), D = 128: the shared-memory layout at ViT-L-like sizes."""
    configure(1, 256)
    na, nb = grid_sizes(1, 32, 32)
    assert (na, nb) == (512, 513)
    _run_both(1, 1, 32, 32, 64, 128, torch.float32, torch.float32, torch.float32, ties=True, grad_size=True,
              what="N=1025")


def test_fpet_noncontiguous(configure):
    configure(0, 256)
    x = gen(2, 31, 24)
    metric = gen(2, 12, 31).transpose(1, 2)
    exp = torch.ops.fpet.fpet_merge(x[..., ::2], metric, None, 1, 5, 6)
    got = torch.ops.fpet_simt.fpet_merge(x[..., ::2], metric, None, 1, 5, 6)
    _check_forward(got, exp, torch.float32, "non-contiguous")


def test_fpet_argument_errors(simt_ops):
    x, metric = gen(1, 17, 8), gen(1, 17, 4)
    with pytest.raises(RuntimeError, match="fpet_merge: grid does not match"):
        torch.ops.fpet_simt.fpet_merge(x, metric, None, 1, 4, 3)
    with pytest.raises(RuntimeError, match="fpet_merge: metric must be"):
        torch.ops.fpet_simt.fpet_merge(x, metric[:, :16], None, 1, 4, 4)
    with pytest.raises(RuntimeError, match="fpet_merge: size must have shape"):
        torch.ops.fpet_simt.fpet_merge(x, metric, torch.ones(1, 16, 1), 1, 4, 4)
    with pytest.raises(RuntimeError, match="fpet_merge: x must be float32, float16 or bfloat16"):
        torch.ops.fpet_simt.fpet_merge(x.double(), metric, None, 1, 4, 4)
    out, out_size, tmap = torch.ops.fpet.fpet_merge(x, metric, None, 1, 4, 4)
    bw = torch.ops.fpet_simt.fpet_merge_backward
    with pytest.raises(RuntimeError, match="fpet_merge_backward: token_map must be an int64"):
        bw(out, None, x, metric, None, out, out_size, tmap.int(), 1, 4, 4)
    with pytest.raises(RuntimeError, match="fpet_merge_backward: grad_out must have shape"):
        bw(out[:, 1:], None, x, metric, None, out, out_size, tmap, 1, 4, 4)
    with pytest.raises(RuntimeError, match="fpet_merge_backward: grad_size must have shape"):
        bw(out, torch.ones(1, 3, 1), x, metric, None, out, out_size, tmap, 1, 4, 4)
    with pytest.raises(RuntimeError, match="fpet_merge_backward: out_size must have shape"):
        bw(out, None, x, metric, None, out, out_size[:, 1:], tmap, 1, 4, 4)


def test_fpet_prefix_only_layout_is_rejected():
    """H, W <= 0 is not a grid (docs/semantics.md): the launchers reject it, naming H."""
    x, metric = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="H, W must be in"):
        torch.ops.fpet_simt.fpet_merge(x, metric, None, 3, 0, 0)


@pytest.mark.parametrize("p,H,W", [(0, 1, 1), (1, 1, 2), (0, 2, 1), (2, 1, 3)],
                         ids=["1x1", "p1-1x2", "2x1", "p2-1x3"])
def test_fpet_degenerate_grids(configure, p, H, W):
    """No A tokens, no B tokens, a single B column, W == 1 (no odd columns)."""
    configure(1, 64)
    _run_both(2, p, H, W, 36, 6, torch.float32, torch.float32, torch.float32, ties=False, grad_size=True,
              what=f"p={p} {H}x{W}")
