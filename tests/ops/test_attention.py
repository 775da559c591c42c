"""Proportional attention inputs (ops/attention.py): the Triton kernel against the PyTorch reference,
and the fold against a materialised ``softmax(q k^T * scale + log size) v``."""
import pytest
import torch
import torch.nn.functional as F

import fpet_kernels as fk
from fpet_kernels.ops.attention import attention_inputs_reference

from helpers import DTYPE_TOLS, gen, gen_size

TRITON = fk.backends()["live"]["triton"]


@pytest.mark.skipif(not TRITON, reason="triton backend not live")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("pad_v", [False, True])
@pytest.mark.parametrize("heads,hd,n", [(3, 16, 37), (2, 64, 70), (4, 20, 5)])
def test_triton_kernel_matches_reference(dtype, atol, rtol, with_size, pad_v, heads, hd, n):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qkv = gen(2, n, 3 * heads * hd, dtype=dtype).to(dev)
    size = gen_size(2, n).to(dev) if with_size else None
    with torch.no_grad():
        got = fk.attention_inputs(qkv, size, heads, hd ** -0.5, pad_v, backend="triton")
    exp = attention_inputs_reference(qkv, size, heads, hd ** -0.5, pad_v and with_size)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON else []))
def test_folded_sdpa_equals_materialised_attention(backend):
    heads, hd, n = 3, 16, 29
    qkv = gen(2, n, 3 * heads * hd)
    size = gen_size(2, n)
    scale = hd ** -0.5
    with torch.no_grad():
        q, k, v, metric = fk.attention_inputs(qkv, size, heads, scale, backend=backend)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    q0, k0, v0 = qkv.reshape(2, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    expected = ((q0 @ k0.transpose(-1, -2)) * scale + size.log()[:, None, None, :, 0]).softmax(-1) @ v0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metric, k0.mean(1))


def test_gradients_flow_through_the_reference_path():
    qkv = gen(2, 9, 3 * 2 * 8).requires_grad_()
    q, k, v, metric = fk.attention_inputs(qkv, gen_size(2, 9), 2, 8 ** -0.5, backend="triton" if TRITON else None)
    (F.scaled_dot_product_attention(q, k, v).sum() + metric.sum()).backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="qkv"):
        fk.attention_inputs(torch.randn(2, 9, 10), None, 2, 1.0)
    with pytest.raises(ValueError, match="size"):
        fk.attention_inputs(torch.randn(2, 9, 12), torch.ones(2, 8, 1), 2, 1.0)
