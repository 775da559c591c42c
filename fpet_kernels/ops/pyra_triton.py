"""Triton PYRA forward (``pyra_merge``, spec section 3; ``ops/pyra.py``, csrc/README.md).

ONE launch: the ToMe merge kernel of ``tome_triton.py`` (matching, index outputs, unmerged rows, the
size-weighted gather of every destination row) with its modulation phase switched on: between the
grouping of the sources and the merge, ``_pyra_weights`` (passed to the kernel as the
``tl.constexpr`` function ``PYRA_WEIGHTS``) computes per source k (rank order) the LayerNorm
statistics of ``S + T`` over all C, the token weight ``wt[k] = 2 sigmoid(<W[k], b>) - 1`` and, for
the program's channels, ``wc[c] = 2 sigmoid(sum_k a[k] W[k, c])``; the merge then adds
``S + S * wc * wt`` in place of each source ``S``. The backward: ``pyra_triton_backward.py``.
"""
from __future__ import annotations

from .. import _checks
from .tome_triton import tome_merge
from .triton_common import HAS_TRITON, check_merge_inputs, check_r, tl, triton

if HAS_TRITON:
    from .triton_common import load_sizes

    @triton.jit
    def _pyra_sum(x_b, s_b, si, dj, ss, sd, vk, C, c0, mean, rstd, lnw_ptr, lnb_ptr, w_ptr, MODE: tl.constexpr,
                  BLOCK_C: tl.constexpr):
        """One channel block of PYRA's W = LN(S + T) rows: MODE 0 sum(y), 1 sum((y-mean)^2), 2 sum(W * w)."""
        cc = c0 + tl.arange(0, BLOCK_C)
        vc = cc < C
        msk = vk[:, None] & vc[None, :]
        y = (tl.load(x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32) * ss[:, None]
             + tl.load(x_b + (2 * dj + 1)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
             * sd[:, None])
        if MODE == 0:
            v = y
        else:
            v = tl.where(msk, y - mean[:, None], 0.0)
            if MODE == 1:
                v = v * v
            else:
                lw = tl.load(lnw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                lb = tl.load(lnb_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + cc, mask=vc, other=0.0).to(tl.float32)
                v = tl.where(msk, (v * rstd[:, None] * lw[None, :] + lb[None, :]) * wv[None, :], 0.0)
        return v

    @triton.jit
    def _pyra_weights(x_b, s_b, srck_ws, dstk_ws, wt_ws, wc_ws, a_ptr, b_ptr, lnw_ptr, lnb_ptr, r, C, c_lo, c_hi,
                      eps, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """PYRA (spec 3): W = LayerNorm(S + T) over C for the r source rows; wt[k] = 2 sigmoid(W_k . b) - 1
        (needs all of C), wc[c] = 2 sigmoid(sum_k a_k W[k, c]) (for this program's channels)."""
        for k0 in range(0, r, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            vk = kk < r
            si = tl.load(srck_ws + kk, mask=vk, other=0)
            dj = tl.load(dstk_ws + kk, mask=vk, other=0)
            ss = load_sizes(s_b, 2 * si, vk, HAS_SIZE)
            sd = load_sizes(s_b, 2 * dj + 1, vk, HAS_SIZE)
            zero = tl.zeros([BLOCK], tl.float32)
            acc = zero
            for c0 in range(0, C, BLOCK_C):
                acc += tl.sum(_pyra_sum(x_b, s_b, si, dj, ss, sd, vk, C, c0, zero, zero, lnw_ptr, lnb_ptr, b_ptr, 0,
                                        BLOCK_C), 1)
            mean = acc / C
            acc = zero
            for c0 in range(0, C, BLOCK_C):
                acc += tl.sum(_pyra_sum(x_b, s_b, si, dj, ss, sd, vk, C, c0, mean, zero, lnw_ptr, lnb_ptr, b_ptr, 1,
                                        BLOCK_C), 1)
            rstd = 1.0 / tl.sqrt(acc / C + eps)
            acc = zero
            for c0 in range(0, C, BLOCK_C):
                acc += tl.sum(_pyra_sum(x_b, s_b, si, dj, ss, sd, vk, C, c0, mean, rstd, lnw_ptr, lnb_ptr, b_ptr, 2,
                                        BLOCK_C), 1)
            tl.store(wt_ws + kk, 2.0 * tl.sigmoid(acc) - 1.0, mask=vk)
            tl.store(wt_ws + r + C + kk, mean, mask=vk)       # statistics for the channel pass below
            tl.store(wt_ws + 2 * r + C + kk, rstd, mask=vk)
        tl.debug_barrier()
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            vc = cc < c_hi
            lw = tl.load(lnw_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            lb = tl.load(lnb_ptr + cc, mask=vc, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, r, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                vk = kk < r
                si = tl.load(srck_ws + kk, mask=vk, other=0)
                dj = tl.load(dstk_ws + kk, mask=vk, other=0)
                msk = vk[:, None] & vc[None, :]
                y = (tl.load(x_b + (2 * si)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * load_sizes(s_b, 2 * si, vk, HAS_SIZE)[:, None]
                     + tl.load(x_b + (2 * dj + 1)[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
                     * load_sizes(s_b, 2 * dj + 1, vk, HAS_SIZE)[:, None])
                mean = tl.load(wt_ws + r + C + kk, mask=vk, other=0.0)
                rstd = tl.load(wt_ws + 2 * r + C + kk, mask=vk, other=0.0)
                w = (y - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
                ak = tl.load(a_ptr + kk, mask=vk, other=0.0).to(tl.float32)
                acc += tl.sum(tl.where(msk, w * ak[:, None], 0.0), 0)
            tl.store(wc_ws + cc, 2.0 * tl.sigmoid(acc), mask=vc)


def pyra_merge(x, metric, r, a, b, ln_weight, ln_bias, size, class_token, distill_token, eps):
    """PYRA forward: the ToMe kernel with the modulation phase on (one launch)."""
    op = "pyra_merge (triton)"
    bsz, n, c, _ = check_merge_inputs(op, x, metric, size)
    check_r(op, r, n, class_token, distill_token)
    for name, t, shape in (("a", a, (r, 1)), ("b", b, (1, c)), ("ln_weight", ln_weight, (c,)),
                           ("ln_bias", ln_bias, (c,))):
        _checks.kernel_tensor(op, name, t, x.device, shape=shape)
    eps = _checks.finite_positive(op, "eps", eps)
    if r == 0:
        return tome_merge(x, metric, 0, size, class_token, distill_token)
    pyra = (_pyra_weights, a.contiguous().view(-1), b.contiguous().view(-1), ln_weight.contiguous(),
            ln_bias.contiguous(), eps)
    return tome_merge(x, metric, r, size, class_token, distill_token, pyra=pyra)
