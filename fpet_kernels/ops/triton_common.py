"""Building blocks shared by the Triton kernels (``tome_triton.py``, ``fpet_triton.py``).

Every fused merge kernel runs one program per image (optionally per image and channel block, the
cheap matching recomputed in each, so that B=1 still fills the GPU) through the same phases:

  1. match:  normalised metric rows, A·Bᵀ similarity tiles with ``tl.dot`` accumulated over the
             metric dimension D in BLOCK_D chunks (``unit_scores``: any D, operand tiles of
             [32, BLOCK_D]), a running per-row reduction (max/argmax for ToMe, top-2 for FPET);
  2. select: which A rows merge where (ToMe: rank by score, top r; FPET: the hard match);
  3. group:  the sources sorted by destination (a counting sort in the program's workspace), so
  4. merge:  every destination row *gathers* its sources in a fixed order, size-weighted, and the
             merged tokens are written once. No float atomics: results are deterministic.

Between phases the program exchanges small per-image vectors through a global workspace and
``tl.debug_barrier()`` (one CTA per program: the barrier makes its own global writes visible).
All arithmetic is float32; half inputs are cast after loading (the interpreter also computes bf16
``tl.dot`` wrongly otherwise).
"""
from __future__ import annotations

import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _checks

try:  # Triton is optional: CPU-only installs of torch do not ship it
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """Kernels run in Triton's CPU interpreter (decided when the kernels are defined, at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def live() -> bool:
    """The triton backend can run: Triton imports, and a GPU is present or the interpreter is on."""
    return HAS_TRITON and (torch.cuda.is_available() or interpreting())


def check_merge_inputs(op: str, x, metric, size=None, metric_name: str = "metric"):
    """The inputs of a fused merge kernel: x [B, N, C], metric [B, N, D], size [B, N, 1] (or None),
    kernel dtypes, one device. Returns (B, N, C, D)."""
    _checks.kernel_tokens(op, "x", x)
    dev = x.device
    bsz, n, c = x.shape
    _checks.kernel_tensor(op, metric_name, metric, dev, shape=(bsz, n, None))
    if size is not None:
        _checks.kernel_tensor(op, "size", size, dev, shape=(bsz, n, 1))
    return bsz, n, c, metric.shape[-1]


def check_grid(op: str, n: int, num_prefix, H, W) -> None:
    """FPET's layout (``_checks.fpet_layout``), checked before any index is computed from it."""
    _checks.fpet_layout(op, n, num_prefix, H, W)


def check_r(op: str, r, n: int, class_token, distill_token) -> int:
    """ToMe's r within [0, cap] (the cap of ``ops.tome.cap_r``)."""
    _checks.flag("class_token", class_token)
    _checks.flag("distill_token", distill_token)
    return _checks.kernel_int(op, "r", r, 0, _checks.r_cap(n, class_token, distill_token))


_CHECKED_INDICES = WeakIdKeyDictionary()  # index tensor -> (version, data_ptr, bound) it passed


def check_index_range(op: str, name: str, t: torch.Tensor, hi: int) -> None:
    """Entries of the index tensor ``t`` must be in ``[0, hi)``: one host sync, and none for a
    tensor already checked against the same bound and not modified since (its version counter):
    the indices a module keeps (PaFi's rows / cols) are checked once, not in every training step.
    Skipped while tracing or capturing a CUDA graph (``_checks._no_data``)."""
    if t.numel() == 0 or _checks._no_data(t):
        return
    try:
        key = (t._version, t.data_ptr(), int(hi))
    except RuntimeError:  # inference tensors have no version counter: check every time
        key = None
    if key is not None and _CHECKED_INDICES.get(t) == key:
        return
    lo_v, hi_v = torch.aminmax(t)
    lo_v, hi_v = int(lo_v), int(hi_v)
    if lo_v < 0 or hi_v >= hi:
        raise ValueError(f"{op}: {name} entries must be in [0, {hi}), got entries in [{lo_v}, {hi_v}]")
    if key is not None:
        _CHECKED_INDICES[t] = key


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, lo: int = 32) -> int:
    """Next power of two, at least ``lo`` (Triton block shapes are powers of two; tl.dot needs >= 16)."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


_SM_COUNT: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def channel_split(batch: int, channels: int, block_c: int, device: torch.device, split=None) -> tuple[int, int]:
    """How many programs share one image's channels, and the channel span of each (a multiple of
    ``block_c``). Large batches: one program per image. Small ones: split C until about two
    programs per SM are running (the matching is recomputed per program; it is cheap)."""
    blocks = cdiv(max(channels, 1), block_c)
    if split is None:
        split = 1 if batch >= num_sms(device) else min(blocks, cdiv(2 * num_sms(device), max(batch, 1)))
    split = max(1, min(int(split), blocks))
    per = cdiv(blocks, split) * block_c
    return cdiv(channels, per) if channels else 1, per


if HAS_TRITON:

    @triton.jit
    def store_rounded(ptr, v, mask):
        """Store float32 ``v`` in ``ptr``'s dtype, rounding to nearest even. (bfloat16 is rounded here,
        bit-wise: the GPU's conversion already does this, Triton's interpreter truncates.)"""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            up = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            v = tl.where(v != v, v, up.to(tl.float32, bitcast=True))
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def row_norms(m_ptr, pos, valid, D, BLOCK_D: tl.constexpr):
        """``max(||m||, 1e-12)`` of the metric rows at ``pos`` (float32; 1e-12 where invalid), summed
        over D in BLOCK_D chunks: no register tile grows with D."""
        d = tl.arange(0, BLOCK_D)
        ss = tl.zeros(pos.shape, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            v = tl.load(m_ptr + pos[:, None] * D + (d0 + d)[None, :], mask=valid[:, None] & ((d0 + d) < D)[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(v * v, 1)
        return tl.maximum(tl.sqrt(ss), 1e-12)

    @triton.jit
    def unit_chunk(m_ptr, pos, valid, den, d0, D, BLOCK_D: tl.constexpr):
        """Columns ``d0 .. d0 + BLOCK_D`` of the normalised rows at ``pos`` (``den``: their
        ``row_norms``), float32 [BLOCK, BLOCK_D], 0 outside."""
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(m_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        return v / den[:, None]

    @triton.jit
    def unit_scores(m_ptr, pos_a, va, den_a, pos_b, vb, den_b, D, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
        """Score tile ``A_n B_n^T`` of the normalised metric rows at ``pos_a`` and ``pos_b`` (norms
        ``den_a``, ``den_b`` from ``row_norms``), accumulated over D in BLOCK_D chunks: any metric
        dimension runs with [BLOCK, BLOCK_D] operand tiles (shared memory and registers independent
        of D). On the GPU a ``tl.dot`` per chunk (PREC "tf32x3": tensor cores, float32 accuracy;
        every element is computed by the same instruction sequence, so duplicated rows give exactly
        tied scores, as the spec's tie rules expect). "interp": the interpreter's dot is a BLAS
        matmul whose rounding depends on the row's place in the tile, so it computes in float64,
        accumulates the chunks in float64 and rounds once, which keeps exact ties exact."""
        if PREC == "interp":
            acc = tl.zeros([pos_a.shape[0], pos_b.shape[0]], tl.float64)
        else:
            acc = tl.zeros([pos_a.shape[0], pos_b.shape[0]], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            a = unit_chunk(m_ptr, pos_a, va, den_a, d0, D, BLOCK_D)
            b = unit_chunk(m_ptr, pos_b, vb, den_b, d0, D, BLOCK_D)
            if PREC == "interp":
                acc += tl.dot(a.to(tl.float64), tl.trans(b.to(tl.float64)))
            else:
                acc += tl.dot(a, tl.trans(b), input_precision=PREC)
        return acc.to(tl.float32)

    @triton.jit
    def load_sizes(s_ptr, pos, valid, HAS_SIZE: tl.constexpr):
        """Token sizes at ``pos`` as float32 (ones when there is no size tensor), 0 where invalid."""
        if HAS_SIZE:
            s = tl.load(s_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        else:
            s = tl.where(valid, 1.0, 0.0)
        return s

    @triton.jit
    def group_by_destination(key_ptr, n, sorted_ptr, BLOCK: tl.constexpr):
        """Counting sort of the ``n`` entries of ``key`` (a destination per entry, < 0: none) by
        destination, stable: entry k goes to position #{q: 0 <= key_q < key_k} + #{q < k: key_q == key_k}.
        Writes the entry indices k in that order, so each destination's sources are contiguous."""
        for k0 in range(0, n, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            dk = tl.load(key_ptr + kk, mask=kk < n, other=-1)
            pos = tl.zeros([BLOCK], dtype=tl.int32)
            for q0 in range(0, n, BLOCK):
                qq = q0 + tl.arange(0, BLOCK)
                dq = tl.load(key_ptr + qq, mask=qq < n, other=-1)
                before = (dq[None, :] >= 0) & ((dq[None, :] < dk[:, None])
                                               | ((dq[None, :] == dk[:, None]) & (qq[None, :] < kk[:, None])))
                pos += tl.sum(before.to(tl.int32), 1)
            tl.store(sorted_ptr + pos, kk, mask=(kk < n) & (dk >= 0))

    @triton.jit
    def destination_ranges(key_ptr, n, jj, BLOCK: tl.constexpr):
        """For destinations ``jj``: where their sources start in the sorted list, and how many."""
        start = tl.zeros(jj.shape, dtype=tl.int32)
        count = tl.zeros(jj.shape, dtype=tl.int32)
        for q0 in range(0, n, BLOCK):
            qq = q0 + tl.arange(0, BLOCK)
            dq = tl.load(key_ptr + qq, mask=qq < n, other=-1)
            start += tl.sum(((dq[None, :] >= 0) & (dq[None, :] < jj[:, None])).to(tl.int32), 1)
            count += tl.sum((dq[None, :] == jj[:, None]).to(tl.int32), 1)
        return start, count

    @triton.jit
    def checkerboard_a(i, p, H, W):
        """Token position of FPET A index ``i`` (spec 2.2): cells (even, even) row-major, then (odd, odd)."""
        wc = (W + 1) // 2
        w2 = tl.maximum(W // 2, 1)
        n1 = ((H + 1) // 2) * wc
        i2 = tl.maximum(i - n1, 0)
        first = i < n1
        h = tl.where(first, 2 * (i // wc), 2 * (i2 // w2) + 1)
        w = tl.where(first, 2 * (i % wc), 2 * (i2 % w2) + 1)
        return p + h * W + w

    @triton.jit
    def checkerboard_b(j, p, H, W):
        """Token position of FPET B index ``j``: the p prefix tokens, cells (odd, even), then (even, odd)."""
        wc = (W + 1) // 2
        w2 = tl.maximum(W // 2, 1)
        n1 = (H // 2) * wc
        j2 = tl.maximum(j - p, 0)
        j3 = tl.maximum(j2 - n1, 0)
        first = j2 < n1
        h = tl.where(first, 2 * (j2 // wc) + 1, 2 * (j3 // w2))
        w = tl.where(first, 2 * (j2 % wc), 2 * (j3 % w2) + 1)
        return tl.where(j < p, j, p + h * W + w)

    @triton.jit
    def _source(entry_ptr, valid, src_ws, p, H, W, FPET: tl.constexpr):
        """A sorted-list entry k and the token position of the source it names (see below)."""
        k = tl.load(entry_ptr, mask=valid, other=0)
        if FPET:
            pos = checkerboard_a(k, p, H, W)
        else:
            pos = 2 * tl.load(src_ws + k, mask=valid, other=0)
        return k, pos

    @triton.jit
    def merge_destinations(x_b, s_b, o_b, os_b, jj, vj, pos_j, row_j, sorted_ws, key_ws, n_keys, src_ws,
                           wt_ws, wc_ws, p, H, W, C, c_lo, c_hi, write_size,
                           HAS_SIZE: tl.constexpr, FPET: tl.constexpr, PYRA: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """Phase 4 for a block of destination rows ``jj`` (token positions ``pos_j``, output rows
        ``row_j``): each gathers itself and then its sources in sorted-list order, size-weighted:
        ``out = (z_j + sum z_src) / (s_j + sum s_src)`` with ``z = x * s``, over channels [c_lo, c_hi).

        A sorted entry k names the source: ToMe: k is a rank, its A row is ``src_ws[k]`` (position
        2 i); FPET: k is the A index itself (checkerboard position). PYRA scales each source row by
        ``1 + wc[c] * wt[k]``. ``write_size``: this program also writes the merged sizes."""
        start, cnt = destination_ranges(key_ws, n_keys, jj, BLOCK_K)
        cnt = tl.where(vj, cnt, 0)
        maxc = tl.max(cnt, 0)
        den = load_sizes(s_b, pos_j, vj, HAS_SIZE)
        for t in range(0, maxc):
            vt = t < cnt
            k, pos_s = _source(sorted_ws + start + t, vt, src_ws, p, H, W, FPET)
            den += load_sizes(s_b, pos_s, vt, HAS_SIZE)
        tl.store(os_b + row_j, den, mask=vj & write_size)
        s_j = load_sizes(s_b, pos_j, vj, HAS_SIZE)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < c_hi
            acc = tl.load(x_b + pos_j[:, None] * C + cc[None, :], mask=vj[:, None] & vc[None, :],
                          other=0.0).to(tl.float32) * s_j[:, None]
            if PYRA:
                wc = tl.load(wc_ws + cc, mask=vc, other=0.0)
            for t in range(0, maxc):
                vt = t < cnt
                k, pos_s = _source(sorted_ws + start + t, vt, src_ws, p, H, W, FPET)
                z = tl.load(x_b + pos_s[:, None] * C + cc[None, :], mask=vt[:, None] & vc[None, :],
                            other=0.0).to(tl.float32) * load_sizes(s_b, pos_s, vt, HAS_SIZE)[:, None]
                if PYRA:  # masked lanes stay 0 (wc may be NaN: no 0 * NaN)
                    wt = tl.load(wt_ws + k, mask=vt, other=0.0)
                    z = tl.where(vt[:, None] & vc[None, :], z + z * wc[None, :] * wt[:, None], 0.0)
                acc += z
            ok = vj & (den != 0)  # a merged row whose sizes sum to 0 is 0 (docs/semantics.md)
            store_rounded(o_b + row_j[:, None] * C + cc[None, :],
                          tl.where(ok[:, None], acc / tl.where(ok, den, 1.0)[:, None], 0.0),
                          vj[:, None] & vc[None, :])
