// FPET differentiable checkerboard matching on CPU: the forward merge (hard one-hot matching)
// and its straight-through backward (dense dL/dM through the soft matching). Contracts:
// csrc/README.md. fpet_merge_rows / fpet_merge_rows_backward (padded batches, issue 21): the same
// kernels with `padded` set: a token of size 0 is padding: scores with a padding token on either
// side are -inf (no match, no gradient), padding maps to -1, a valid A token of a row without a
// valid destination cell keeps output row p (docs/semantics.md "Padded batches and threshold merging").
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Positions of the A and B sets: p prefix tokens, then a row-major H x W grid.
struct FpetLayout {
  int64_t p, H, W, N, Na, Nb;
  std::vector<int64_t> a_pos, b_pos;

  FpetLayout(int64_t p_, int64_t H_, int64_t W_) : p(p_), H(H_), W(W_), N(p_ + H_ * W_) {
    auto cell = [&](int64_t h, int64_t w) { return p + h * W + w; };
    for (int64_t h = 0; h < H; h += 2)
      for (int64_t w = 0; w < W; w += 2) a_pos.push_back(cell(h, w));
    for (int64_t h = 1; h < H; h += 2)
      for (int64_t w = 1; w < W; w += 2) a_pos.push_back(cell(h, w));
    for (int64_t k = 0; k < p; ++k) b_pos.push_back(k);
    for (int64_t h = 1; h < H; h += 2)
      for (int64_t w = 0; w < W; w += 2) b_pos.push_back(cell(h, w));
    for (int64_t h = 0; h < H; h += 2)
      for (int64_t w = 1; w < W; w += 2) b_pos.push_back(cell(h, w));
    Na = static_cast<int64_t>(a_pos.size());
    Nb = static_cast<int64_t>(b_pos.size());
  }
};

// 0 <= num_prefix <= N, H, W >= 1, num_prefix + H * W == N (spec 2.1).
void check_layout(int64_t N, int64_t p, int64_t H, int64_t W) {
  TORCH_CHECK(p >= 0 && p <= N, "num_prefix must be in [0, N = ", N, "], got ", p);
  TORCH_CHECK(H >= 1 && W >= 1 && H <= N && W <= N, "grid H, W must be in [1, N = ", N, "], got ", H, ", ", W);
  TORCH_CHECK(p + H * W == N, "grid does not match the tokens: num_prefix + H * W = ", p, " + ", H, " * ", W,
              " != N = ", N);
}

// Normalised metric rows, scores and the top-2 of every A row, for one image.
struct FpetWorkspace {
  int64_t Dp = 0, Nbp = 0;
  std::vector<float> an, bn, bnt, scores, norm_a, norm_b, t, v1, v2;
  std::vector<int64_t> top1, top2;
};

// scores[i][j] = <a_i, b_j> (prefix columns -inf), row stride Nbp. t[i] = (top1 + top2) / 2;
// top1/top2 the column indices of the two largest values, lowest index first on ties, NaN scores
// skipped (-1: none, value -inf). `valid` (padded batches; null: every token): a score with an
// invalid token on either side is -inf.
void fpet_scores_image(const float* metric, const FpetLayout& L, int64_t D, FpetWorkspace& ws,
                       const uint8_t* valid = nullptr) {
  const int64_t Na = L.Na, Nb = L.Nb;
  const int64_t Dp = round_up(std::max<int64_t>(D, 1), kGemmNR);
  const int64_t Nbp = round_up(std::max<int64_t>(Nb, 1), kGemmNR);
  ws.Dp = Dp;
  ws.Nbp = Nbp;
  ws.an.assign(static_cast<size_t>(Na * Dp), 0.f);
  ws.bn.assign(static_cast<size_t>(Nb * Dp), 0.f);
  ws.bnt.assign(static_cast<size_t>(D * Nbp), 0.f);
  ws.scores.resize(static_cast<size_t>(Na * Nbp));
  ws.norm_a.resize(static_cast<size_t>(Na));
  ws.norm_b.resize(static_cast<size_t>(Nb));
  ws.t.resize(static_cast<size_t>(Na));
  ws.v1.resize(static_cast<size_t>(Na));
  ws.v2.resize(static_cast<size_t>(Na));
  ws.top1.resize(static_cast<size_t>(Na));
  ws.top2.resize(static_cast<size_t>(Na));
  for (int64_t i = 0; i < Na; ++i) ws.norm_a[i] = normalize_row(metric + L.a_pos[i] * D, ws.an.data() + i * Dp, D);
  for (int64_t j = 0; j < Nb; ++j) ws.norm_b[j] = normalize_row(metric + L.b_pos[j] * D, ws.bn.data() + j * Dp, D);
  transpose_pad(ws.bn.data(), Nb, D, Dp, ws.bnt.data(), Nbp);
  gemm_packed(Na, Nbp, D, ws.an.data(), Dp, 1, ws.bnt.data(), Nbp, ws.scores.data(), Nbp);
  const int64_t p = std::min(L.p, Nb);
  for (int64_t i = 0; i < Na; ++i) {
    float* s = ws.scores.data() + i * Nbp;
    for (int64_t j = 0; j < p; ++j) s[j] = kNegInf;
    if (valid) {
      const bool va = valid[L.a_pos[i]] != 0;
      for (int64_t j = p; j < Nb; ++j) {
        if (!va || !valid[L.b_pos[j]]) s[j] = kNegInf;
      }
    }
    float v1 = kNegInf, v2 = kNegInf;
    int64_t i1 = -1, i2 = -1;
    for (int64_t j = p; j < Nb; ++j) {
      const float v = s[j];
      if (v > v1) {
        v2 = v1;
        i2 = i1;
        v1 = v;
        i1 = j;
      } else if (v > v2) {
        v2 = v;
        i2 = j;
      }
    }
    ws.t[i] = (v1 + v2) / 2.0f;
    ws.v1[i] = v1;
    ws.v2[i] = v2;
    ws.top1[i] = i1;
    ws.top2[i] = i2;
  }
}

// The hard match of A row i: its top column iff top1 > top2 (compared as scores), else -1.
inline int64_t hard_match(const FpetWorkspace& ws, int64_t i) {
  const int64_t j = ws.top1[i];
  return j >= 0 && ws.v1[i] > ws.v2[i] ? j : -1;
}

struct MergeScratch {
  std::vector<float> acc, w;
  std::vector<int64_t> match, head, list, pos;
};

// Padded batches: valid[n] = (size[n] != 0), every token valid without sizes. Returns whether the
// image has a valid destination cell (a valid grid B token).
bool valid_tokens_image(const float* s, const FpetLayout& L, std::vector<uint8_t>& valid) {
  valid.resize(static_cast<size_t>(L.N));
  for (int64_t n = 0; n < L.N; ++n) valid[n] = s == nullptr || s[n] != 0.f;
  for (int64_t j = std::min(L.p, L.Nb); j < L.Nb; ++j) {
    if (valid[L.b_pos[j]]) return true;
  }
  return false;
}

// out[j] = (x_B[j] s_B[j] + sum_{i -> j, ascending i} x_A[i] s_A[i]) / (s_B[j] + sum s_A[i]),
// channels [c0, c1) of one image; match[i] read from token_map. `padded`: the B row itself takes part
// only where it maps to itself (a padding B token maps to -1 and is never read).
template <typename T>
void fpet_merge_image(const T* x, const float* s, const int64_t* token_map, const FpetLayout& L, int64_t C,
                      T* out, float* out_size, int64_t c0, int64_t c1, MergeScratch& sc, bool padded) {
  const int64_t cw = c1 - c0;
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  sc.match.resize(static_cast<size_t>(L.Na));
  for (int64_t i = 0; i < L.Na; ++i) sc.match[i] = token_map[L.a_pos[i]];
  group_by_destination(sc.match.data(), L.Na, L.Nb, sc.head, sc.list);
  sc.acc.resize(static_cast<size_t>(cw));
  sc.pos.resize(static_cast<size_t>(L.Na + 1));
  sc.w.resize(static_cast<size_t>(L.Na + 1));
  for (int64_t j = 0; j < L.Nb; ++j) {
    // The B row itself, then its sources in ascending A index.
    int64_t count = 0;
    float den = 0.f;
    if (!padded) {
      sc.pos[count] = L.b_pos[j];
      sc.w[count++] = size_of(L.b_pos[j]);
      den = sc.w[0];
    } else if (token_map[L.b_pos[j]] == j) {
      sc.pos[count] = L.b_pos[j];
      den = sc.w[count++] = size_of(L.b_pos[j]);
    }
    for (int64_t h = sc.head[j]; h < sc.head[j + 1]; ++h) {
      const int64_t apos = L.a_pos[sc.list[h]];
      sc.pos[count] = apos;
      sc.w[count] = size_of(apos);
      den += sc.w[count++];
    }
    weighted_mean_row(x + c0, C, sc.pos.data(), sc.w.data(), count, den, out + j * C + c0, cw, sc.acc.data());
    if (out_size) out_size[j] = den;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_impl(const at::Tensor& x_, const at::Tensor& metric,
                                                                const std::optional<at::Tensor>& size,
                                                                int64_t num_prefix, int64_t H, int64_t W,
                                                                bool padded) {
  CHECK_BND(x_);
  CHECK_BND(metric);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, "metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  check_layout(N, num_prefix, H, W);
  const FpetLayout L(num_prefix, H, W);
  const at::Tensor x = x_.contiguous();
  const at::Tensor m = contiguous_f32(metric);
  const at::Tensor s = sizes_f32(size, B, N);
  at::Tensor out = empty_output({B, L.Nb, C}, x.options());
  at::Tensor out_size = at::empty({B, L.Nb, 1}, x.options().dtype(at::kFloat));
  at::Tensor token_map = at::empty({B, N}, x.options().dtype(at::kLong));
  const float* mp = m.data_ptr<float>();
  const float* sp_all = ptr_or_null(s);
  float* osp = out_size.data_ptr<float>();
  int64_t* tp = token_map.data_ptr<int64_t>();
  const ChannelSplit split = split_channels(B, C, N);
  const bool fused = split.chunks == 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fpet_merge", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto merge = [&](int64_t b, int64_t c0, int64_t c1, bool write_size, MergeScratch& sc) {
      fpet_merge_image<scalar_t>(xp + b * N * C, sp_all ? sp_all + b * N : nullptr, tp + b * N, L, C,
                                 op + b * L.Nb * C, write_size ? osp + b * L.Nb : nullptr, c0, c1, sc, padded);
    };
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      FpetWorkspace ws;
      MergeScratch sc;
      std::vector<uint8_t> valid;
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* map = tp + b * N;
        if (!padded) {
          fpet_scores_image(mp + b * N * D, L, D, ws);
          for (int64_t j = 0; j < L.Nb; ++j) map[L.b_pos[j]] = j;
          for (int64_t i = 0; i < L.Na; ++i) map[L.a_pos[i]] = hard_match(ws, i);
        } else {
          const bool has_dst = valid_tokens_image(sp_all ? sp_all + b * N : nullptr, L, valid);
          fpet_scores_image(mp + b * N * D, L, D, ws, valid.data());
          for (int64_t j = 0; j < L.Nb; ++j) map[L.b_pos[j]] = valid[L.b_pos[j]] ? j : -1;
          for (int64_t i = 0; i < L.Na; ++i) {
            const int64_t pos = L.a_pos[i];
            map[pos] = !valid[pos] ? -1 : has_dst ? hard_match(ws, i) : num_prefix;  // short row: row p
          }
        }
        if (fused) merge(b, 0, C, true, sc);
      }
    });
    if (!fused) {  // fewer images than threads: merge in channel blocks
      for_each_channel_block<MergeScratch>(B, C, split, merge);
    }
  });
  return {out, out_size, token_map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_cpu(const at::Tensor& x, const at::Tensor& metric,
                                                               const std::optional<at::Tensor>& size,
                                                               int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_impl(x, metric, size, num_prefix, H, W, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_rows_cpu(const at::Tensor& x, const at::Tensor& metric,
                                                                    const std::optional<at::Tensor>& size,
                                                                    int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_impl(x, metric, size, num_prefix, H, W, true);
}

// ---------------------------------------------------------------------------------------------
// Backward. Per image, with z = x * s and M the forward one-hot matching:
//   g_num = grad_out / out_size, g_den = -<grad_out, out> / out_size + grad_size
//   G = z_A g_num^T + s_A g_den^T (dense dL/dM), P = G soft (1 - soft), dS = P - t's share
//   dA_n = dS B_n, dB_n = dS^T A_n, then through the row normalisation.
// ---------------------------------------------------------------------------------------------
struct BackwardScratch {
  std::vector<float> gnum, gnumt, gden, za, sa, G, dan, dbn, row, xrow;
  std::vector<int64_t> match;
  std::vector<uint8_t> valid;
};

// dm = (dn - n <n, dn>) / ||m||, and 0 when !(||m|| > 1e-12) (a zero or non-finite row: docs/semantics.md).
inline void normalize_backward(const float* n, const float* dn, float norm, float* dm, int64_t D) {
  if (!(norm > kNormEps) || std::isinf(norm)) {
    std::fill(dm, dm + D, 0.f);
    return;
  }
  const float nd = dot_f32(n, dn, D);
  for (int64_t d = 0; d < D; ++d) dm[d] = (dn[d] - n[d] * nd) / norm;
}

template <typename T>
void fpet_backward_image(const void* grad_out, at::ScalarType go_type, const float* grad_size, const T* x,
                         const float* metric, const float* s, const void* out, at::ScalarType out_type,
                         const float* out_size, const int64_t* token_map, const FpetLayout& L, int64_t C,
                         int64_t D, T* grad_x, float* grad_metric, float* grad_size_out, FpetWorkspace& ws,
                         BackwardScratch& sc, bool padded) {
  const int64_t Na = L.Na, Nb = L.Nb, p = std::min(L.p, Nb);
  if (padded) {
    valid_tokens_image(s, L, sc.valid);
    fpet_scores_image(metric, L, D, ws, sc.valid.data());
  } else {
    fpet_scores_image(metric, L, D, ws);
  }
  const int64_t Nbp = ws.Nbp, Dp = ws.Dp;
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const size_t go_esize = c10::elementSize(go_type), out_esize = c10::elementSize(out_type);

  // g_num [Nb][C], its transpose [C][Nbp] (zero padded), g_den [Nb].
  sc.gnum.resize(static_cast<size_t>(Nb * C));
  sc.gnumt.assign(static_cast<size_t>(C * Nbp), 0.f);
  sc.gden.resize(static_cast<size_t>(Nb));
  sc.row.resize(static_cast<size_t>(C));
  for (int64_t j = 0; j < Nb; ++j) {
    float* g = sc.gnum.data() + j * C;
    load_row_any(static_cast<const char*>(grad_out) + j * C * go_esize, go_type, g, C);
    load_row_any(static_cast<const char*>(out) + j * C * out_esize, out_type, sc.row.data(), C);
    const float os = out_size[j];
    float gd = 0.f;
    if (os == 0.f) {  // the output row is the constant 0: no gradient through it
      std::fill(g, g + C, 0.f);
    } else {
      gd = -dot_f32(g, sc.row.data(), C) / os;
      for (int64_t c = 0; c < C; ++c) g[c] = g[c] / os;
    }
    if (grad_size) gd += grad_size[j];
    sc.gden[j] = gd;
  }
  transpose_pad(sc.gnum.data(), Nb, C, C, sc.gnumt.data(), Nbp);
  // z_A [Na][C], s_A [Na], the forward matching.
  sc.za.resize(static_cast<size_t>(Na * C));
  sc.sa.resize(static_cast<size_t>(Na));
  sc.match.resize(static_cast<size_t>(Na));
  for (int64_t i = 0; i < Na; ++i) {
    const int64_t pos = L.a_pos[i];
    const float sv = size_of(pos);
    sc.sa[i] = sv;
    const T* xr = x + pos * C;
    float* z = sc.za.data() + i * C;
    for (int64_t c = 0; c < C; ++c) z[c] = static_cast<float>(xr[c]) * sv;
    const int64_t mt = token_map[pos];
    TORCH_CHECK(mt >= -1 && mt < Nb, "token_map entries of A tokens must be in [-1, ", Nb, "), got ", mt);
    sc.match[i] = mt;
  }
  // G = z_A g_num^T + s_A g_den^T, then dS in place.
  sc.G.resize(static_cast<size_t>(Na * Nbp));
  float* G = sc.G.data();
  gemm_packed(Na, Nbp, C, sc.za.data(), C, 1, sc.gnumt.data(), Nbp, G, Nbp);
  for (int64_t i = 0; i < Na; ++i) {
    float* g = G + i * Nbp;
    const float* sr = ws.scores.data() + i * Nbp;
    const float t = ws.t[i];
    float rowsum = 0.f;
    for (int64_t j = 0; j < Nb; ++j) {
      if (j < p || std::isnan(sr[j]) || (padded && sr[j] == kNegInf)) {  // prefix, NaN, padding: no part
        g[j] = 0.f;
        continue;
      }
      const float soft = sigmoid_f32(sr[j] - t);
      const float gij = g[j] + sc.sa[i] * sc.gden[j];
      const float pij = gij * soft * (1.0f - soft);
      g[j] = pij;
      rowsum += pij;
    }
    for (int64_t j = Nb; j < Nbp; ++j) g[j] = 0.f;
    const float half = 0.5f * rowsum;
    if (ws.top1[i] >= 0) g[ws.top1[i]] -= half;
    if (ws.top2[i] >= 0) g[ws.top2[i]] -= half;
  }
  // dA_n = dS B_n [Na][Dp], dB_n = dS^T A_n [Nb][Dp]; rows of a NaN metric (their dS entries are 0)
  // enter as 0 so that they spread no NaN.
  for (float& v : ws.an) v = std::isnan(v) ? 0.f : v;
  for (float& v : ws.bn) v = std::isnan(v) ? 0.f : v;
  sc.dan.resize(static_cast<size_t>(Na * Dp));
  sc.dbn.resize(static_cast<size_t>(Nb * Dp));
  gemm_packed(Na, Dp, Nb, G, Nbp, 1, ws.bn.data(), Dp, sc.dan.data(), Dp);
  gemm_packed(Nb, Dp, Na, G, 1, Nbp, ws.an.data(), Dp, sc.dbn.data(), Dp);
  for (int64_t i = 0; i < Na; ++i) {
    normalize_backward(ws.an.data() + i * Dp, sc.dan.data() + i * Dp, ws.norm_a[i],
                       grad_metric + L.a_pos[i] * D, D);
  }
  for (int64_t j = 0; j < Nb; ++j) {
    normalize_backward(ws.bn.data() + j * Dp, sc.dbn.data() + j * Dp, ws.norm_b[j],
                       grad_metric + L.b_pos[j] * D, D);
  }
  // grad_x = g_z * s; grad_size = <g_z, x> + g_den of the row it went to.
  sc.xrow.resize(static_cast<size_t>(C));
  for (int64_t i = 0; i < Na; ++i) {
    const int64_t pos = L.a_pos[i], j = sc.match[i];
    T* gx = grad_x + pos * C;
    if (j < 0) {
      std::fill(gx, gx + C, static_cast<T>(0.f));
      grad_size_out[pos] = 0.f;
      continue;
    }
    const float* g = sc.gnum.data() + j * C;
    const float sv = sc.sa[i];
    for (int64_t c = 0; c < C; ++c) gx[c] = static_cast<T>(g[c] * sv);
    load_row(x + pos * C, sc.xrow.data(), C);
    grad_size_out[pos] = dot_f32(g, sc.xrow.data(), C) + sc.gden[j];
  }
  for (int64_t j = 0; j < Nb; ++j) {
    const int64_t pos = L.b_pos[j];
    T* gx = grad_x + pos * C;
    if (padded && !sc.valid[pos]) {  // a padding B token: its slot is an output row of its own
      std::fill(gx, gx + C, static_cast<T>(0.f));
      grad_size_out[pos] = 0.f;
      continue;
    }
    const float* g = sc.gnum.data() + j * C;
    const float sv = size_of(pos);
    for (int64_t c = 0; c < C; ++c) gx[c] = static_cast<T>(g[c] * sv);
    load_row(x + pos * C, sc.xrow.data(), C);
    grad_size_out[pos] = dot_f32(g, sc.xrow.data(), C) + sc.gden[j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_backward_impl(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_size_, const at::Tensor& x_,
    const at::Tensor& metric, const std::optional<at::Tensor>& size, const at::Tensor& out_,
    const at::Tensor& out_size_, const at::Tensor& token_map_, int64_t num_prefix, int64_t H, int64_t W,
    bool padded) {
  CHECK_BND(x_);
  CHECK_BND(metric);
  CHECK_BND(grad_out_);
  CHECK_BND(out_);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, "metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  check_layout(N, num_prefix, H, W);
  const FpetLayout L(num_prefix, H, W);
  const int64_t Nb = L.Nb;
  CHECK_SHAPE(grad_out_, B, Nb, C);
  CHECK_SHAPE(out_, B, Nb, C);
  CHECK_CPU(out_size_);
  CHECK_FLOATING(out_size_);
  CHECK_SHAPE(out_size_, B, Nb, 1);
  CHECK_CPU(token_map_);
  CHECK_INDEX(token_map_);
  CHECK_SHAPE(token_map_, B, N);
  const at::Tensor x = x_.contiguous(), grad_out = grad_out_.contiguous(), out = out_.contiguous();
  const at::Tensor token_map = token_map_.contiguous();
  const at::Tensor m = contiguous_f32(metric);
  const at::Tensor s = sizes_f32(size, B, N);
  const at::Tensor gs = sizes_f32(grad_size_, B, Nb, "grad_size");
  const at::Tensor os = contiguous_f32(out_size_);
  at::Tensor grad_x = empty_output({B, N, C}, x.options());
  at::Tensor grad_metric = at::empty({B, N, D}, x.options().dtype(at::kFloat));
  at::Tensor grad_size = at::empty({B, N, 1}, x.options().dtype(at::kFloat));
  const float* mp = m.data_ptr<float>();
  const float* sp_all = ptr_or_null(s);
  const float* gsp = ptr_or_null(gs);
  const float* osp = os.data_ptr<float>();
  const int64_t* tp = token_map.data_ptr<int64_t>();
  float* gmp = grad_metric.data_ptr<float>();
  float* gszp = grad_size.data_ptr<float>();
  const at::ScalarType go_type = grad_out.scalar_type(), out_type = out.scalar_type();
  const char* gop = static_cast<const char*>(grad_out.data_ptr());
  const char* outp = static_cast<const char*>(out.data_ptr());
  const int64_t go_stride = Nb * C * static_cast<int64_t>(grad_out.element_size());
  const int64_t out_stride = Nb * C * static_cast<int64_t>(out.element_size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fpet_merge_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      FpetWorkspace ws;
      BackwardScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        fpet_backward_image<scalar_t>(gop + b * go_stride, go_type, gsp ? gsp + b * Nb : nullptr, xp + b * N * C,
                                      mp + b * N * D, sp_all ? sp_all + b * N : nullptr, outp + b * out_stride,
                                      out_type, osp + b * Nb, tp + b * N, L, C, D, gxp + b * N * C,
                                      gmp + b * N * D, gszp + b * N, ws, sc, padded);
      }
    });
  });
  if (metric.scalar_type() != at::kFloat) grad_metric = grad_metric.to(metric.scalar_type());
  return {grad_x, grad_metric, grad_size};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const at::Tensor& metric, const std::optional<at::Tensor>& size, const at::Tensor& out,
    const at::Tensor& out_size, const at::Tensor& token_map, int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_backward_impl(grad_out, grad_size, x, metric, size, out, out_size, token_map, num_prefix, H, W,
                                  false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_rows_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const at::Tensor& metric, const std::optional<at::Tensor>& size, const at::Tensor& out,
    const at::Tensor& out_size, const at::Tensor& token_map, int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_backward_impl(grad_out, grad_size, x, metric, size, out, out_size, token_map, num_prefix, H, W,
                                  true);
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) {
  m.impl("fpet_merge", &fpet::fpet_merge_cpu);
  m.impl("fpet_merge_backward", &fpet::fpet_merge_backward_cpu);
  m.impl("fpet_merge_rows", &fpet::fpet_merge_rows_cpu);
  m.impl("fpet_merge_rows_backward", &fpet::fpet_merge_rows_backward_cpu);
}
