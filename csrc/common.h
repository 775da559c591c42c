// Shared helpers of the fpet_kernels CPU kernels: argument checks, dtype conversion of rows,
// small float32 numerics (dot products, row normalisation), a packed float32 GEMM used for
// the score matrices, and the ToMe bipartite matching of one image.
//
// Everything here is deterministic: every float32 sum has a fixed order that does not depend
// on the thread count or on how the work is split.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Argument checks (TORCH_CHECK raises RuntimeError / ValueError-like c10::Error with the message)
// ---------------------------------------------------------------------------------------------
#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ", (x).sizes())
#define CHECK_FLOATING(x) \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating tensor, got ", (x).scalar_type())
#define CHECK_INDEX(x) \
  TORCH_CHECK((x).scalar_type() == at::kLong, #x " must be an int64 tensor, got ", (x).scalar_type())
#define CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), #x           \
              " must have shape ", at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), ", got ", \
              (x).sizes())
// A floating [B, N, D] CPU tensor.
#define CHECK_BND(x) \
  do {               \
    CHECK_CPU(x);    \
    CHECK_DIM(x, 3); \
    CHECK_FLOATING(x); \
  } while (0)

namespace fpet {

// Epsilon of the metric row normalisation, as F.normalize: m / max(||m||_2, 1e-12).
constexpr float kNormEps = 1e-12f;

// ---------------------------------------------------------------------------------------------
// Tensors in float32
// ---------------------------------------------------------------------------------------------

// Small operands (metric, size, PYRA parameters) are converted once, up front.
inline at::Tensor contiguous_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// `size` [B, N, 1] as a contiguous float32 tensor, or an undefined tensor when absent (all ones).
inline at::Tensor sizes_f32(const std::optional<at::Tensor>& size, int64_t B, int64_t N, const char* name = "size") {
  if (!size.has_value() || !size->defined()) return at::Tensor();
  const at::Tensor& s = *size;
  TORCH_CHECK(s.device().is_cpu(), name, " must be a CPU tensor, got ", s.device());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), name, " must be a floating tensor, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 3 && s.size(0) == B && s.size(1) == N && s.size(2) == 1, name, " must have shape [",
              B, ", ", N, ", 1], got ", s.sizes());
  return contiguous_f32(s);
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// ---------------------------------------------------------------------------------------------
// Rows of x in float32
// ---------------------------------------------------------------------------------------------

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

// A row of a tensor whose dtype is only known at run time (e.g. a gradient whose dtype may
// differ from x's). One switch per row, then a plain conversion loop.
inline void load_row_any(const void* src, at::ScalarType st, float* dst, int64_t n) {
  switch (st) {
    case at::kFloat: load_row(static_cast<const float*>(src), dst, n); break;
    case at::kHalf: load_row(static_cast<const c10::Half*>(src), dst, n); break;
    case at::kBFloat16: load_row(static_cast<const c10::BFloat16*>(src), dst, n); break;
    case at::kDouble: load_row(static_cast<const double*>(src), dst, n); break;
    default: TORCH_CHECK(false, "fpet_kernels: unsupported dtype ", st);
  }
}

// acc[c] = x[c] * s
template <typename T>
inline void acc_init(float* acc, const T* x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<float>(x[i]) * s;
}
// acc[c] += x[c] * s
template <typename T>
inline void acc_add(float* acc, const T* x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<float>(x[i]) * s;
}
// out[c] = acc[c] / den
template <typename T>
inline void acc_store(const float* acc, float den, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i] / den);
}
// out[c] = (x[c] * s) / s: a token that merges with nobody. Exact copy when s == 1.
template <typename T>
inline void scaled_copy(const T* x, float s, T* out, int64_t n) {
  if (s == 1.0f) {
    std::memcpy(out, x, static_cast<size_t>(n) * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>((static_cast<float>(x[i]) * s) / s);
  }
}

// ---------------------------------------------------------------------------------------------
// float32 numerics
// ---------------------------------------------------------------------------------------------

// <a, b> with 16 independent partial sums (vectorises without -ffast-math), fixed order.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  constexpr int L = 16;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0] + tail;
}

inline float sum_f32(const float* a, int64_t n) {
  constexpr int L = 16;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[i + l];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i];
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0] + tail;
}

// out = m / max(||m||, 1e-12); returns ||m|| (before the clamp). out may alias m.
inline float normalize_row(const float* m, float* out, int64_t n) {
  const float norm = std::sqrt(dot_f32(m, m, n));
  const float den = std::max(norm, kNormEps);
  for (int64_t i = 0; i < n; ++i) out[i] = m[i] / den;
  return norm;
}

inline float sigmoid_f32(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packed float32 GEMM:  Cm[m][n] = sum_{k < K} A(m, k) * Bt[k][n]
//   A(m, k) = A[m * rsa + k * csa]  (any strides: a row-major matrix or its transpose)
//   Bt      row-major [K][ldb], n contiguous; the caller pads n to a multiple of kGemmNR
//   Cm      row-major [M][ldc]
// Every output element is one sequential sum over k = 0 .. K-1 (vectorised across n), so the
// result does not depend on the tiling or the thread count, and no -ffast-math is needed.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kGemmNR = 8;   // columns per register tile (two SSE / one AVX vector)
constexpr int kGemmMR = 4;       // rows per register tile
constexpr int64_t kGemmKC = 256; // k block kept in L1

template <int MR>
inline void gemm_micro(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bt, int64_t ldb,
                       float* Cm, int64_t ldc, bool accumulate) {
  float acc[MR][kGemmNR];
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < kGemmNR; ++n) acc[r][n] = accumulate ? Cm[r * ldc + n] : 0.f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = Bt + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * rsa + k * csa];
#pragma omp simd
      for (int n = 0; n < kGemmNR; ++n) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < kGemmNR; ++n) Cm[r * ldc + n] = acc[r][n];
  }
}

// Np must be a multiple of kGemmNR (pad Bt and Cm with columns that are then ignored).
inline void gemm_packed(int64_t M, int64_t Np, int64_t K, const float* A, int64_t rsa, int64_t csa,
                        const float* Bt, int64_t ldb, float* Cm, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(Np % kGemmNR == 0);
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(Cm + m * ldc, Cm + m * ldc + Np, 0.f);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
    const int64_t kc = std::min(kGemmKC, K - k0);
    const bool accumulate = k0 > 0;
    const float* Ak = A + k0 * csa;
    const float* Bk = Bt + k0 * ldb;
    for (int64_t n0 = 0; n0 < Np; n0 += kGemmNR) {
      int64_t m0 = 0;
      for (; m0 + kGemmMR <= M; m0 += kGemmMR) {
        gemm_micro<kGemmMR>(kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate);
      }
      switch (M - m0) {
        case 3: gemm_micro<3>(kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        case 2: gemm_micro<2>(kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        case 1: gemm_micro<1>(kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        default: break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Work splitting: images, and channel blocks when there are fewer images than threads
// ---------------------------------------------------------------------------------------------
struct ChannelSplit {
  int64_t chunks;  // per image
  int64_t width;   // channels per chunk (the last one may be shorter)
  int64_t begin(int64_t c) const { return c * width; }
  int64_t end(int64_t c, int64_t C) const { return std::min(C, (c + 1) * width); }
};

inline ChannelSplit split_channels(int64_t B, int64_t C, int64_t min_width = 128) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = 1;
  if (B > 0 && B < threads && C >= 2 * min_width) {
    chunks = std::min((threads + B - 1) / B, C / min_width);
  }
  chunks = std::max<int64_t>(chunks, 1);
  int64_t width = round_up((C + chunks - 1) / chunks, 16);
  if (width <= 0) width = std::max<int64_t>(C, 1);
  chunks = std::max<int64_t>(1, (C + width - 1) / width);
  return {chunks, width};
}

// ---------------------------------------------------------------------------------------------
// ToMe bipartite matching of one image (shared by tome_match, tome_merge, pyra_merge)
// ---------------------------------------------------------------------------------------------

// Output rows of the merged sequence: [unm, B] or, with the distill token, [unm0, B0, unm1.., B1..].
struct TomeRows {
  int64_t Na, r;
  bool distill;
  int64_t unm_row(int64_t k) const { return distill ? (k == 0 ? 0 : k + 1) : k; }
  int64_t b_row(int64_t j) const { return distill && j == 0 ? 1 : Na - r + j; }
};

struct TomeWorkspace {
  std::vector<float> an, bnt, scores, row, best;
  std::vector<int64_t> dst, rank;
};

// NaN sorts first (as torch.sort(descending=True)): a strict weak order even with NaN.
inline bool score_greater(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

// metric: the float32 [N, D] rows of one image. Writes src [r], dst [r], unm [Na - r], map [N].
inline void tome_match_image(const float* metric, int64_t N, int64_t D, int64_t r, bool class_token,
                             bool distill_token, TomeWorkspace& ws, int64_t* src_idx, int64_t* dst_idx,
                             int64_t* unm_idx, int64_t* token_map) {
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  if (r == 0) {
    for (int64_t i = 0; i < Na; ++i) unm_idx[i] = i;
    for (int64_t n = 0; n < N; ++n) token_map[n] = n;
    return;
  }
  const int64_t Nbp = round_up(std::max<int64_t>(Nb, 1), kGemmNR);
  ws.an.resize(static_cast<size_t>(Na * D));
  ws.bnt.assign(static_cast<size_t>(D * Nbp), 0.f);
  ws.scores.resize(static_cast<size_t>(Na * Nbp));
  ws.row.resize(static_cast<size_t>(D));
  ws.best.resize(static_cast<size_t>(Na));
  ws.dst.resize(static_cast<size_t>(Na));
  ws.rank.resize(static_cast<size_t>(Na));

  // Normalised A rows (even positions), and B rows (odd positions) transposed to [D][Nbp].
  for (int64_t i = 0; i < Na; ++i) normalize_row(metric + (2 * i) * D, ws.an.data() + i * D, D);
  for (int64_t j = 0; j < Nb; ++j) {
    normalize_row(metric + (2 * j + 1) * D, ws.row.data(), D);
    for (int64_t d = 0; d < D; ++d) ws.bnt[d * Nbp + j] = ws.row[d];
  }
  gemm_packed(Na, Nbp, D, ws.an.data(), D, 1, ws.bnt.data(), Nbp, ws.scores.data(), Nbp);

  // best / lowest argmax per A row; class token row and distill token column are -inf.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t j_begin = distill_token ? 1 : 0;
  for (int64_t i = 0; i < Na; ++i) {
    float best = kNegInf;
    int64_t arg = 0;
    if (!(class_token && i == 0)) {
      const float* s = ws.scores.data() + i * Nbp;
      for (int64_t j = j_begin; j < Nb; ++j) {
        if (score_greater(s[j], best)) {
          best = s[j];
          arg = j;
        }
      }
    }
    ws.best[i] = best;
    ws.dst[i] = arg;
  }
  // Rank A rows by best descending, ties by lower i.
  std::iota(ws.rank.begin(), ws.rank.end(), int64_t{0});
  const float* best = ws.best.data();
  std::stable_sort(ws.rank.begin(), ws.rank.end(),
                   [best](int64_t a, int64_t b) { return score_greater(best[a], best[b]); });
  for (int64_t k = 0; k < r; ++k) {
    src_idx[k] = ws.rank[k];
    dst_idx[k] = ws.dst[ws.rank[k]];
  }
  std::copy(ws.rank.begin() + r, ws.rank.end(), unm_idx);
  if (class_token) std::sort(unm_idx, unm_idx + (Na - r));

  const TomeRows rows{Na, r, distill_token};
  for (int64_t k = 0; k < Na - r; ++k) token_map[2 * unm_idx[k]] = rows.unm_row(k);
  for (int64_t j = 0; j < Nb; ++j) token_map[2 * j + 1] = rows.b_row(j);
  for (int64_t k = 0; k < r; ++k) token_map[2 * src_idx[k]] = rows.b_row(dst_idx[k]);
}

// Sources of each destination row as a CSR list that keeps the order of `dst` (rank order):
// the sources of row j are list[head[j] .. head[j + 1]).
inline void group_by_destination(const int64_t* dst, int64_t count, int64_t n_rows, std::vector<int64_t>& head,
                                 std::vector<int64_t>& list) {
  head.assign(static_cast<size_t>(n_rows + 1), 0);
  list.resize(static_cast<size_t>(count));
  for (int64_t k = 0; k < count; ++k) {
    if (dst[k] >= 0) ++head[dst[k] + 1];
  }
  for (int64_t j = 0; j < n_rows; ++j) head[j + 1] += head[j];
  std::vector<int64_t> fill(head.begin(), head.end() - 1);
  for (int64_t k = 0; k < count; ++k) {
    if (dst[k] >= 0) list[fill[dst[k]]++] = k;
  }
}

}  // namespace fpet
