// PYRA modulated merge on CPU (backward): the gradients of pyra_merge in x, a, b, ln_weight, ln_bias
// and size, from the forward's inputs and its matching (src/dst/unm indices). The LayerNorm
// statistics and the two weights are recomputed, nothing of the forward but its output is kept.
// Contract: csrc/README.md (pyra_merge_backward).
//
// One image per task (at::parallel_for over B). The parameter gradients are sums over images: every
// image writes its partial sums into its own row of a [B, r + 3C] buffer, which is then reduced in
// ascending image order, so results do not depend on the thread count.
#include <torch/library.h>

#include "common.h"
#include "pyra_grad.h"

namespace fpet {
namespace {

struct PyraBwdScratch {
  std::vector<float> S, Y, w, g, wc, wt, gwc, gv, rstd, gden, xrow, orow;
  std::vector<int64_t> head, list;
};

// Parameters in float32: a [r], b [C], ln_weight [C], ln_bias [C].
struct PyraBwdParams {
  const float *a, *b, *ln_w, *ln_b;
  float eps;
};

// A row-major [rows, C] tensor whose dtype is known at run time (grad_out, out).
struct AnyRows {
  const char* base;
  at::ScalarType dtype;
  int64_t row_bytes;
  void load(int64_t row, float* dst, int64_t C) const { load_row_any(base + row * row_bytes, dtype, dst, C); }
};

// Partial sums of one image: part[0 .. r) grad_a, then grad_b, grad_ln_weight, grad_ln_bias ([C] each).
template <typename T>
void pyra_backward_image(const AnyRows& go, const float* gos, const T* x, const float* s, const AnyRows& out,
                         const float* os, int64_t N, int64_t C, int64_t r, bool distill_token, const int64_t* src_idx,
                         const int64_t* dst_idx, const int64_t* unm_idx, const PyraBwdParams& prm, T* gx,
                         float* gsize, float* part, PyraBwdScratch& sc) {
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const int64_t Na = (N + 1) / 2, Nb = N / 2, M = N - r;
  const TomeRows rows{Na, r, distill_token};
  const auto rc = static_cast<size_t>(r * C), cz = static_cast<size_t>(C);
  sc.S.resize(rc);
  sc.Y.resize(rc);
  sc.w.resize(cz);
  sc.g.resize(cz);
  sc.xrow.resize(cz);
  sc.orow.resize(cz);
  sc.wc.assign(cz, 0.f);
  sc.gwc.assign(cz, 0.f);
  sc.wt.resize(static_cast<size_t>(r));
  sc.gv.resize(static_cast<size_t>(r));
  sc.rstd.resize(static_cast<size_t>(r));
  sc.gden.resize(static_cast<size_t>(M));
  float *w = sc.w.data(), *g = sc.g.data(), *wc = sc.wc.data(), *gwc = sc.gwc.data();
  float* ga = part;
  float *gb = part + r, *glw = part + r + C, *glb = part + r + 2 * C;
  std::fill(part, part + r + 3 * C, 0.f);
  // g_num[m] = grad_out[m] / out_size[m], 0 where out_size[m] == 0 (the output row is the constant 0)
  auto gnum = [&](int64_t m, float* dst) {
    const float den = os[m];
    if (den == 0.f) {
      std::fill(dst, dst + C, 0.f);
      return;
    }
    go.load(m, dst, C);
    for (int64_t c = 0; c < C; ++c) dst[c] = dst[c] / den;
  };

  // 1. S[k] = z_A[src_k], yh[k] = (S + T - mean) * rstd (kept in Y), W = yh * ln_w + ln_b,
  //    wt[k] = 2 sigmoid(<W, b>) - 1, u[c] = sum_k a[k] W[k, c] (k ascending) -> wc = 2 sigmoid(u)
  for (int64_t k = 0; k < r; ++k) {
    const int64_t spos = 2 * src_idx[k], dpos = 2 * dst_idx[k] + 1;
    float* Sk = sc.S.data() + k * C;
    float* Yk = sc.Y.data() + k * C;
    acc_init(Sk, x + spos * C, size_of(spos), C);
    acc_init(Yk, x + dpos * C, size_of(dpos), C);
    for (int64_t c = 0; c < C; ++c) Yk[c] = Sk[c] + Yk[c];
    const float mean = sum_f32(Yk, C) / static_cast<float>(C);
    for (int64_t c = 0; c < C; ++c) Yk[c] = Yk[c] - mean;
    const float var = dot_f32(Yk, Yk, C) / static_cast<float>(C);
    const float rstd = 1.0f / std::sqrt(var + prm.eps);
    sc.rstd[k] = rstd;
    for (int64_t c = 0; c < C; ++c) Yk[c] = Yk[c] * rstd;
    for (int64_t c = 0; c < C; ++c) w[c] = Yk[c] * prm.ln_w[c] + prm.ln_b[c];
    sc.wt[k] = 2.0f * sigmoid_f32(dot_f32(w, prm.b, C)) - 1.0f;
    const float ak = prm.a[k];
    for (int64_t c = 0; c < C; ++c) wc[c] += ak * w[c];
  }
  for (int64_t c = 0; c < C; ++c) wc[c] = 2.0f * sigmoid_f32(wc[c]);

  // 2. G[k] = g_num of k's destination row; g_wt[k] = <G S, wc>, g_wc[c] = sum_k (G S)[k, c] wt[k];
  //    through the sigmoids: g_v[k] = g_wt[k] 2 sv (1 - sv) with sv = (wt + 1) / 2, g_u = g_wc wc (1 - wc / 2)
  for (int64_t k = 0; k < r; ++k) {
    gnum(rows.b_row(dst_idx[k]), g);
    const float* Sk = sc.S.data() + k * C;
    for (int64_t c = 0; c < C; ++c) g[c] = g[c] * Sk[c];
    const float gwt = dot_f32(g, wc, C);
    const float wt = sc.wt[k];
    for (int64_t c = 0; c < C; ++c) gwc[c] += g[c] * wt;
    const float sv = (wt + 1.0f) / 2.0f;
    sc.gv[k] = gwt * 2.0f * sv * (1.0f - sv);
  }
  float* gu = gwc;
  for (int64_t c = 0; c < C; ++c) gu[c] = gwc[c] * wc[c] * (1.0f - wc[c] / 2.0f);

  // 3. parameters: grad_a[k] = <g_u, W[k]>, grad_b += g_v[k] W[k]; g_W = a[k] g_u + g_v[k] b,
  //    grad_ln_weight += g_W yh, grad_ln_bias += g_W; the LayerNorm backward gives g_y[k] (kept in Y).
  for (int64_t k = 0; k < r; ++k) {
    pyra_grad::rank_backward(sc.Y.data() + k * C, sc.rstd[k], sc.gv[k], prm.a[k], gu, prm.b, prm.ln_w, prm.ln_b,
                             ga + k, gb, glw, glb, w, g, C);
  }

  // 4. per output row: g_den[m] = -<g_num[m], out[m]> (+ grad_out_size[m])
  for (int64_t m = 0; m < M; ++m) {
    gnum(m, g);
    out.load(m, sc.orow.data(), C);
    sc.gden[m] = -dot_f32(g, sc.orow.data(), C) + (gos ? gos[m] : 0.0f);
  }
  // 5. per token, with g_z its gradient in z = x * s: grad_x = g_z * s, grad_size = <g_z, x> + g_den[row]
  auto emit = [&](int64_t pos, int64_t row, const float* gz) {
    const float sv = size_of(pos);
    T* gxr = gx + pos * C;
    for (int64_t c = 0; c < C; ++c) gxr[c] = static_cast<T>(gz[c] * sv);
    load_row(x + pos * C, sc.xrow.data(), C);
    gsize[pos] = dot_f32(gz, sc.xrow.data(), C) + sc.gden[row];
  };
  for (int64_t k = 0; k < Na - r; ++k) {  // unmerged A rows: g_num of their row
    const int64_t row = rows.unm_row(k);
    gnum(row, g);
    emit(2 * unm_idx[k], row, g);
  }
  for (int64_t k = 0; k < r; ++k) {  // sources: G (1 + wc wt[k]) + g_y[k]
    const int64_t row = rows.b_row(dst_idx[k]);
    gnum(row, g);
    const float wt = sc.wt[k];
    const float* gy = sc.Y.data() + k * C;
    for (int64_t c = 0; c < C; ++c) g[c] = g[c] * (1.0f + wc[c] * wt) + gy[c];
    emit(2 * src_idx[k], row, g);
  }
  group_by_destination(dst_idx, r, Nb, sc.head, sc.list);
  for (int64_t j = 0; j < Nb; ++j) {  // B rows: g_num + the g_y of their sources (rank order)
    const int64_t row = rows.b_row(j);
    gnum(row, g);
    for (int64_t h = sc.head[j]; h < sc.head[j + 1]; ++h) {
      const float* gy = sc.Y.data() + sc.list[h] * C;
      for (int64_t c = 0; c < C; ++c) g[c] += gy[c];
    }
    emit(2 * j + 1, row, g);
  }
}

// src_idx, dst_idx, unm_idx of every image: in range, and src and unm together name every A row once
// (so that every position of grad_x is written exactly once).
void check_matching(const int64_t* src, const int64_t* dst, const int64_t* unm, int64_t B, int64_t Na, int64_t Nb,
                    int64_t r) {
  std::vector<uint8_t> seen(static_cast<size_t>(Na));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), uint8_t{0});
    for (int64_t k = 0; k < r; ++k) {
      const int64_t i = src[b * r + k], j = dst[b * r + k];
      TORCH_CHECK(i >= 0 && i < Na, "pyra_merge_backward: src_idx entries must be in [0, ", Na, "), got ", i,
                  " (image ", b, ")");
      TORCH_CHECK(j >= 0 && j < Nb, "pyra_merge_backward: dst_idx entries must be in [0, ", Nb, "), got ", j,
                  " (image ", b, ")");
      TORCH_CHECK(!seen[i], "pyra_merge_backward: A row ", i, " appears twice in src_idx (image ", b, ")");
      seen[i] = 1;
    }
    for (int64_t k = 0; k < Na - r; ++k) {
      const int64_t i = unm[b * (Na - r) + k];
      TORCH_CHECK(i >= 0 && i < Na, "pyra_merge_backward: unm_idx entries must be in [0, ", Na, "), got ", i,
                  " (image ", b, ")");
      TORCH_CHECK(!seen[i], "pyra_merge_backward: A row ", i,
                  " appears twice in src_idx and unm_idx together (image ", b, ")");
      seen[i] = 1;
    }
  }
}

constexpr const char* kOp = "pyra_merge_backward";

// Argument checks that name the argument (the arguments arrive through loops and helpers, where the
// CHECK_* macros of common.h would print the C++ expression).
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, bool index) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", t.device());
  if (index) {
    TORCH_CHECK(t.scalar_type() == at::kLong, kOp, ": ", name, " must be an int64 tensor, got ", t.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, ": ", name, " must be a floating tensor, got ",
                t.scalar_type());
  }
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pyra_merge_backward_cpu(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_out_size, const at::Tensor& x_,
    const std::optional<at::Tensor>& size, const at::Tensor& out_, const at::Tensor& out_size_,
    const at::Tensor& src_idx_, const at::Tensor& dst_idx_, const at::Tensor& unm_idx_, const at::Tensor& a_,
    const at::Tensor& b_, const at::Tensor& ln_weight_, const at::Tensor& ln_bias_, double eps, bool distill_token) {
  TORCH_CHECK(x_.dim() == 3, kOp, ": x must have 3 dimensions [B, N, C], got shape ", x_.sizes());
  TORCH_CHECK(src_idx_.dim() == 2, kOp, ": src_idx must have shape [B, r], got ", src_idx_.sizes());
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2);
  const int64_t Na = (N + 1) / 2, Nb = N / 2, r = src_idx_.size(1);
  check_tensor(x_, "x", {B, N, C}, false);
  TORCH_CHECK(r <= Na && r <= Nb, kOp, ": src_idx must have at most min(ceil(N/2), N//2) = ", std::min(Na, Nb),
              " columns, got ", src_idx_.sizes());
  TORCH_CHECK(!distill_token || Nb == 0 || r < Na, kOp,
              ": with distill_token, at least one A row must stay unmerged, got r = ", r);
  check_tensor(src_idx_, "src_idx", {B, r}, true);
  check_tensor(dst_idx_, "dst_idx", {B, r}, true);
  check_tensor(unm_idx_, "unm_idx", {B, Na - r}, true);
  check_tensor(grad_out_, "grad_out", {B, N - r, C}, false);
  check_tensor(out_, "out", {B, N - r, C}, false);
  check_tensor(out_size_, "out_size", {B, N - r, 1}, false);
  if (grad_out_size.has_value() && grad_out_size->defined()) {
    check_tensor(*grad_out_size, "grad_out_size", {B, N - r, 1}, false);
  }
  if (size.has_value() && size->defined()) check_tensor(*size, "size", {B, N, 1}, false);
  check_tensor(a_, "a", {r, 1}, false);
  check_tensor(b_, "b", {1, C}, false);
  check_tensor(ln_weight_, "ln_weight", {C}, false);
  check_tensor(ln_bias_, "ln_bias", {C}, false);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, kOp, ": eps must be a positive finite float, got ", eps);

  const at::Tensor x = x_.contiguous(), grad_out = grad_out_.contiguous(), out = out_.contiguous();
  const at::Tensor src = src_idx_.contiguous(), dst = dst_idx_.contiguous(), unm = unm_idx_.contiguous();
  const at::Tensor s = sizes_f32(size, B, N);
  const at::Tensor gs = sizes_f32(grad_out_size, B, N - r, "grad_out_size");
  const at::Tensor os = contiguous_f32(out_size_);
  const at::Tensor a = contiguous_f32(a_), bv = contiguous_f32(b_);
  const at::Tensor lw = contiguous_f32(ln_weight_), lb = contiguous_f32(ln_bias_);
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* dp = dst.data_ptr<int64_t>();
  const int64_t* up = unm.data_ptr<int64_t>();
  check_matching(sp, dp, up, B, Na, Nb, r);

  const PyraBwdParams prm{a.data_ptr<float>(), bv.data_ptr<float>(), lw.data_ptr<float>(), lb.data_ptr<float>(),
                          static_cast<float>(eps)};
  at::Tensor grad_x = empty_output({B, N, C}, x.options());
  at::Tensor grad_size = at::empty({B, N, 1}, x.options().dtype(at::kFloat));
  const int64_t P = r + 3 * C;  // per-image partial sums of the parameter gradients
  at::Tensor part = at::empty({B, P}, x.options().dtype(at::kFloat));
  const float* s_all = ptr_or_null(s);
  const float* gs_all = ptr_or_null(gs);
  const float* osp = os.data_ptr<float>();
  float* gszp = grad_size.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const auto go_rows = [&](int64_t b) {
    return AnyRows{static_cast<const char*>(grad_out.data_ptr()) + b * (N - r) * C * grad_out.element_size(),
                   grad_out.scalar_type(), C * static_cast<int64_t>(grad_out.element_size())};
  };
  const auto out_rows = [&](int64_t b) {
    return AnyRows{static_cast<const char*>(out.data_ptr()) + b * (N - r) * C * out.element_size(),
                   out.scalar_type(), C * static_cast<int64_t>(out.element_size())};
  };

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyra_merge_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      PyraBwdScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        pyra_backward_image<scalar_t>(go_rows(b), gs_all ? gs_all + b * (N - r) : nullptr, xp + b * N * C,
                                      s_all ? s_all + b * N : nullptr, out_rows(b), osp + b * (N - r), N, C, r,
                                      distill_token, sp + b * r, dp + b * r, up + b * (Na - r), prm,
                                      gxp + b * N * C, gszp + b * N, pp + b * P, sc);
      }
    });
  });

  // The parameter gradients: the images' partial sums in ascending image order (columns in parallel).
  at::Tensor total = at::zeros({P}, x.options().dtype(at::kFloat));
  float* tp = total.data_ptr<float>();
  at::parallel_for(0, P, 256, [&](int64_t q0, int64_t q1) {
    for (int64_t b = 0; b < B; ++b) {
      const float* row = pp + b * P;
      for (int64_t q = q0; q < q1; ++q) tp[q] += row[q];
    }
  });
  // copy=true: every output gets its own storage, whatever the parameter dtypes.
  at::Tensor grad_a = total.narrow(0, 0, r).view({r, 1}).to(a_.scalar_type(), false, true);
  at::Tensor grad_b = total.narrow(0, r, C).view({1, C}).to(b_.scalar_type(), false, true);
  at::Tensor grad_lw = total.narrow(0, r + C, C).to(ln_weight_.scalar_type(), false, true);
  at::Tensor grad_lb = total.narrow(0, r + 2 * C, C).to(ln_bias_.scalar_type(), false, true);
  if (out_size_.scalar_type() != at::kFloat) grad_size = grad_size.to(out_size_.scalar_type());
  return {grad_x, grad_a, grad_b, grad_lw, grad_lb, grad_size};
}

}  // namespace
}  // namespace fpet

// Registration: one line, so that the namespace can be switched at merge time.
TORCH_LIBRARY_IMPL(fpet, CPU, m) { m.impl("pyra_merge_backward", &fpet::pyra_merge_backward_cpu); }
