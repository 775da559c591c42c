// PYRA modulated merge along a GIVEN per-row matching on CPU (padded batches, threshold merging;
// issue 21, docs/semantics.md "Padded batches and threshold merging"): the op pyra_merge_rows and
// its closed-form backward pyra_merge_rows_backward. Reference and oracle:
// fpet_kernels/ops/pyra.py (pyra_merge_rows_op_reference, pyra_merge_rows_backward_reference).
//
// The matching comes in (tome_match_rows): src_idx / dst_idx [B, R] hold row b's r_b ranks, -1 after
// them (a rank k is live when src_idx[k] >= 0); token_map [B, N] sends every token to its output row
// (-1: padding, dropped). Per image: the live ranks' S = z_A[src], T = z_B[dst] (z = x * s),
// W = LayerNorm(S + T), wt[k] = 2 sigmoid(<W[k], b>) - 1, wc = 2 sigmoid(sum_k a[k] W[k]) over the live
// ranks only; the source's z is replaced by S' = S (1 + wc wt[k]); every output row m is
// sum z' / sum s over the tokens mapped to it (0 where the sizes sum to 0), in ascending token order.
//
// One image per task (at::parallel_for over B); the backward's parameter gradients are per-image
// partial sums reduced in ascending image order (results do not depend on the thread count).
// Every index is checked in range before anything runs (no write or read out of bounds on bad input).
#include <torch/library.h>

#include <array>

#include "common.h"
#include "pyra_grad.h"

namespace fpet {
namespace {

// Parameters in float32: a [R], b [C], ln_weight [C], ln_bias [C].
struct RowsParams {
  const float *a, *b, *ln_w, *ln_b;
  float eps;
};

struct RowsScratch {
  std::vector<float> S, Y, rstd, wt, wc, acc, den, g, xrow, orow, gwc, gv, gden;
  std::vector<int64_t> rank_of, dst_live, head, list;
};

// The modulation of one image: for every live rank k, S[k] = z_A[src_k], Y[k] = yh (the normalised
// S + T), rstd[k], wt[k]; wc [C]. Dead ranks: S = Y = 0, wt = 0, no part in wc. rank_of[i]: the live
// rank whose source is A token i (-1: none); dst_live[k]: dst_k of a live rank, else -1.
template <typename T>
void rows_modulation(const T* x, const float* s, int64_t N, int64_t C, int64_t R, const int64_t* src,
                     const int64_t* dst, const RowsParams& prm, RowsScratch& sc) {
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const int64_t Na = (N + 1) / 2;
  const auto rc = static_cast<size_t>(R * C), cz = static_cast<size_t>(C);
  sc.S.assign(rc, 0.f);
  sc.Y.assign(rc, 0.f);
  sc.rstd.assign(static_cast<size_t>(R), 0.f);
  sc.wt.assign(static_cast<size_t>(R), 0.f);
  sc.wc.assign(cz, 0.f);
  sc.acc.resize(cz);
  sc.rank_of.assign(static_cast<size_t>(Na), -1);
  sc.dst_live.assign(static_cast<size_t>(R), -1);
  float* w = sc.acc.data();
  float* wc = sc.wc.data();
  for (int64_t k = 0; k < R; ++k) {
    if (src[k] < 0) continue;
    sc.rank_of[src[k]] = k;
    sc.dst_live[k] = dst[k];
    const int64_t spos = 2 * src[k], dpos = 2 * dst[k] + 1;
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
    for (int64_t c = 0; c < C; ++c) wc[c] += ak * w[c];  // k ascending
  }
  for (int64_t c = 0; c < C; ++c) wc[c] = 2.0f * sigmoid_f32(wc[c]);
}

template <typename T>
void rows_forward_image(const T* x, const float* s, int64_t N, int64_t C, int64_t R, int64_t M, const int64_t* src,
                        const int64_t* dst, const int64_t* map, const RowsParams& prm, T* out, float* out_size,
                        RowsScratch& sc) {
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  rows_modulation(x, s, N, C, R, src, dst, prm, sc);
  // S'[k] = S[k] (1 + wc wt[k]), in place
  const float* wc = sc.wc.data();
  for (int64_t k = 0; k < R; ++k) {
    if (src[k] < 0) continue;
    float* Sk = sc.S.data() + k * C;
    const float wt = sc.wt[k];
    for (int64_t c = 0; c < C; ++c) Sk[c] = Sk[c] + Sk[c] * wc[c] * wt;
  }
  // every output row sums the z' of its tokens (ascending token order) and their sizes
  sc.g.assign(static_cast<size_t>(M * C), 0.f);
  sc.den.assign(static_cast<size_t>(M), 0.f);
  float* acc = sc.g.data();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t m = map[n];
    if (m < 0) continue;
    float* am = acc + m * C;
    const int64_t k = (n % 2 == 0) ? sc.rank_of[n / 2] : -1;
    if (k >= 0) {
      const float* Sk = sc.S.data() + k * C;
      for (int64_t c = 0; c < C; ++c) am[c] += Sk[c];
    } else {
      acc_add(am, x + n * C, size_of(n), C);
    }
    sc.den[m] += size_of(n);
  }
  for (int64_t m = 0; m < M; ++m) {
    acc_store(acc + m * C, sc.den[m], out + m * C, C);
    out_size[m] = sc.den[m];
  }
}

// A row-major [rows, C] tensor whose dtype is known at run time (grad_out, out).
struct AnyRowsRef {
  const char* base;
  at::ScalarType dtype;
  int64_t row_bytes;
  void load(int64_t row, float* dst, int64_t C) const { load_row_any(base + row * row_bytes, dtype, dst, C); }
};

// Partial sums of one image in part: [0, R) grad_a, then grad_b, grad_ln_weight, grad_ln_bias ([C] each).
template <typename T>
void rows_backward_image(const AnyRowsRef& go, const float* gos, const T* x, const float* s, const AnyRowsRef& out,
                         const float* os, int64_t N, int64_t C, int64_t R, int64_t M, const int64_t* src,
                         const int64_t* dst, const int64_t* map, const RowsParams& prm, T* gx, float* gsize,
                         float* part, RowsScratch& sc) {
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const int64_t Nb = N / 2;
  rows_modulation(x, s, N, C, R, src, dst, prm, sc);
  const auto cz = static_cast<size_t>(C);
  sc.g.resize(cz);
  sc.xrow.resize(cz);
  sc.orow.resize(cz);
  sc.gwc.assign(cz, 0.f);
  sc.gv.assign(static_cast<size_t>(R), 0.f);
  sc.gden.resize(static_cast<size_t>(M));
  float *g = sc.g.data(), *w = sc.acc.data(), *wc = sc.wc.data(), *gwc = sc.gwc.data();
  float* ga = part;
  float *gb = part + R, *glw = part + R + C, *glb = part + R + 2 * C;
  std::fill(part, part + R + 3 * C, 0.f);
  // g_num[m] = grad_out[m] / out_size[m], 0 where out_size[m] == 0 (the row is the constant 0); 0 for map -1
  auto gnum = [&](int64_t m, float* dstv) {
    if (m < 0 || os[m] == 0.f) {
      std::fill(dstv, dstv + C, 0.f);
      return;
    }
    const float den = os[m];
    go.load(m, dstv, C);
    for (int64_t c = 0; c < C; ++c) dstv[c] = dstv[c] / den;
  };
  // 1. G[k] = g_num of the source's row; g_wt[k] = <G S, wc>, g_wc = sum_k G S wt[k]; through the sigmoids
  for (int64_t k = 0; k < R; ++k) {
    if (src[k] < 0) continue;
    gnum(map[2 * src[k]], g);
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
  // 2. parameters, and the LayerNorm backward: g_y[k] (kept in Y)
  for (int64_t k = 0; k < R; ++k) {
    if (src[k] < 0) continue;
    pyra_grad::rank_backward(sc.Y.data() + k * C, sc.rstd[k], sc.gv[k], prm.a[k], gu, prm.b, prm.ln_w, prm.ln_b,
                             ga + k, gb, glw, glb, w, g, C);
  }
  // 3. per output row: g_den[m] = -<g_num[m], out[m]> (+ grad_out_size[m])
  for (int64_t m = 0; m < M; ++m) {
    gnum(m, g);
    out.load(m, sc.orow.data(), C);
    sc.gden[m] = -dot_f32(g, sc.orow.data(), C) + (gos ? gos[m] : 0.0f);
  }
  // 4. per token: g_z = G (a source: G (1 + wc wt) + g_y; a destination: + the g_y of its sources, rank order)
  group_by_destination(sc.dst_live.data(), R, Nb, sc.head, sc.list);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t m = map[n];
    gnum(m, g);
    if (n % 2 == 0) {
      const int64_t k = sc.rank_of[n / 2];
      if (k >= 0) {
        const float wt = sc.wt[k];
        const float* gy = sc.Y.data() + k * C;
        for (int64_t c = 0; c < C; ++c) g[c] = g[c] * (1.0f + wc[c] * wt) + gy[c];
      }
    } else {
      const int64_t j = n / 2;
      for (int64_t h = sc.head[j]; h < sc.head[j + 1]; ++h) {
        const float* gy = sc.Y.data() + sc.list[h] * C;
        for (int64_t c = 0; c < C; ++c) g[c] += gy[c];
      }
    }
    const float sv = size_of(n);
    T* gxr = gx + n * C;
    for (int64_t c = 0; c < C; ++c) gxr[c] = static_cast<T>(g[c] * sv);
    load_row(x + n * C, sc.xrow.data(), C);
    gsize[n] = dot_f32(g, sc.xrow.data(), C) + (m >= 0 ? sc.gden[m] : 0.0f);
  }
}

// ----------------------------------------------------------------------------- argument checks
void check_tensor(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape, bool index) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  if (index) {
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", t.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                t.scalar_type());
  }
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The shapes of the op's common arguments; returns (B, N, C, R).
std::array<int64_t, 4> check_common(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& size,
                                    const at::Tensor& src, const at::Tensor& dst, const at::Tensor& map,
                                    const at::Tensor& a, const at::Tensor& b, const at::Tensor& lw,
                                    const at::Tensor& lb, double eps) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have 3 dimensions [B, N, C], got shape ", x.sizes());
  TORCH_CHECK(src.dim() == 2, op, ": src_idx must have shape [B, R], got ", src.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), R = src.size(1);
  const int64_t Na = (N + 1) / 2;
  check_tensor(op, x, "x", {B, N, C}, false);
  TORCH_CHECK(R <= Na, op, ": src_idx must have at most ceil(N/2) = ", Na, " columns, got ", src.sizes());
  check_tensor(op, src, "src_idx", {B, R}, true);
  check_tensor(op, dst, "dst_idx", {B, R}, true);
  check_tensor(op, map, "token_map", {B, N}, true);
  if (size.has_value() && size->defined()) check_tensor(op, *size, "size", {B, N, 1}, false);
  check_tensor(op, a, "a", {R, 1}, false);
  check_tensor(op, b, "b", {1, C}, false);
  check_tensor(op, lw, "ln_weight", {C}, false);
  check_tensor(op, lb, "ln_bias", {C}, false);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite float, got ", eps);
  return {B, N, C, R};
}

// Index data: src_idx in [-1, Na), dst_idx in [0, Nb) where src_idx >= 0, token_map in [-1, n_out).
void check_indices(const char* op, const int64_t* src, const int64_t* dst, const int64_t* map, int64_t B, int64_t N,
                   int64_t R, int64_t n_out) {
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < R; ++k) {
      const int64_t i = src[b * R + k], j = dst[b * R + k];
      TORCH_CHECK(i >= -1 && i < Na, op, ": src_idx entries must be in [-1, ", Na, "), got ", i, " (row ", b, ")");
      TORCH_CHECK(i < 0 || (j >= 0 && j < Nb), op, ": dst_idx entries of live ranks (src_idx >= 0) must be in [0, ",
                  Nb, "), got ", j, " (row ", b, ")");
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t m = map[b * N + n];
      TORCH_CHECK(m >= -1 && m < n_out, op, ": token_map entries must be in [-1, ", n_out, "), got ", m, " (row ",
                  b, ")");
    }
  }
}

RowsParams params_f32(const at::Tensor& a, const at::Tensor& b, const at::Tensor& lw, const at::Tensor& lb,
                      double eps) {
  return RowsParams{a.data_ptr<float>(), b.data_ptr<float>(), lw.data_ptr<float>(), lb.data_ptr<float>(),
                    static_cast<float>(eps)};
}

constexpr const char* kFwd = "pyra_merge_rows";
constexpr const char* kBwd = "pyra_merge_rows_backward";

std::tuple<at::Tensor, at::Tensor> pyra_merge_rows_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& size,
                                                       const at::Tensor& src_idx_, const at::Tensor& dst_idx_,
                                                       const at::Tensor& token_map_, const at::Tensor& a_,
                                                       const at::Tensor& b_, const at::Tensor& ln_weight_,
                                                       const at::Tensor& ln_bias_, int64_t n_out, double eps) {
  const auto [B, N, C, R] =
      check_common(kFwd, x_, size, src_idx_, dst_idx_, token_map_, a_, b_, ln_weight_, ln_bias_, eps);
  TORCH_CHECK(n_out >= 0 && n_out <= std::min<int64_t>(N, kMaxOutRows), kFwd, ": n_out must be in [0, ", N,
              "] (x has N = ", N, " tokens), got ", n_out);
  const at::Tensor x = x_.contiguous();
  const at::Tensor src = src_idx_.contiguous(), dst = dst_idx_.contiguous(), map = token_map_.contiguous();
  const int64_t *sp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>(), *mp = map.data_ptr<int64_t>();
  check_indices(kFwd, sp, dp, mp, B, N, R, n_out);
  const at::Tensor s = sizes_f32(size, B, N);
  const at::Tensor a = contiguous_f32(a_), bv = contiguous_f32(b_);
  const at::Tensor lw = contiguous_f32(ln_weight_), lb = contiguous_f32(ln_bias_);
  const RowsParams prm = params_f32(a, bv, lw, lb, eps);
  at::Tensor out = empty_output({B, n_out, C}, x.options());
  at::Tensor out_size = at::empty({B, n_out, 1}, x.options().dtype(at::kFloat));
  const float* s_all = ptr_or_null(s);
  float* osp = out_size.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwd, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      RowsScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        rows_forward_image<scalar_t>(xp + b * N * C, s_all ? s_all + b * N : nullptr, N, C, R, n_out, sp + b * R,
                                     dp + b * R, mp + b * N, prm, op + b * n_out * C, osp + b * n_out, sc);
      }
    });
  });
  return {out, out_size};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pyra_merge_rows_backward_cpu(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_out_size, const at::Tensor& x_,
    const std::optional<at::Tensor>& size, const at::Tensor& out_, const at::Tensor& out_size_,
    const at::Tensor& src_idx_, const at::Tensor& dst_idx_, const at::Tensor& token_map_, const at::Tensor& a_,
    const at::Tensor& b_, const at::Tensor& ln_weight_, const at::Tensor& ln_bias_, double eps) {
  const auto [B, N, C, R] =
      check_common(kBwd, x_, size, src_idx_, dst_idx_, token_map_, a_, b_, ln_weight_, ln_bias_, eps);
  TORCH_CHECK(grad_out_.dim() == 3, kBwd, ": grad_out must have shape [B, n_out, C], got ", grad_out_.sizes());
  const int64_t M = grad_out_.size(1);
  TORCH_CHECK(M <= N, kBwd, ": grad_out must have at most N = ", N, " rows, got ", grad_out_.sizes());
  check_tensor(kBwd, grad_out_, "grad_out", {B, M, C}, false);
  check_tensor(kBwd, out_, "out", {B, M, C}, false);
  check_tensor(kBwd, out_size_, "out_size", {B, M, 1}, false);
  if (grad_out_size.has_value() && grad_out_size->defined()) {
    check_tensor(kBwd, *grad_out_size, "grad_out_size", {B, M, 1}, false);
  }
  const at::Tensor x = x_.contiguous(), grad_out = grad_out_.contiguous(), out = out_.contiguous();
  const at::Tensor src = src_idx_.contiguous(), dst = dst_idx_.contiguous(), map = token_map_.contiguous();
  const int64_t *sp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>(), *mp = map.data_ptr<int64_t>();
  check_indices(kBwd, sp, dp, mp, B, N, R, M);
  const at::Tensor s = sizes_f32(size, B, N);
  const at::Tensor gs = sizes_f32(grad_out_size, B, M, "grad_out_size");
  const at::Tensor os = contiguous_f32(out_size_);
  const at::Tensor a = contiguous_f32(a_), bv = contiguous_f32(b_);
  const at::Tensor lw = contiguous_f32(ln_weight_), lb = contiguous_f32(ln_bias_);
  const RowsParams prm = params_f32(a, bv, lw, lb, eps);
  at::Tensor grad_x = empty_output({B, N, C}, x.options());
  at::Tensor grad_size = at::empty({B, N, 1}, x.options().dtype(at::kFloat));
  const int64_t P = R + 3 * C;
  at::Tensor part = at::empty({B, P}, x.options().dtype(at::kFloat));
  const float* s_all = ptr_or_null(s);
  const float* gs_all = ptr_or_null(gs);
  const float* osp = os.data_ptr<float>();
  float* gszp = grad_size.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const auto rows_of = [&](const at::Tensor& t, int64_t b) {
    return AnyRowsRef{static_cast<const char*>(t.data_ptr()) + b * M * C * t.element_size(), t.scalar_type(),
                      C * static_cast<int64_t>(t.element_size())};
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwd, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      RowsScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        rows_backward_image<scalar_t>(rows_of(grad_out, b), gs_all ? gs_all + b * M : nullptr, xp + b * N * C,
                                      s_all ? s_all + b * N : nullptr, rows_of(out, b), osp + b * M, N, C, R, M,
                                      sp + b * R, dp + b * R, mp + b * N, prm, gxp + b * N * C, gszp + b * N,
                                      pp + b * P, sc);
      }
    });
  });
  // the parameter gradients: the images' partial sums in ascending image order (columns in parallel)
  at::Tensor total = at::zeros({P}, x.options().dtype(at::kFloat));
  float* tp = total.data_ptr<float>();
  at::parallel_for(0, P, 256, [&](int64_t q0, int64_t q1) {
    for (int64_t b = 0; b < B; ++b) {
      const float* row = pp + b * P;
      for (int64_t q = q0; q < q1; ++q) tp[q] += row[q];
    }
  });
  at::Tensor grad_a = total.narrow(0, 0, R).view({R, 1}).to(a_.scalar_type(), false, true);
  at::Tensor grad_b = total.narrow(0, R, C).view({1, C}).to(b_.scalar_type(), false, true);
  at::Tensor grad_lw = total.narrow(0, R + C, C).to(ln_weight_.scalar_type(), false, true);
  at::Tensor grad_lb = total.narrow(0, R + 2 * C, C).to(ln_bias_.scalar_type(), false, true);
  if (out_size_.scalar_type() != at::kFloat) grad_size = grad_size.to(out_size_.scalar_type());
  return {grad_x, grad_a, grad_b, grad_lw, grad_lb, grad_size};
}

}  // namespace
}  // namespace fpet

// Registration: one line, so that the namespace can be switched at merge time.
TORCH_LIBRARY_IMPL(fpet, CPU, m) {
  m.impl("pyra_merge_rows", &fpet::pyra_merge_rows_cpu);
  m.impl("pyra_merge_rows_backward", &fpet::pyra_merge_rows_backward_cpu);
}
