"""Phases (block-wide barriers, ``blk.each``) per call of the CUDA merge forwards, counted by the SIMT
emulator (``torch.ops.fpet_simt.phase_count()``: [most phases of one block, blocks] of the last launch).

At ViT-B/16 (N = 197, D = 64) the ToMe / PYRA / FPET forward bodies used ~110 barriers per call
(``simt::row_sums`` two phases per 8 rows: 50 for the norms; three per 32 x 32 score tile: 48; a
9-phase scan); staged matching (csrc/cuda/tiles.cuh) brings them to at most 20. The counts are
printed (``pytest -s``). With less shared memory the rows are staged in panels: more phases, the
same results bit for bit.
"""
import pytest
import torch

from helpers import gen, gen_size

CPU = torch.ops.fpet
MAX_PHASES = 20
N, D = 197, 64  # ViT-B/16 at 224: 196 patches + class token; metric = keys averaged over heads


def _vitb(c=96, bsz=2, dtype=torch.float32):
    x = gen(bsz, N, c, dtype=dtype, seed=3)
    metric = gen(bsz, N, D, dtype=dtype, seed=4)
    return x, metric, gen_size(bsz, N)


def _pyra_params(r, c):
    return (0.5 * gen(r, 1, seed=5), 0.2 * gen(1, c, seed=6), 1 + 0.1 * gen(c, seed=7), 0.1 * gen(c, seed=8))


def _calls(S):
    """(name, call) of every merge forward at ViT-B/16 shapes on the ops namespace S."""
    x, metric, size = _vitb()
    params = _pyra_params(16, x.shape[-1])
    return [
        ("tome_merge r=16", lambda: S.tome_merge(x, metric, 16, size, True, False)),
        ("tome_match r=16", lambda: S.tome_match(metric, 16, True, False)),
        ("pyra_merge r=16", lambda: S.pyra_merge(x, metric, 16, *params, size, True, False, 1e-5)),
        ("fpet_merge", lambda: S.fpet_merge(x, metric, size, 1, 14, 14)),
    ]


def _same(got, exp):
    for i, (g, e) in enumerate(zip(got, exp)):
        if e.dtype == torch.int64:
            assert torch.equal(g, e), f"output {i}: indices differ"
        else:
            torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)


def test_merge_forwards_take_at_most_20_phases(simt_ops, capsys):
    """ToMe, ToMe's matching, PYRA and FPET at N = 197, D = 64 (256 threads): at most 20 phases per
    block and one launch; the results agree with the CPU kernels."""
    simt_ops.configure(0, 256, 4)
    counts = {}
    for (name, call), (_, cpu_call) in zip(_calls(simt_ops), _calls(CPU)):
        got = call()
        phases, blocks = simt_ops.phase_count()
        counts[name] = phases
        assert blocks >= 2, (name, blocks)  # one block per image (and channel slice)
        _same(got, cpu_call())
    with capsys.disabled():
        print("\nphases per block at N=197 D=64 (was ~110): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for name, phases in counts.items():
        assert 0 < phases <= MAX_PHASES, f"{name}: {phases} phases per call (at most {MAX_PHASES})"


@pytest.mark.parametrize("smem", [24 * 1024, 40 * 1024], ids=["24k", "40k"])
def test_panels_when_rows_do_not_fit(simt_ops, smem):
    """Shared memory too small for every staged row: the rows go in panels (more phases), and every
    output is bit for bit what the one-panel run gives, in both thread orders."""
    simt_ops.configure(0, 256, 4)
    calls = _calls(simt_ops)
    full, full_phases = [], []
    for _, call in calls:
        full.append(call())
        full_phases.append(simt_ops.phase_count()[0])
    for order in (0, 1):
        simt_ops.configure(order, 256, 4, smem)
        for (name, call), exp, n_full in zip(calls, full, full_phases):
            got = call()
            phases = simt_ops.phase_count()[0]
            assert phases > n_full, f"{name}: {phases} phases with {smem} bytes, {n_full} with all rows staged"
            for i, (g, e) in enumerate(zip(got, exp)):
                assert torch.equal(g, e), f"{name} output {i} differs with panels (order {order})"


def test_shape_too_large_for_shared_memory_says_so(simt_ops):
    """A metric too wide for even one staged row of A and of B: a clear error naming N and D."""
    simt_ops.configure(0, 256, 4, 8 * 1024)
    x, metric = gen(1, 20, 8), gen(1, 20, 4096)
    with pytest.raises(RuntimeError, match=r"N = 20 tokens with a metric of D = 4096 channels need more shared"):
        simt_ops.tome_merge(x, metric, 4, None, True, False)
    with pytest.raises(RuntimeError, match=r"N = 17 tokens with a metric of D = 4096 channels need more shared"):
        simt_ops.fpet_merge(gen(1, 17, 8), gen(1, 17, 4096), None, 1, 4, 4)
