// PYRA modulated merge on CPU (forward): ToMe matching, then the sources are modulated by a
// LayerNorm-based channel and token weighting before they are summed into their destinations.
// Contract: csrc/README.md.
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

struct PyraScratch {
  std::vector<float> w, sp, u, wc, wt, acc;
  std::vector<int64_t> head, list;
};

// Parameters in float32: a [r], b [C], ln_weight [C], ln_bias [C].
struct PyraParams {
  const float *a, *b, *ln_w, *ln_b;
  float eps;
};

template <typename T>
void pyra_merge_image(const T* x, const float* s, int64_t N, int64_t C, int64_t r, bool distill_token,
                      const int64_t* src_idx, const int64_t* dst_idx, const int64_t* unm_idx, const PyraParams& prm,
                      T* out, float* out_size, PyraScratch& sc) {
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  const TomeRows rows{Na, r, distill_token};
  sc.w.resize(static_cast<size_t>(r * C));
  sc.sp.resize(static_cast<size_t>(r * C));
  sc.u.resize(static_cast<size_t>(C));
  sc.wc.assign(static_cast<size_t>(C), 0.f);
  sc.wt.resize(static_cast<size_t>(r));
  sc.acc.resize(static_cast<size_t>(C));
  float* u = sc.u.data();
  // S[k] = z_A[src_k] (kept in sp), W[k] = LayerNorm(S[k] + T[k]) * ln_w + ln_b.
  for (int64_t k = 0; k < r; ++k) {
    const int64_t spos = 2 * src_idx[k], dpos = 2 * dst_idx[k] + 1;
    float* S = sc.sp.data() + k * C;
    acc_init(S, x + spos * C, size_of(spos), C);
    acc_init(u, x + dpos * C, size_of(dpos), C);
    for (int64_t c = 0; c < C; ++c) u[c] = S[c] + u[c];
    const float mean = sum_f32(u, C) / static_cast<float>(C);
    for (int64_t c = 0; c < C; ++c) u[c] = u[c] - mean;
    const float var = dot_f32(u, u, C) / static_cast<float>(C);
    const float rstd = 1.0f / std::sqrt(var + prm.eps);
    float* Wk = sc.w.data() + k * C;
    for (int64_t c = 0; c < C; ++c) Wk[c] = u[c] * rstd * prm.ln_w[c] + prm.ln_b[c];
    // wt[k] = 2 sigmoid(<W[k], b>) - 1
    sc.wt[k] = 2.0f * sigmoid_f32(dot_f32(Wk, prm.b, C)) - 1.0f;
  }
  // wc[c] = 2 sigmoid(sum_k a[k] W[k, c]), k ascending.
  float* wc = sc.wc.data();
  for (int64_t k = 0; k < r; ++k) {
    const float ak = prm.a[k];
    const float* Wk = sc.w.data() + k * C;
    for (int64_t c = 0; c < C; ++c) wc[c] += ak * Wk[c];
  }
  for (int64_t c = 0; c < C; ++c) wc[c] = 2.0f * sigmoid_f32(wc[c]);
  // S'[k] = S[k] + S[k] * wc * wt[k]
  for (int64_t k = 0; k < r; ++k) {
    float* S = sc.sp.data() + k * C;
    const float wt = sc.wt[k];
    for (int64_t c = 0; c < C; ++c) S[c] = S[c] + S[c] * wc[c] * wt;
  }
  // Output rows: unmerged z / s; B row j: (z_B[j] + sum S'[k], rank order) / merged size.
  for (int64_t k = 0; k < Na - r; ++k) {
    const int64_t pos = 2 * unm_idx[k], row = rows.unm_row(k);
    scaled_copy(x + pos * C, size_of(pos), out + row * C, C);
    out_size[row] = size_of(pos);
  }
  group_by_destination(dst_idx, r, Nb, sc.head, sc.list);
  float* acc = sc.acc.data();
  for (int64_t j = 0; j < Nb; ++j) {
    const int64_t pos = 2 * j + 1, row = rows.b_row(j);
    const int64_t h0 = sc.head[j], h1 = sc.head[j + 1];
    if (h0 == h1) {
      scaled_copy(x + pos * C, size_of(pos), out + row * C, C);
      out_size[row] = size_of(pos);
      continue;
    }
    float den = size_of(pos);
    acc_init(acc, x + pos * C, den, C);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t k = sc.list[h];
      const float* S = sc.sp.data() + k * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += S[c];
      den += size_of(2 * src_idx[k]);
    }
    acc_store(acc, den, out + row * C, C);
    out_size[row] = den;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pyra_merge_cpu(
    const at::Tensor& x_, const at::Tensor& metric, int64_t r, const at::Tensor& a_, const at::Tensor& b_,
    const at::Tensor& ln_weight_, const at::Tensor& ln_bias_, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token, double eps) {
  CHECK_BND(x_);
  CHECK_BND(metric);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, "metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  checked_r(r, N, class_token, distill_token);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be a finite number > 0, got ", eps);
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&a_, "a"}, {&b_, "b"}, {&ln_weight_, "ln_weight"}, {&ln_bias_, "ln_bias"}};
  for (const auto& [t, name] : params) {
    CHECK_CPU_AS(*t, name);
    CHECK_FLOATING_AS(*t, name);
  }
  CHECK_SHAPE(a_, r, 1);
  CHECK_SHAPE(b_, 1, C);
  CHECK_SHAPE(ln_weight_, C);
  CHECK_SHAPE(ln_bias_, C);
  const int64_t Na = (N + 1) / 2;
  const at::Tensor x = x_.contiguous();
  const at::Tensor m = contiguous_f32(metric);
  const at::Tensor s = sizes_f32(size, B, N);
  const at::Tensor a = contiguous_f32(a_), bv = contiguous_f32(b_);
  const at::Tensor lw = contiguous_f32(ln_weight_), lb = contiguous_f32(ln_bias_);
  const PyraParams prm{a.data_ptr<float>(), bv.data_ptr<float>(), lw.data_ptr<float>(), lb.data_ptr<float>(),
                       static_cast<float>(eps)};
  const TomeMergeOutputs outs(x, r);
  const at::Tensor &out = outs.out, &out_size = outs.out_size, &src = outs.src, &dst = outs.dst;
  const at::Tensor &unm = outs.unm, &map = outs.map;
  const float* mp = m.data_ptr<float>();
  const float* sp_all = ptr_or_null(s);
  float* osp = out_size.data_ptr<float>();
  int64_t *sp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>();
  int64_t *up = unm.data_ptr<int64_t>(), *tp = map.data_ptr<int64_t>();
  if (r == 0) {  // the identity: x copied bit for bit, the sizes as given
    tome_identity_merge(x, s, m, outs, class_token, distill_token);
    return {out, out_size, src, dst, unm, map};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyra_merge", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TomeWorkspace ws;
      PyraScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        tome_match_image(mp + b * N * D, N, D, r, class_token, distill_token, ws, sp + b * r, dp + b * r,
                         up + b * (Na - r), tp + b * N);
        pyra_merge_image<scalar_t>(xp + b * N * C, sp_all ? sp_all + b * N : nullptr, N, C, r, distill_token,
                                   sp + b * r, dp + b * r, up + b * (Na - r), prm, op + b * (N - r) * C,
                                   osp + b * (N - r), sc);
      }
    });
  });
  return {out, out_size, src, dst, unm, map};
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) { m.impl("pyra_merge", &fpet::pyra_merge_cpu); }
