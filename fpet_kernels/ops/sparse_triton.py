"""Triton kernel of the masked weight gradient (``fpet::masked_weight_grad_triton``, see sparse.py).

One program computes BLOCK_K masked entries: it walks the M rows of ``grad_out`` and ``input`` in
BLOCK_M chunks, gathers ``grad_out[m, rows[k]]`` and ``input[m, cols[k]]`` and accumulates their
products in float32. The entries are sorted by flat index (row-major), so neighbouring ``k`` mostly
read neighbouring addresses of the same rows.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _masked_grad_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, M, K, stride_gm, stride_gn, stride_xm, stride_xn,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    r = tl.load(rows_ptr + offs_k, mask=kmask, other=0)
    c = tl.load(cols_ptr + offs_k, mask=kmask, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        msk = (offs_m < M)[:, None] & kmask[None, :]
        a = tl.load(g_ptr + offs_m[:, None] * stride_gm + r[None, :] * stride_gn, mask=msk, other=0.0)
        b = tl.load(x_ptr + offs_m[:, None] * stride_xm + c[None, :] * stride_xn, mask=msk, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
    tl.store(out_ptr + offs_k, acc, mask=kmask)


def masked_weight_grad(grad_out: torch.Tensor, input: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor) -> torch.Tensor:
    """[K] in grad_out's dtype; grad_out [M, out], input [M, in] (any strides), rows/cols int64 [K]."""
    m, k = grad_out.shape[0], rows.shape[0]
    out = torch.empty(k, dtype=torch.float32, device=grad_out.device)
    if k == 0:
        return out.to(grad_out.dtype)
    if m == 0:
        return out.zero_().to(grad_out.dtype)
    block_k, block_m = 64, 32
    grid = (triton.cdiv(k, block_k),)
    _masked_grad_kernel[grid](grad_out, input, rows.contiguous(), cols.contiguous(), out, m, k,
                              grad_out.stride(0), grad_out.stride(1), input.stride(0), input.stride(1),
                              BLOCK_M=block_m, BLOCK_K=block_k)
    return out.to(grad_out.dtype)
