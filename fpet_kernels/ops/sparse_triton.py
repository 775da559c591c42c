"""Triton kernel of the masked weight gradient (``fpet::masked_weight_grad_triton``, see sparse.py).

``grad[k] = sum_m grad_out[m, rows[k]] * input[m, cols[k]]`` for K masked entries, two ways:

* **sparse** (the kernel below): grid ``(K / BLOCK_K, M splits)``. Each program gathers
  ``grad_out[m, rows[k]]`` and ``input[m, cols[k]]`` for its BLOCK_K entries over its own span of
  the M rows (BLOCK_M at a time) and writes a float32 partial sum per entry; the splits' partials
  are then summed in split order by ``torch.sum`` (a fixed order: deterministic, no atomics). The
  M splits are chosen so that about four programs per SM run (one split when K alone fills the
  GPU). Offsets are int64 (``m * stride`` passes 2**31 on large activations). The entries are
  sorted by flat index (row-major), so neighbouring ``k`` mostly read neighbouring addresses.
* **dense** (``grad_out.T @ input`` by cuBLAS, then a gather of the K entries) where the mask is
  dense enough to make that faster: a gathered pair costs about one 32-byte sector per operand
  (``~26`` bytes per entry and row once sectors are shared, ``~3.35e12`` B/s on an H100), a dense
  multiply-add about ``1 / 5e14`` s on tensor cores (half) or ``1 / 5e13`` s (float32 without
  TF32). The sparse kernel wins while ``K / (out * in) < 2 * 3.35e12 / (26 * 5e14) ~ 5e-4`` for
  half inputs and ``~ 2.6e-3`` for float32; ``DENSE_DENSITY`` holds these crossovers (an estimate
  from the H100's figures, not yet measured on a GPU). The dense path's sums are cuBLAS's
  (float32 accumulation for half inputs; float32 inputs follow ``torch.backends.cuda.matmul``'s
  TF32 setting) and it needs an ``[out, in]`` temporary in the input dtype.

Every argument is checked first (``_check_args``): shapes, dtypes, devices and the index ranges,
with errors naming the argument; nothing a caller passes makes the kernel read out of bounds.
"""
from __future__ import annotations

import torch

from .. import _checks
from .triton_common import HAS_TRITON, cdiv, check_index_range, interpreting, num_sms, tl, triton

# Mask density K / (out * in) from which the dense product is used, per input dtype (see above).
DENSE_DENSITY = {torch.float16: 5e-4, torch.bfloat16: 5e-4, torch.float32: 2.6e-3}
BLOCK_K = 64 if interpreting() else 128   # masked entries per program
BLOCK_M = 16                              # rows of grad_out / input per step
NUM_WARPS = 8                             # sm_90: 40 registers, no spills (32 x 128 tiles at 4 warps spill)
PROGRAMS_PER_SM = 4

if HAS_TRITON:

    @triton.jit
    def _masked_grad_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, part_ptr, M, K, m_per, stride_gm, stride_gn,
                            stride_xm, stride_xn, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """part[split, k] = sum over this split's rows m of grad_out[m, rows[k]] * input[m, cols[k]]."""
        offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1).to(tl.int64)
        kmask = offs_k < K
        r = tl.load(rows_ptr + offs_k, mask=kmask, other=0).to(tl.int64)
        c = tl.load(cols_ptr + offs_k, mask=kmask, other=0).to(tl.int64)
        g_col = g_ptr + r * stride_gn
        x_col = x_ptr + c * stride_xn
        m_lo = split * m_per
        m_hi = tl.minimum(m_lo + m_per, M)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            msk = (offs_m < m_hi)[:, None] & kmask[None, :]
            a = tl.load(g_col[None, :] + offs_m[:, None] * stride_gm, mask=msk, other=0.0)
            b = tl.load(x_col[None, :] + offs_m[:, None] * stride_xm, mask=msk, other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
        tl.store(part_ptr + split * K + offs_k, acc, mask=kmask)


def _check_args(op, grad_out, input, rows, cols) -> None:
    """grad_out [M, out] and input [M, in] of one kernel dtype on one device; rows / cols int64 [K]
    with entries in [0, out) / [0, in) (one host sync, once per unchanged index tensor)."""
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{op}: grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    dev = grad_out.device
    _checks.kernel_tensor(op, "grad_out", grad_out, dev, shape=(None, None))
    _checks.kernel_tensor(op, "input", input, dev, shape=(grad_out.shape[0], None))
    if input.dtype != grad_out.dtype:
        raise TypeError(f"{op}: input ({input.dtype}) must have grad_out's dtype ({grad_out.dtype})")
    _checks.kernel_tensor(op, "rows", rows, dev, shape=(None,), dtypes=(torch.int64,))
    _checks.kernel_tensor(op, "cols", cols, dev, shape=(rows.shape[0],), dtypes=(torch.int64,))
    check_index_range(op, "rows", rows, grad_out.shape[1])
    check_index_range(op, "cols", cols, input.shape[1])


def use_dense(grad_out: torch.Tensor, input: torch.Tensor, k: int) -> bool:
    """Whether the dense product is the faster way for K entries of an [out, in] weight."""
    n = grad_out.shape[1] * input.shape[1]
    return n > 0 and k >= DENSE_DENSITY.get(grad_out.dtype, 1.0) * n


def masked_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor, split_m=None, dense=None) -> torch.Tensor:
    """[K] in grad_out's dtype; grad_out [M, out], input [M, in] (any strides), rows/cols int64 [K].
    ``split_m`` (M splits) and ``dense`` (force a path) are for tests; None decides as above."""
    op = "masked_weight_grad (triton)"
    _check_args(op, grad_out, input, rows, cols)
    m, k = grad_out.shape[0], rows.shape[0]
    if k == 0:
        return grad_out.new_empty(0)
    if m == 0:
        return grad_out.new_zeros(k)
    rows, cols = rows.contiguous(), cols.contiguous()
    if use_dense(grad_out, input, k) if dense is None else dense:
        full = grad_out.t().mm(input)  # [out, in], float32 accumulation
        return full.view(-1)[rows * input.shape[1] + cols] if full.is_contiguous() else full[rows, cols]
    k_blocks = cdiv(k, BLOCK_K)
    m_blocks = cdiv(m, BLOCK_M)
    if split_m is None:
        split_m = cdiv(PROGRAMS_PER_SM * num_sms(grad_out.device), k_blocks)
    split_m = max(1, min(int(split_m), m_blocks))
    m_per = cdiv(m_blocks, split_m) * BLOCK_M
    split_m = cdiv(m, m_per)
    part = torch.empty(split_m, k, dtype=torch.float32, device=grad_out.device)
    _masked_grad_kernel[(k_blocks, split_m)](grad_out, input, rows, cols, part, m, k, m_per,
                                             grad_out.stride(0), grad_out.stride(1), input.stride(0),
                                             input.stride(1), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    out = part[0] if split_m == 1 else part.sum(0)
    return out.to(grad_out.dtype)
