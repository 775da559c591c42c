"""A deliberately naive oracle of the token-merging spec (/work/shared/spec/token_merging.md).

Written from the spec text only, one image and one row at a time with Python loops and Python
floats (float64). It imports nothing from fpet_kernels. Tiny shapes only (N <= ~40).

Every function takes and returns nested Python lists for one image, except the ``*_batch``
wrappers, which take torch tensors ``[B, N, ...]`` and return float64 / int64 tensors.
"""
from __future__ import annotations

import math

import torch

NEG_INF = -math.inf
NORM_EPS = 1e-12  # the "small epsilon" of spec section 5: m / max(||m||, eps)


# ----------------------------------------------------------------------------------- helpers
def _normalise(row):
    norm = math.sqrt(sum(v * v for v in row))
    d = max(norm, NORM_EPS)
    return [v / d for v in row]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _sigmoid(v):
    if v == NEG_INF:
        return 0.0
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


def _add(u, v):
    return [a + b for a, b in zip(u, v)]


def _scale(u, k):
    return [a * k for a in u]


def cap_r(r, n, class_token, distill_token):
    """Spec 1.1, and no merges when the distillation token is the only B token (it is never a
    destination; docs/semantics.md)."""
    if n // 2 - int(distill_token) <= 0:
        return 0
    return max(0, min(r, (n - int(class_token) - int(distill_token)) // 2))


# ----------------------------------------------------------------------------------- ToMe
def tome_match(metric, r, class_token=False, distill_token=False):
    """Spec 1.1-1.6 for one image. ``metric``: N lists of D floats.

    Returns (src, dst, unm, r_eff) as Python lists of ints (A indices for src/unm, B indices for dst)."""
    n = len(metric)
    r = cap_r(r, n, class_token, distill_token)
    a_rows = [_normalise(metric[p]) for p in range(0, n, 2)]
    b_rows = [_normalise(metric[p]) for p in range(1, n, 2)]
    na, nb = len(a_rows), len(b_rows)
    if r <= 0:
        return [], [], list(range(na)), 0
    best, dst = [], []
    for i in range(na):
        best_i, dst_i = NEG_INF, 0
        for j in range(nb):
            if (class_token and i == 0) or (distill_token and j == 0):
                s = NEG_INF
            else:
                s = _dot(a_rows[i], b_rows[j])
            if s > best_i:  # strictly greater: the lowest j wins a tie
                best_i, dst_i = s, j
        best.append(best_i)
        dst.append(dst_i)
    # rank by best descending, ties: lower i first (insertion sort, stable by construction)
    rank = []
    for i in range(na):
        k = len(rank)
        while k > 0 and best[rank[k - 1]] < best[i]:
            k -= 1
        rank.insert(k, i)
    src = rank[:r]
    unm = rank[r:]
    if class_token:
        unm = sorted(unm)
    return src, [dst[i] for i in src], unm, r


def tome_layout(na, nb, r, distill_token):
    """Output order of spec 1.7 as labels ('u', k) (k-th unmerged slot) and ('b', j) (B row j)."""
    unm = [("u", k) for k in range(na - r)]
    b = [("b", j) for j in range(nb)]
    if distill_token:
        return unm[:1] + b[:1] + unm[1:] + b[1:]
    return unm + b


def tome_merge_rows(x, src, dst, unm, mode="mean", distill_token=False):
    """Spec 1.7 for one image: ``x`` N lists of C floats -> N - r lists."""
    r = len(src)
    if r == 0:
        return [list(row) for row in x]
    a_rows, b_rows = x[0::2], x[1::2]
    na, nb = len(a_rows), len(b_rows)
    out_b = []
    for j in range(nb):
        group = [b_rows[j]] + [a_rows[src[k]] for k in range(r) if dst[k] == j]
        if mode == "sum":
            row = [sum(col) for col in zip(*group)]
        elif mode == "mean":
            row = [sum(col) / len(group) for col in zip(*group)]
        elif mode == "amax":
            row = [max(col) for col in zip(*group)]
        else:
            raise ValueError(mode)
        out_b.append(row)
    out = []
    for kind, k in tome_layout(na, nb, r, distill_token):
        out.append(list(a_rows[unm[k]]) if kind == "u" else out_b[k])
    return out


def tome_token_map(n, src, dst, unm, distill_token=False):
    """Spec 1.10 compact form: for every input position, the output row that holds it."""
    r = len(src)
    if r == 0:
        return list(range(n))
    na, nb = (n + 1) // 2, n // 2
    where = {lab: row for row, lab in enumerate(tome_layout(na, nb, r, distill_token))}
    tmap = [None] * n
    for j in range(nb):
        tmap[2 * j + 1] = where[("b", j)]
    for k, i in enumerate(unm):
        tmap[2 * i] = where[("u", k)]
    for k, i in enumerate(src):
        tmap[2 * i] = where[("b", dst[k])]
    assert all(v is not None for v in tmap)
    return tmap


def tome_unmerge_rows(y, n, src, dst, unm, distill_token=False):
    """Spec 1.8: odd positions get their B rows, unmerged A positions their rows, sources the row
    of the B token they merged into."""
    r = len(src)
    if r == 0:
        return [list(row) for row in y]
    na, nb = (n + 1) // 2, n // 2
    where = {lab: row for row, lab in enumerate(tome_layout(na, nb, r, distill_token))}
    out = [None] * n
    for j in range(nb):
        out[2 * j + 1] = list(y[where[("b", j)]])
    for k, i in enumerate(unm):
        out[2 * i] = list(y[where[("u", k)]])
    for k, i in enumerate(src):
        out[2 * i] = list(y[where[("b", dst[k])]])
    return out


def merge_wavg_rows(merge, x, size=None):
    """Spec 1.9 with any one-image ``merge(rows, mode)``: (x', size')."""
    s = [[1.0] for _ in x] if size is None else [list(v) for v in size]
    num = merge([_scale(row, sv[0]) for row, sv in zip(x, s)], "sum")
    den = merge(s, "sum")
    return [_scale(row, 1.0 / d[0]) for row, d in zip(num, den)], den


# ----------------------------------------------------------------------------------- FPET
def fpet_grid(n, num_prefix, grid=None):
    """Spec 2.1; raises ValueError when the tokens do not form the grid."""
    m = n - num_prefix
    if grid is None:
        if m == 196:
            return 14, 14
        if m <= 0:
            raise ValueError("no grid tokens")
        w = math.isqrt(m)
        if m % w:
            raise ValueError(f"{m} tokens do not split with W = {w}")
        return m // w, w
    h, w = grid
    if h * w != m:
        raise ValueError(f"grid {grid} does not hold {m} tokens")
    return h, w


def checkerboard(num_prefix, h, w):
    """Spec 2.2: the positions of set A and set B."""
    pos = lambda hh, ww: num_prefix + hh * w + ww  # noqa: E731
    a = [pos(hh, ww) for hh in range(h) for ww in range(w) if hh % 2 == 0 and ww % 2 == 0]
    a += [pos(hh, ww) for hh in range(h) for ww in range(w) if hh % 2 == 1 and ww % 2 == 1]
    b = list(range(num_prefix))
    b += [pos(hh, ww) for hh in range(h) for ww in range(w) if hh % 2 == 1 and ww % 2 == 0]
    b += [pos(hh, ww) for hh in range(h) for ww in range(w) if hh % 2 == 0 and ww % 2 == 1]
    return a, b


def fpet_match(metric, num_prefix, h, w):
    """Spec 2.3-2.4 forward for one image: per A row its matched B index or -1 (a tie), the
    scores, the thresholds t and the soft matrix."""
    a_pos, b_pos = checkerboard(num_prefix, h, w)
    mn = [_normalise(row) for row in metric]
    scores, soft, match, thr = [], [], [], []
    for pa in a_pos:
        row = [NEG_INF if j < num_prefix else _dot(mn[pa], mn[pb]) for j, pb in enumerate(b_pos)]
        top = sorted(row, reverse=True)
        t = (top[0] + top[1]) / 2
        srow = [_sigmoid(v - t) for v in row]
        hard = [j for j, v in enumerate(srow) if v > 0.5]
        assert len(hard) <= 1
        scores.append(row)
        soft.append(srow)
        thr.append(t)
        match.append(hard[0] if hard else -1)
    return match, scores, thr, soft


def fpet_merge_rows(x, metric, size, num_prefix, h, w):
    """Spec 2.5 merge_wavg for one image: (x' in B order, size', token_map)."""
    a_pos, b_pos = checkerboard(num_prefix, h, w)
    match, _, _, _ = fpet_match(metric, num_prefix, h, w)
    s = [1.0] * len(x) if size is None else [v[0] for v in size]
    out, out_size = [], []
    for j, pb in enumerate(b_pos):
        num = _scale(x[pb], s[pb])
        den = s[pb]
        for i, pa in enumerate(a_pos):
            if match[i] == j:
                num = _add(num, _scale(x[pa], s[pa]))
                den += s[pa]
        out.append(_scale(num, 1.0 / den))
        out_size.append([den])
    tmap = [None] * len(x)
    for j, pb in enumerate(b_pos):
        tmap[pb] = j
    for i, pa in enumerate(a_pos):
        tmap[pa] = match[i]
    return out, out_size, tmap


def fpet_merge_mode_rows(x, metric, num_prefix, h, w, mode):
    """The FPET closure ``merge(x, mode)`` with the forward (hard) matching: sum / mean / amax."""
    a_pos, b_pos = checkerboard(num_prefix, h, w)
    match, _, _, _ = fpet_match(metric, num_prefix, h, w)
    out = []
    for j, pb in enumerate(b_pos):
        group = [x[pb]] + [x[pa] for i, pa in enumerate(a_pos) if match[i] == j]
        if mode == "sum":
            out.append([sum(col) for col in zip(*group)])
        elif mode == "mean":
            out.append([sum(col) / len(group) for col in zip(*group)])
        else:
            out.append([max(col) for col in zip(*group)])
    return out


# ----------------------------------------------------------------------------------- PYRA
def _layer_norm(row, weight, bias, eps):
    c = len(row)
    mu = sum(row) / c
    var = sum((v - mu) ** 2 for v in row) / c  # biased variance
    inv = 1.0 / math.sqrt(var + eps)
    return [(v - mu) * inv * wt + bs for v, wt, bs in zip(row, weight, bias)]


def pyra_merge_rows(x, metric, r, a, b, ln_weight, ln_bias, size=None, class_token=False, distill_token=False,
                    eps=1e-5):
    """Spec 3 for one image. ``a``: r_requested lists [1] (the first r_eff rows are used), ``b``: [[C]]."""
    n = len(x)
    src, dst, unm, r = tome_match(metric, r, class_token, distill_token)
    s = [[1.0] for _ in x] if size is None else [list(v) for v in size]
    if r == 0:
        return [list(row) for row in x], s, src, dst, unm
    z = [_scale(row, sv[0]) for row, sv in zip(x, s)]
    za, zb = z[0::2], z[1::2]
    c = len(x[0])
    S = [za[i] for i in src]
    T = [zb[j] for j in dst]
    W = [_layer_norm(_add(S[k], T[k]), ln_weight, ln_bias, eps) for k in range(r)]
    wc = [2 * _sigmoid(sum(a[k][0] * W[k][ch] for k in range(r))) for ch in range(c)]
    wt = [2 * _sigmoid(sum(W[k][ch] * b[0][ch] for ch in range(c))) - 1 for k in range(r)]
    s_mod = [[S[k][ch] + S[k][ch] * wc[ch] * wt[k] for ch in range(c)] for k in range(r)]
    na, nb = len(za), len(zb)
    out_b = []
    for j in range(nb):
        row = list(zb[j])
        for k in range(r):
            if dst[k] == j:
                row = _add(row, s_mod[k])
        out_b.append(row)
    num = [None] * (n - r)
    for pos, (kind, k) in enumerate(tome_layout(na, nb, r, distill_token)):
        num[pos] = za[unm[k]] if kind == "u" else out_b[k]
    den = tome_merge_rows(s, src, dst, unm, "sum", distill_token)
    return [_scale(row, 1.0 / d[0]) for row, d in zip(num, den)], den, src, dst, unm


# ----------------------------------------------------------------------------------- batched wrappers
def _lists(t):
    return t.detach().double().tolist()


def _tensor(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def tome_match_batch(metric, r, class_token=False, distill_token=False):
    """-> (src [B, r], dst [B, r], unm [B, Na - r], token_map [B, N]) int64 tensors."""
    res = [tome_match(m, r, class_token, distill_token) for m in _lists(metric)]
    bsz, n = metric.shape[:2]
    r_eff = cap_r(r, n, class_token, distill_token)
    na = (n + 1) // 2
    src = torch.tensor([v[0] for v in res], dtype=torch.int64).view(bsz, r_eff)
    dst = torch.tensor([v[1] for v in res], dtype=torch.int64).view(bsz, r_eff)
    unm = torch.tensor([v[2] for v in res], dtype=torch.int64).view(bsz, na - r_eff)
    tmap = torch.tensor([tome_token_map(n, v[0], v[1], v[2], distill_token) for v in res],
                        dtype=torch.int64).view(bsz, n)
    return src, dst, unm, tmap


def tome_merge_batch(x, metric, r, size=None, class_token=False, distill_token=False):
    """Fused ToMe step (spec 1.9 with the spec 1 matching) -> (x' f64, size' f64, src, dst, unm, token_map)."""
    xs, ms = _lists(x), _lists(metric)
    ss = [None] * len(xs) if size is None else _lists(size)
    outs, sizes = [], []
    for xi, mi, si in zip(xs, ms, ss):
        src, dst, unm, _ = tome_match(mi, r, class_token, distill_token)
        merge = lambda rows, mode, src=src, dst=dst, unm=unm: tome_merge_rows(rows, src, dst, unm, mode,  # noqa: E731
                                                                               distill_token)
        o, s = merge_wavg_rows(merge, xi, si)
        outs.append(o)
        sizes.append(s)
    src, dst, unm, tmap = tome_match_batch(metric, r, class_token, distill_token)
    bsz, n, c = x.shape
    n_out = n - src.shape[1]
    return (_tensor(outs).view(bsz, n_out, c), _tensor(sizes).view(bsz, n_out, 1), src, dst, unm, tmap)


def tome_merge_mode_batch(x, metric, r, mode, class_token=False, distill_token=False):
    outs = []
    for xi, mi in zip(_lists(x), _lists(metric)):
        src, dst, unm, _ = tome_match(mi, r, class_token, distill_token)
        outs.append(tome_merge_rows(xi, src, dst, unm, mode, distill_token))
    bsz, n, c = x.shape
    return _tensor(outs).view(bsz, n - cap_r(r, n, class_token, distill_token), c)


def tome_unmerge_batch(y, metric, r, class_token=False, distill_token=False):
    n = metric.shape[1]
    outs = []
    for yi, mi in zip(_lists(y), _lists(metric)):
        src, dst, unm, _ = tome_match(mi, r, class_token, distill_token)
        outs.append(tome_unmerge_rows(yi, n, src, dst, unm, distill_token))
    return _tensor(outs).view(y.shape[0], n, y.shape[-1])


def dense_source_batch(merges, n):
    """Dense source tracking (spec 1.10): identity [N, N], then ``merge(source, "amax")`` per step.

    ``merges``: per step, a list (per image) of one-image merge callables ``merge(rows, mode)``."""
    bsz = len(merges[0])
    src = [[[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)] for _ in range(bsz)]
    for step in merges:
        src = [step[b](src[b], "amax") for b in range(bsz)]
    return _tensor(src)


def fpet_merge_batch(x, metric, size=None, class_token=False, distill_token=False, grid=None):
    """-> (x' f64 [B, Nb, C], size' f64 [B, Nb, 1], token_map int64 [B, N])."""
    bsz, n, c = x.shape
    p = int(class_token) + int(distill_token)
    h, w = fpet_grid(n, p, grid)
    xs, ms = _lists(x), _lists(metric)
    ss = [None] * bsz if size is None else _lists(size)
    res = [fpet_merge_rows(xi, mi, si, p, h, w) for xi, mi, si in zip(xs, ms, ss)]
    nb = len(checkerboard(p, h, w)[1])
    return (_tensor([v[0] for v in res]).view(bsz, nb, c), _tensor([v[1] for v in res]).view(bsz, nb, 1),
            torch.tensor([v[2] for v in res], dtype=torch.int64).view(bsz, n))


def pyra_merge_batch(x, metric, r, a, b, ln_weight, ln_bias, size=None, class_token=False, distill_token=False,
                     eps=1e-5):
    """-> (x' f64, size' f64)."""
    bsz, n, c = x.shape
    ss = [None] * bsz if size is None else _lists(size)
    al, bl, wl, bsl = _lists(a), _lists(b), _lists(ln_weight), _lists(ln_bias)
    outs, sizes = [], []
    for xi, mi, si in zip(_lists(x), _lists(metric), ss):
        o, s, *_ = pyra_merge_rows(xi, mi, r, al, bl, wl, bsl, si, class_token, distill_token, eps)
        outs.append(o)
        sizes.append(s)
    n_out = n - cap_r(r, n, class_token, distill_token)
    return _tensor(outs).view(bsz, n_out, c), _tensor(sizes).view(bsz, n_out, 1)


# ----------------------------------------------------------------------------------- dense STE (torch autograd)
def fpet_dense_ste(x, metric, size, num_prefix, h, w, eps=NORM_EPS):
    """Spec 2.3-2.5 as dense differentiable PyTorch: M = soft + (hard - soft).detach(),
    x' = (z_B + M^T z_A) / (s_B + M^T s_A). Autograd of this defines the straight-through gradients."""
    a_pos, b_pos = checkerboard(num_prefix, h, w)
    a_idx, b_idx = torch.tensor(a_pos), torch.tensor(b_pos)
    mn = metric / metric.norm(dim=-1, keepdim=True).clamp_min(eps)
    scores = mn[:, a_idx] @ mn[:, b_idx].transpose(1, 2)
    if num_prefix:
        mask = torch.zeros(scores.shape[-1], dtype=torch.bool)
        mask[:num_prefix] = True
        scores = scores.masked_fill(mask, -math.inf)
    # the two top entries: the two largest scores, ties to the lower column (torch.max returns the first)
    v1, i1 = scores.max(dim=-1, keepdim=True)
    v2, i2 = scores.scatter(-1, i1, -math.inf).max(dim=-1, keepdim=True)
    t = (scores.gather(-1, i1) + scores.gather(-1, i2)) / 2
    soft = torch.sigmoid(scores - t)
    hard = torch.zeros_like(soft).scatter(-1, i1, (v1 > v2).to(soft.dtype))  # top1 > top2, compared as scores
    m = soft + (hard - soft).detach()
    s = torch.ones(*x.shape[:2], 1, dtype=x.dtype) if size is None else size
    z = x * s
    mt = m.transpose(1, 2)
    num = z[:, b_idx] + mt @ z[:, a_idx]
    den = s[:, b_idx] + mt @ s[:, a_idx]
    return num / den, den
