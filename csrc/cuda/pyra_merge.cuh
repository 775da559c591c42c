// PYRA's modulated merge: the ToMe body of tome_merge.cuh with PYRA's modulation plugged in
// (TomeBody<scalar_t, PyraModulation>). Contract: csrc/README.md (pyra_merge). This file holds the
// modulation (its phase and the modulated source rows) and the launcher: the checks of the PYRA
// parameters, then tome_launch. Registered for CUDA by pyra_merge.cu.
//
// After the merged sizes (ToMe's phase 8), per source k (rank order) with S = z_A[src_k],
// T = z_B[dst_k] (z = x * s): the LayerNorm statistics of S + T over all C channels, the token weight
// wt[k] = 2 sigmoid(<W[k], b>) - 1 and, for the block's channel slice, wc[c] = 2 sigmoid(sum_k a[k] W[k, c])
// (7 more phases at ViT-B/16: tests/test_simt_phases.py); a source row then adds v + v * wc[c] * wt[k]
// to its destination's sum instead of v.
#pragma once

#include <torch/library.h>

#include "tome_merge.cuh"

namespace fpet {
namespace kernels {

// PYRA's modulation of the merged sources (`a` null, r == 0: none, as tome_merge).
struct PyraModulation {
  AnyPtr a, b, ln_weight, ln_bias;  // [r, 1], [1, C], [C], [C]
  float eps = 1e-5f;
  FPET_HD bool enabled() const { return a.defined(); }

  // The weights: sm.mu, sm.rstd (LayerNorm statistics of each source), sm.wt (token weights), sm.wc
  // (channel weights of this slice).
  template <class Body, class Blk, typename scalar_t>
  FPET_HD void weights(const Body& body, Blk& blk, const TomeSmem& sm, const scalar_t* xb, const AnyPtr& s, int c0,
                       int cw) const {
    const int T = blk.size();
    const int C = body.C, r = body.r;
    auto st = [&](int k, int c) {
      const int i = sm.order[k];
      const int64_t pa = 2 * i, pb = 2 * sm.dst[i] + 1;
      return static_cast<float>(xb[pa * C + c]) * s[pa] + static_cast<float>(xb[pb * C + c]) * s[pb];
    };
    auto w = [&](int k, int c) {
      return (st(k, c) - sm.mu[k]) * sm.rstd[k] * ln_weight[c] + ln_bias[c];
    };
    const float inv_c = 1.0f / static_cast<float>(C);
    simt::row_sums_wide(blk, r, C, sm.red, st, [&](int k, float sum) { sm.mu[k] = sum * inv_c; });
    simt::row_sums_wide(
        blk, r, C, sm.red,
        [&](int k, int c) {
          const float d = st(k, c) - sm.mu[k];
          return d * d;
        },
        [&](int k, float sum) { sm.rstd[k] = 1.0f / sqrtf(sum * inv_c + eps); });
    simt::row_sums_wide(blk, r, C, sm.red, [&](int k, int c) { return w(k, c) * b[c]; },
                        [&](int k, float sum) { sm.wt[k] = 2.0f * simt::sigmoid(sum) - 1.0f; });
    blk.each([&](int t) {
      for (int cc = t; cc < cw; cc += T) {
        float acc = 0.f;
        for (int k = 0; k < r; ++k) acc += a[k] * w(k, c0 + cc);
        sm.wc[cc] = 2.0f * simt::sigmoid(acc);
      }
    });
  }

  // What A row i (a source) adds at channel c0 + cc to its destination's sum: v + v * wc * wt.
  FPET_HD float source(const TomeSmem& sm, float v, int cc, int i) const {
    return enabled() ? v + v * sm.wc[cc] * sm.wt[sm.rank[i]] : v;
  }
};

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------
// A PYRA parameter of an exact shape, on the executor's device, in a kernel dtype, contiguous.
template <class Exec>
at::Tensor checked_param(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  check_device<Exec>(t, op, name);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  kernel_dtype(t.scalar_type(), op, name);
  return t.contiguous();
}

template <class Exec>
TomeOutputs pyra_merge(const at::Tensor& x_in, const at::Tensor& metric, int64_t r, const at::Tensor& a_in,
                       const at::Tensor& b_in, const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in,
                       const std::optional<at::Tensor>& size, bool class_token, bool distill_token, double eps) {
  const char* op = "pyra_merge";
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const int64_t N = x.size(1), C = x.size(2);
  checked_tome_r(r, N, class_token, distill_token, op);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ", eps);
  // The contiguous parameters live until the launch has returned (PyraModulation holds raw pointers).
  const at::Tensor a = checked_param<Exec>(a_in, {r, 1}, op, "a");
  const at::Tensor b = checked_param<Exec>(b_in, {1, C}, op, "b");
  const at::Tensor ln_weight = checked_param<Exec>(ln_weight_in, {C}, op, "ln_weight");
  const at::Tensor ln_bias = checked_param<Exec>(ln_bias_in, {C}, op, "ln_bias");
  PyraModulation pyra;
  if (r > 0) {  // r == 0: the identity, as tome_merge (no modulation, `a` is empty)
    pyra.a = any_ptr(a, op, "a");
    pyra.b = any_ptr(b, op, "b");
    pyra.ln_weight = any_ptr(ln_weight, op, "ln_weight");
    pyra.ln_bias = any_ptr(ln_bias, op, "ln_bias");
    pyra.eps = static_cast<float>(eps);
  }
  return tome_launch<Exec>(op, x, metric, r, size, class_token, distill_token, pyra);
}

template <class Exec>
void register_pyra(torch::Library& m) {
  m.impl("pyra_merge", &pyra_merge<Exec>);
}

}  // namespace kernels
}  // namespace fpet
