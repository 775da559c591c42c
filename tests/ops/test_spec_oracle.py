"""fk.reference and the public ops (every live backend) against the naive spec oracle on tiny inputs."""
from __future__ import annotations

import pytest
import torch

import fpet_kernels as fk
import spec_oracle as so
from helpers import TOKEN_FLAGS, gen, gen_size

TINY_N = [7, 8, 13, 17, 1, 2, 3]
R_KINDS = ["0", "1", "2", "cap", "over"]
B, C, D = 2, 5, 4
F32 = dict(atol=1e-5, rtol=1e-5)
F64 = dict(atol=1e-12, rtol=1e-12)


def _r(kind, n, cls, dist):
    cap = max(0, (n - int(cls) - int(dist)) // 2)
    return {"0": 0, "1": 1, "2": 2, "cap": cap, "over": cap + 3}[kind]


def run_all_r(check):
    """Run ``check(kind)`` for every r kind and report every failing one (one failure does not hide the others)."""
    failures = []
    for kind in R_KINDS:
        try:
            check(kind)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(f"r={kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def _inputs(n, seed, dtype=torch.float32, with_size=False):
    x = gen(B, n, C, dtype=dtype, seed=seed)
    metric = gen(B, n, D, dtype=dtype, seed=seed + 100)
    size = gen_size(B, n, dtype=dtype, seed=seed + 200) if with_size else None
    return x, metric, size


# ----------------------------------------------------------------------------------- the oracle itself
def test_oracle_hand_worked_tome():
    """N = 4: A = {0, 2}, B = {1, 3}; position 0 is closest to 1 and 2 to 3, the first pair closer."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.3, 1.0]]])
    x = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    src, dst, unm, r = so.tome_match(metric[0].tolist(), 1)
    assert (src, dst, unm, r) == ([0], [0], [1], 1)
    assert so.tome_merge_rows(x[0].tolist(), src, dst, unm, "mean") == [[10.0], [2.0], [20.0]]
    assert so.tome_merge_rows(x[0].tolist(), src, dst, unm, "sum") == [[10.0], [4.0], [20.0]]
    assert so.tome_merge_rows(x[0].tolist(), src, dst, unm, "amax") == [[10.0], [3.0], [20.0]]
    assert so.tome_token_map(4, src, dst, unm) == [1, 1, 0, 2]
    # the package agrees on the same hand-worked case (a batch of two copies; B == 1 is tested elsewhere)
    metric, x = metric.repeat(2, 1, 1), x.repeat(2, 1, 1)
    m = fk.tome_match(metric, 1, backend="reference")
    assert m.src_idx.tolist() == [[0]] * 2 and m.dst_idx.tolist() == [[0]] * 2 and m.unm_idx.tolist() == [[1]] * 2
    assert m.token_map.tolist() == [[1, 1, 0, 2]] * 2
    out, size, _ = fk.tome_merge(x, metric, 1, backend="reference")
    assert out[0].flatten().tolist() == [10.0, 2.0, 20.0] and size[0].flatten().tolist() == [1.0, 2.0, 1.0]


def test_oracle_hand_worked_distill_order():
    """class + distill tokens: output [unm[0], B[0], unm[1:], B[1:]] (spec 1.7)."""
    # positions 0 (cls) 1 (dist) 2 3 4 5: A = {0, 2, 4}, B = {1, 3, 5}; 4 is closest to 5.
    metric = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0.2, 1.0], [0, 0, 1.0], [0, 0.05, 1.0]])
    src, dst, unm, r = so.tome_match(metric.tolist(), 1, class_token=True, distill_token=True)
    assert (src, dst, unm) == ([2], [2], [0, 1])
    x = [[float(p)] for p in range(6)]
    assert so.tome_merge_rows(x, src, dst, unm, "sum", distill_token=True) == [[0.0], [1.0], [2.0], [3.0], [9.0]]
    assert so.tome_token_map(6, src, dst, unm, distill_token=True) == [0, 1, 2, 3, 4, 4]


def test_oracle_hand_worked_fpet():
    """Grid 2 x 2, no prefix: A = [pos 0 (0,0), pos 3 (1,1)], B = [pos 2 (1,0), pos 1 (0,1)]."""
    assert so.checkerboard(0, 2, 2) == ([0, 3], [2, 1])
    assert so.checkerboard(1, 3, 3) == ([1, 3, 7, 9, 5], [0, 4, 6, 2, 8])
    metric = [[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]]
    match, _, thr, _ = so.fpet_match(metric, 0, 2, 2)
    assert match == [0, 1]  # pos 0 -> B[0] (pos 2), pos 3 -> B[1] (pos 1)
    x = [[1.0], [2.0], [3.0], [4.0]]
    out, size, tmap = so.fpet_merge_rows(x, metric, None, 0, 2, 2)
    assert out == [[2.0], [3.0]] and size == [[2.0], [2.0]] and tmap == [0, 1, 0, 1]
    # equal scores: a tie, the A token matches nothing and is dropped
    match, _, _, _ = so.fpet_match([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]], 0, 2, 2)
    assert match == [-1, -1]
    assert so.fpet_grid(197, 1) == (14, 14) and so.fpet_grid(25, 1) == (6, 4) and so.fpet_grid(37, 1) == (6, 6)


# ----------------------------------------------------------------------------------- ToMe
@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n", TINY_N)
def test_reference_tome_match_equals_oracle(n, cls, dist):
    _, metric, _ = _inputs(n, seed=n)
    for kind in R_KINDS:
        r = _r(kind, n, cls, dist)
        exp = so.tome_match_batch(metric, r, cls, dist)
        for dt in (torch.float32, torch.float64):
            got = fk.reference.tome_match(metric.to(dt), r, cls, dist)
            for name, g, e in zip(("src_idx", "dst_idx", "unm_idx", "token_map"), got, exp):
                assert torch.equal(g, e), f"{name} r={r} {dt}: {g.tolist()} != {e.tolist()}"


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n", TINY_N)
def test_tome_match_and_merge_equal_oracle(backend, n, cls, dist):
    x, metric, size = _inputs(n, seed=10 + n, with_size=True)

    def check(kind):
        r = _r(kind, n, cls, dist)
        exp_out, exp_size, *exp_m = so.tome_merge_batch(x, metric, r, size, cls, dist)
        m = fk.tome_match(metric, r, cls, dist, backend=backend)
        for name, g, e in zip(m._fields, m, exp_m):
            assert torch.equal(g, e), f"tome_match {name} r={r}: {g.tolist()} != {e.tolist()}"
        for sz in (size, None):
            out, out_size, m2 = fk.tome_merge(x, metric, r, sz, cls, dist, backend=backend)
            if sz is None:
                exp_out, exp_size, *_ = so.tome_merge_batch(x, metric, r, None, cls, dist)
            torch.testing.assert_close(out, exp_out.float(), **F32)
            assert out_size.dtype == torch.float32
            torch.testing.assert_close(out_size, exp_size.float(), **F32)
            for name, g, e in zip(m2._fields, m2, exp_m):
                assert torch.equal(g, e), f"tome_merge {name} r={r}"

    run_all_r(check)


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n", TINY_N)
def test_reference_tome_merge_float64_equals_oracle(n, cls, dist):
    x, metric, size = _inputs(n, seed=20 + n, dtype=torch.float64, with_size=True)
    for kind in R_KINDS:
        r = _r(kind, n, cls, dist)
        exp_out, exp_size, *_ = so.tome_merge_batch(x, metric, r, size, cls, dist)
        out, out_size, _ = fk.reference.tome_merge(x, metric, r, size, cls, dist)
        assert out_size.dtype == torch.float64
        torch.testing.assert_close(out, exp_out, **F64)
        torch.testing.assert_close(out_size, exp_size, **F64)


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n", TINY_N)
def test_closures_equal_oracle(backend, n, cls, dist):
    """bipartite_soft_matching's merge (sum/mean/amax), unmerge, merge_wavg and merge_source."""

    def check(kind):
        x, metric, size = _inputs(n, seed=30 + n, with_size=True)
        r = _r(kind, n, cls, dist)
        merge, unmerge = fk.bipartite_soft_matching(metric, r, cls, dist, backend=backend)
        for mode in ("sum", "mean", "amax"):
            exp = so.tome_merge_mode_batch(x, metric, r, mode, cls, dist)
            torch.testing.assert_close(merge(x, mode=mode), exp.float(), **F32, msg=f"mode={mode} r={r}")
        torch.testing.assert_close(merge(x), so.tome_merge_mode_batch(x, metric, r, "mean", cls, dist).float(), **F32)
        y = merge(x, mode="mean")
        torch.testing.assert_close(unmerge(y), so.tome_unmerge_batch(y, metric, r, cls, dist).float(), **F32)
        got = fk.unmerge(y, merge.matching, backend=backend)
        torch.testing.assert_close(got, so.tome_unmerge_batch(y, metric, r, cls, dist).float(), **F32)
        exp_out, exp_size, *_ = so.tome_merge_batch(x, metric, r, size, cls, dist)
        out, out_size = fk.merge_wavg(merge, x, size)
        torch.testing.assert_close(out, exp_out.float(), **F32)
        torch.testing.assert_close(out_size, exp_size.float(), **F32)
        # dense source tracking: identity, then merge(source, "amax")
        per_image = []
        for mi in metric.double().tolist():
            src, dst, unm, _ = so.tome_match(mi, r, cls, dist)
            per_image.append(lambda rows, mode, s=src, d=dst, u=unm: so.tome_merge_rows(rows, s, d, u, mode, dist))
        exp_src = so.dense_source_batch([per_image], n)
        torch.testing.assert_close(fk.merge_source(merge, x), exp_src.float(), **F32)

    run_all_r(check)


def test_two_step_source_equals_oracle(backend):
    """merge_source chained over two merges, against the oracle applying both merges to the identity."""
    n, cls, dist = 17, True, False
    x, m1, _ = _inputs(n, seed=40)
    merge1, _ = fk.bipartite_soft_matching(m1, 4, cls, dist, backend=backend)
    m2 = gen(B, n - 4, D, seed=41)
    merge2, _ = fk.bipartite_soft_matching(m2, 3, cls, dist, backend=backend)
    source = fk.merge_source(merge2, merge1(x), fk.merge_source(merge1, x))
    steps = []
    for metric, r in ((m1, 4), (m2, 3)):
        per = []
        for mi in metric.double().tolist():
            src, dst, unm, _ = so.tome_match(mi, r, cls, dist)
            per.append(lambda rows, mode, s=src, d=dst, u=unm: so.tome_merge_rows(rows, s, d, u, mode, dist))
        steps.append(per)
    torch.testing.assert_close(source, so.dense_source_batch(steps, n).float(), atol=0, rtol=0)


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
def test_tome_ties_follow_spec(backend, cls, dist):
    """Repeated metric rows make exact ties: argmax takes the lowest j, ranks keep lower i first.

    A rows are copies of 3 vectors and B rows copies of 3 others, so tied scores are the same
    dot product computed again (exact ties), and untied scores are far apart."""
    n = 17
    pa, pb = gen(3, D, seed=5), gen(3, D, seed=55)
    pick_a = torch.tensor([[0, 1, 2, 1, 0, 2, 2, 1, 0], [1, 1, 1, 0, 0, 0, 2, 2, 2]])
    pick_b = torch.tensor([[2, 2, 0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 2, 2, 0, 1]])
    metric = torch.empty(2, n, D)
    metric[:, 0::2], metric[:, 1::2] = pa[pick_a], pb[pick_b]
    x = gen(2, n, C, seed=6)
    for r in (1, 3, 5, 8):
        exp = so.tome_match_batch(metric, r, cls, dist)
        got_op = fk.tome_match(metric, r, cls, dist, backend=backend)
        for got in (got_op, fk.reference.tome_match(metric, r, cls, dist)):
            for name, g, e in zip(("src_idx", "dst_idx", "unm_idx", "token_map"), got, exp):
                assert torch.equal(g, e), f"{name} r={r}: {g.tolist()} != {e.tolist()}"
        out, _, _ = fk.tome_merge(x, metric, r, None, cls, dist, backend=backend)
        torch.testing.assert_close(out, so.tome_merge_batch(x, metric, r, None, cls, dist)[0].float(), **F32)


def test_tome_zero_metric_all_ties(backend):
    """All-zero metric: every score is 0 (normalised with an epsilon, no NaN); all ties resolve by index."""
    n = 13
    metric = torch.zeros(B, n, D)
    x = gen(B, n, C, seed=7)
    for cls, dist in ((False, False), (True, False), (True, True)):
        exp = so.tome_match_batch(metric, 4, cls, dist)
        got = fk.tome_match(metric, 4, cls, dist, backend=backend)
        for name, g, e in zip(got._fields, got, exp):
            assert torch.equal(g, e), f"{name}: {g.tolist()} != {e.tolist()}"
        out, size, _ = fk.tome_merge(x, metric, 4, None, cls, dist, backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(size).all()
        torch.testing.assert_close(out, so.tome_merge_batch(x, metric, 4, None, cls, dist)[0].float(), **F32)


# ----------------------------------------------------------------------------------- FPET
FPET_CASES = [  # (N, class_token, distill_token, grid)
    pytest.param(7, True, False, None, id="N7-cls"),
    pytest.param(7, True, False, (2, 3), id="N7-cls-2x3"),
    pytest.param(8, False, False, None, id="N8"),
    pytest.param(8, True, True, None, id="N8-cls+dist"),
    pytest.param(9, False, True, (4, 2), id="N9-dist-4x2"),
    pytest.param(13, True, False, None, id="N13-cls"),
    pytest.param(13, True, False, (3, 4), id="N13-cls-3x4"),
    pytest.param(13, False, False, (1, 13), id="N13-1x13"),
    pytest.param(17, True, False, None, id="N17-cls"),
    pytest.param(17, True, True, None, id="N17-cls+dist"),
    pytest.param(17, False, False, (17, 1), id="N17-17x1"),
    pytest.param(4, False, False, None, id="N4"),
]


@pytest.mark.parametrize("n,cls,dist,grid", FPET_CASES)
def test_fpet_merge_equals_oracle(backend, n, cls, dist, grid):
    x, metric, size = _inputs(n, seed=50 + n, with_size=True)
    for sz in (None, size):
        exp_out, exp_size, exp_map = so.fpet_merge_batch(x, metric, sz, cls, dist, grid)
        out, out_size, tmap = fk.fpet_merge(x, metric, sz, cls, dist, grid, backend=backend, return_token_map=True)
        torch.testing.assert_close(out, exp_out.float(), **F32)
        assert out_size.dtype == torch.float32
        torch.testing.assert_close(out_size, exp_size.float(), **F32)
        assert torch.equal(tmap, exp_map), f"{tmap.tolist()} != {exp_map.tolist()}"
        ref_out, ref_size = fk.reference.fpet_merge(x.double(), metric.double(), None if sz is None else sz.double(),
                                                    cls, dist, grid)
        torch.testing.assert_close(ref_out, exp_out, **F64)
        torch.testing.assert_close(ref_size, exp_size, **F64)


@pytest.mark.parametrize("n,cls,dist,grid", FPET_CASES)
def test_fpet_closure_equals_oracle(backend, n, cls, dist, grid):
    x, metric, size = _inputs(n, seed=60 + n, with_size=True)
    p = int(cls) + int(dist)
    h, w = so.fpet_grid(n, p, grid)
    merge = fk.bipartite_diff_matching(metric, cls, dist, grid, backend=backend)
    xl, ml = x.double().tolist(), metric.double().tolist()
    for mode in ("sum", "mean", "amax"):
        exp = torch.tensor([so.fpet_merge_mode_rows(xi, mi, p, h, w, mode) for xi, mi in zip(xl, ml)])
        torch.testing.assert_close(merge(x, mode=mode), exp.float(), **F32, msg=f"mode={mode}")
    exp_out, exp_size, _ = so.fpet_merge_batch(x, metric, size, cls, dist, grid)
    out, out_size = fk.merge_wavg(merge, x, size)
    torch.testing.assert_close(out, exp_out.float(), **F32)
    torch.testing.assert_close(out_size, exp_size.float(), **F32)
    per = [lambda rows, mode, mi=mi: so.fpet_merge_mode_rows(rows, mi, p, h, w, mode) for mi in ml]
    torch.testing.assert_close(fk.merge_source(merge, x), so.dense_source_batch([per], n).float(), atol=0, rtol=0)


@pytest.mark.parametrize("n,cls,dist,grid", [
    (1, False, False, None), (2, False, False, None), (3, False, False, None), (3, True, False, None),
    (7, False, False, None), (13, False, False, None), (17, False, False, None), (13, True, False, (4, 4)),
])
def test_fpet_bad_grid_raises_like_oracle(n, cls, dist, grid):
    """Token counts that form no valid grid (or fewer than 2 destination cells) raise, never split silently."""
    x, metric, _ = _inputs(n, seed=70)
    with pytest.raises(ValueError, match=r"grid|N|token"):
        fk.fpet_merge(x, metric, None, cls, dist, grid, backend="reference")
    with pytest.raises(ValueError, match=r"grid|N|token"):
        fk.bipartite_diff_matching(metric, cls, dist, grid)
    p = int(cls) + int(dist)
    try:
        h, w = so.fpet_grid(n, p, grid)
    except ValueError:
        return
    nb = len(so.checkerboard(p, h, w)[1]) - p
    assert nb < 2  # a grid the oracle accepts, rejected for having fewer than 2 destination cells


def test_fpet_ties_drop_the_token(backend):
    """A row whose two best scores are equal matches nothing: its token is dropped (token_map -1)."""
    n, p, h, w = 10, 1, 3, 3
    protos = gen(4, D, seed=8)
    metric = protos[torch.tensor([[3, 0, 1, 2, 0, 1, 0, 2, 1, 0], [3, 0, 0, 1, 2, 1, 0, 2, 1, 1]])]
    x = gen(2, n, C, seed=9)
    exp_out, exp_size, exp_map = so.fpet_merge_batch(x, metric, None, True, False, (h, w))
    assert (exp_map == -1).any()  # the construction does produce ties
    out, out_size, tmap = fk.fpet_merge(x, metric, None, True, False, (h, w), backend=backend, return_token_map=True)
    assert torch.equal(tmap, exp_map), f"{tmap.tolist()} != {exp_map.tolist()}"
    torch.testing.assert_close(out, exp_out.float(), **F32)
    torch.testing.assert_close(out_size, exp_size.float(), **F32)


def test_fpet_zero_metric(backend):
    """Zero metric: all scores tie, every A token is dropped, the output is x_B; no NaN."""
    n = 17
    x, _, size = _inputs(n, seed=11, with_size=True)
    metric = torch.zeros(B, n, D)
    exp_out, exp_size, exp_map = so.fpet_merge_batch(x, metric, size, True, False)
    out, out_size, tmap = fk.fpet_merge(x, metric, size, True, False, backend=backend, return_token_map=True)
    assert torch.isfinite(out).all()
    assert torch.equal(tmap, exp_map)
    torch.testing.assert_close(out, exp_out.float(), **F32)
    torch.testing.assert_close(out_size, exp_size.float(), **F32)


# ----------------------------------------------------------------------------------- PYRA
def _pyra_params(r, c, seed, dtype=torch.float32):
    a = gen(r, 1, seed=seed, dtype=dtype)
    b = gen(1, c, seed=seed + 1, dtype=dtype)
    lw = 1 + 0.3 * gen(c, seed=seed + 2, dtype=dtype)
    lb = 0.2 * gen(c, seed=seed + 3, dtype=dtype)
    return a, b, lw, lb


@pytest.mark.parametrize("cls,dist", TOKEN_FLAGS)
@pytest.mark.parametrize("n", TINY_N)
def test_pyra_merge_equals_oracle(backend, n, cls, dist):
    x, metric, size = _inputs(n, seed=80 + n, with_size=True)

    def check(kind):
        r = _r(kind, n, cls, dist)
        a, b, lw, lb = _pyra_params(r, C, seed=r)
        for sz in (None, size):
            exp_out, exp_size = so.pyra_merge_batch(x, metric, r, a, b, lw, lb, sz, cls, dist)
            out, out_size = fk.pyra_merge(x, metric, r, a, b, lw, lb, sz, cls, dist, backend=backend)
            torch.testing.assert_close(out, exp_out.float(), atol=2e-5, rtol=2e-5, msg=lambda m: f"r={r}: {m}")
            assert out_size.dtype == torch.float32
            torch.testing.assert_close(out_size, exp_size.float(), **F32)
        x64, m64, s64, a64, b64, lw64, lb64 = (t.double() for t in (x, metric, size, a, b, lw, lb))
        exp_out, exp_size = so.pyra_merge_batch(x64, m64, r, a64, b64, lw64, lb64, s64, cls, dist, eps=1e-3)
        ref_out, ref_size = fk.reference.pyra_merge(x64, m64, r, a64, b64, lw64, lb64, s64, cls, dist, eps=1e-3)
        torch.testing.assert_close(ref_out, exp_out, **F64)
        torch.testing.assert_close(ref_size, exp_size, **F64)

    run_all_r(check)
