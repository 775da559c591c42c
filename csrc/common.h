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
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SSE2__) || (defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)))
#include <immintrin.h>
#endif

// ---------------------------------------------------------------------------------------------
// Argument checks (TORCH_CHECK raises c10::Error, a RuntimeError in Python, naming the argument).
// The message names the op's argument: a kernel's local `x_` (the argument before .contiguous())
// is reported as `x` (fpet::arg_name); a check in a loop over several tensors names each one with
// the *_AS form. The message is built only when a check fails.
// ---------------------------------------------------------------------------------------------
#define CHECK_CPU_AS(x, name) \
  TORCH_CHECK((x).device().is_cpu(), ::fpet::arg_name(name), " must be a CPU tensor, got ", (x).device())
#define CHECK_FLOATING_AS(x, name)                                                                       \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), ::fpet::arg_name(name), " must be a floating tensor, got ", \
              (x).scalar_type())
#define CHECK_CPU(x) CHECK_CPU_AS(x, #x)
#define CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), ::fpet::arg_name(#x), " must have ", (d), " dimensions, got shape ", (x).sizes())
#define CHECK_FLOATING(x) CHECK_FLOATING_AS(x, #x)
#define CHECK_INDEX(x) \
  TORCH_CHECK((x).scalar_type() == at::kLong, ::fpet::arg_name(#x), " must be an int64 tensor, got ", (x).scalar_type())
#define CHECK_SHAPE(x, ...)                                                                              \
  TORCH_CHECK((x).sizes() == at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), ::fpet::arg_name(#x), \
              " must have shape ", at::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), ", got ", (x).sizes())
// A floating [B, N, D] CPU tensor.
#define CHECK_BND(x)   \
  do {                 \
    CHECK_CPU(x);      \
    CHECK_DIM(x, 3);   \
    CHECK_FLOATING(x); \
  } while (0)

namespace fpet {

// The op's name of a checked argument: a trailing '_' (a kernel's local copy) dropped.
inline std::string arg_name(const char* s) {
  std::string n(s);
  if (!n.empty() && n.back() == '_') n.pop_back();
  return n;
}

// Epsilon of the metric row normalisation, as F.normalize: m / max(||m||_2, 1e-12).
constexpr float kNormEps = 1e-12f;

// The output rows of a map-driven merge (merge_wavg, merge_sum): at most 2^31 - 1 on every backend
// (the CUDA and Triton kernels index rows with 32-bit integers), checked before anything is allocated.
constexpr int64_t kMaxOutRows = (int64_t{1} << 31) - 1;
inline void check_n_out(int64_t n_out) {
  TORCH_CHECK(n_out >= 0 && n_out <= kMaxOutRows, "n_out must be in [0, ", kMaxOutRows, "], got ", n_out);
}

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

// A large freshly allocated output is written once, page by page; on Linux the first touch of
// every 4 KiB page is a page fault, which for a 35 MB output costs more than the merge itself.
// Advising transparent huge pages for the 2 MiB-aligned interior of the buffer (what torch does
// for every allocation with THP_MEM_ALLOC_ENABLE=1) cuts the faults 512-fold. Advice only: no
// effect on values, a no-op where THP is disabled or unsupported.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a [B, rows, C] result that the kernel fills completely.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

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
// A merged row whose sizes sum to 0 is 0 (docs/semantics.md).
template <typename T>
inline void zero_row(T* out, int64_t n) {
  std::fill(out, out + n, static_cast<T>(0.f));
}
// out[c] = acc[c] / den (0 when den == 0)
template <typename T>
inline void acc_store(const float* acc, float den, T* out, int64_t n) {
  if (den == 0.f) return zero_row(out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i] / den);
}
// out[c] = (x[c] * s) / s: a token that merges with nobody. Exact copy when s == 1, 0 when s == 0.
template <typename T>
inline void scaled_copy(const T* x, float s, T* out, int64_t n) {
  if (s == 0.f) return zero_row(out, n);
  if (s == 1.0f) {
    std::memcpy(out, x, static_cast<size_t>(n) * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>((static_cast<float>(x[i]) * s) / s);
  }
}

// out[c] = (x[pos[0]][c] w[0] + x[pos[1]][c] w[1] + ...) / den, summed left to right in
// float32, for `count` >= 1 rows of x (row stride ldx). One pass over the rows for one or two
// terms; longer sums go through `acc` (n floats) with the first and last terms fused.
template <typename T>
inline void weighted_mean_row(const T* x, int64_t ldx, const int64_t* pos, const float* w, int64_t count, float den,
                              T* out, int64_t n, float* acc) {
  if (den == 0.f) return zero_row(out, n);
  if (count == 1 && w[0] == den) {
    scaled_copy(x + pos[0] * ldx, w[0], out, n);
    return;
  }
  const T* x0 = x + pos[0] * ldx;
  const float w0 = w[0];
  if (count == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>((static_cast<float>(x0[i]) * w0) / den);
    return;
  }
  const T* x1 = x + pos[1] * ldx;
  const float w1 = w[1];
  if (count == 2) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>((static_cast<float>(x0[i]) * w0 + static_cast<float>(x1[i]) * w1) / den);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<float>(x0[i]) * w0 + static_cast<float>(x1[i]) * w1;
  for (int64_t k = 2; k + 1 < count; ++k) acc_add(acc, x + pos[k] * ldx, w[k], n);
  const T* xl = x + pos[count - 1] * ldx;
  const float wl = w[count - 1];
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>((acc[i] + static_cast<float>(xl[i]) * wl) / den);
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

// The largest ToMe r (docs/semantics.md): (N - protected) / 2, and 0 when no B token may be a
// destination (the distillation token is the only B token).
inline int64_t tome_r_cap(int64_t N, bool class_token, bool distill_token) {
  if (N / 2 - int64_t(distill_token) <= 0) return 0;
  return std::max<int64_t>(0, (N - int64_t(class_token) - int64_t(distill_token)) / 2);
}

inline int64_t checked_r(int64_t r, int64_t N, bool class_token, bool distill_token) {
  const int64_t cap = tome_r_cap(N, class_token, distill_token);
  TORCH_CHECK(r >= 0 && r <= cap, "r must be in [0, ", cap, "] (the cap for N = ", N, " tokens), got ", r);
  return r;
}

// Copies x [B, N, C] exactly and the sizes as float32 (ones when absent): r == 0 is the identity.
inline void identity_merge(const at::Tensor& x, const at::Tensor& s, at::Tensor& out, at::Tensor& out_size) {
  out.copy_(x);
  if (s.defined()) {
    out_size.copy_(s.view(out_size.sizes()));
  } else {
    out_size.fill_(1.0f);
  }
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packed float32 GEMM:  Cm[m][n] = sum_{k < K} A(m, k) * Bt[k][n]
//   A(m, k) = A[m * rsa + k * csa]  (any strides: a row-major matrix or its transpose)
//   Bt      row-major [K][ldb], n contiguous; the caller pads n to a multiple of kGemmNR
//   Cm      row-major [M][ldc]
// Every output element is one sequential sum over k = 0 .. K-1, vectorised across n, so the
// result does not depend on the tiling or the thread count (no -ffast-math needed).
// On x86-64 CPUs with AVX2 + FMA the micro-kernel uses fused multiply-adds (chosen once at run
// time; FPET_CPU_NO_AVX2=1 forces the portable kernel): results are deterministic on a given
// machine, and may differ in the last bit between the two kernels.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kGemmNR = 16;  // columns per panel (the padding unit)
constexpr int kGemmMR = 4;       // rows per register tile
constexpr int64_t kGemmKC = 256; // k block kept in L1

// Portable micro-kernel: MR rows x 8 columns (two SSE vectors per row).
template <int MR>
inline void gemm_micro_generic(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bt, int64_t ldb,
                               float* Cm, int64_t ldc, bool accumulate) {
  constexpr int NR = 8;
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < NR; ++n) acc[r][n] = accumulate ? Cm[r * ldc + n] : 0.f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = Bt + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * rsa + k * csa];
#pragma omp simd
      for (int n = 0; n < NR; ++n) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int n = 0; n < NR; ++n) Cm[r * ldc + n] = acc[r][n];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FPET_X86_AVX2_DISPATCH 1
// AVX2 + FMA micro-kernel: MR rows x 16 columns (two AVX vectors per row). The accumulators are
// named variables (not an array) so that they stay in registers.
#define FPET_AVX2_ROW(r, STMT) \
  if constexpr (MR > r) {      \
    STMT(r)                    \
  }
#define FPET_AVX2_INIT(r)                                                          \
  lo##r = accumulate ? _mm256_loadu_ps(Cm + r * ldc) : _mm256_setzero_ps();     \
  hi##r = accumulate ? _mm256_loadu_ps(Cm + r * ldc + 8) : _mm256_setzero_ps();
#define FPET_AVX2_FMA(r)                                          \
  {                                                               \
    const __m256 a = _mm256_broadcast_ss(A + r * rsa + k * csa);  \
    lo##r = _mm256_fmadd_ps(a, b0, lo##r);                        \
    hi##r = _mm256_fmadd_ps(a, b1, hi##r);                        \
  }
#define FPET_AVX2_STORE(r)                   \
  _mm256_storeu_ps(Cm + r * ldc, lo##r);     \
  _mm256_storeu_ps(Cm + r * ldc + 8, hi##r);

template <int MR>
__attribute__((target("avx2,fma"))) inline void gemm_micro_avx2(int64_t K, const float* A, int64_t rsa,
                                                                int64_t csa, const float* Bt, int64_t ldb,
                                                                float* Cm, int64_t ldc, bool accumulate) {
  static_assert(MR >= 1 && MR <= 4, "gemm_micro_avx2: 1 to 4 rows");
  __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0, lo3 = lo0, hi3 = lo0;
  FPET_AVX2_ROW(0, FPET_AVX2_INIT)
  FPET_AVX2_ROW(1, FPET_AVX2_INIT)
  FPET_AVX2_ROW(2, FPET_AVX2_INIT)
  FPET_AVX2_ROW(3, FPET_AVX2_INIT)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bt + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(Bt + k * ldb + 8);
    FPET_AVX2_ROW(0, FPET_AVX2_FMA)
    FPET_AVX2_ROW(1, FPET_AVX2_FMA)
    FPET_AVX2_ROW(2, FPET_AVX2_FMA)
    FPET_AVX2_ROW(3, FPET_AVX2_FMA)
  }
  FPET_AVX2_ROW(0, FPET_AVX2_STORE)
  FPET_AVX2_ROW(1, FPET_AVX2_STORE)
  FPET_AVX2_ROW(2, FPET_AVX2_STORE)
  FPET_AVX2_ROW(3, FPET_AVX2_STORE)
}
#undef FPET_AVX2_ROW
#undef FPET_AVX2_INIT
#undef FPET_AVX2_FMA
#undef FPET_AVX2_STORE

inline bool cpu_has_avx2_fma() {
  static const bool yes = [] {
    const char* off = std::getenv("FPET_CPU_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
#endif

// One MR x 16 tile.
template <int MR>
inline void gemm_tile(bool avx2, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bt, int64_t ldb,
                      float* Cm, int64_t ldc, bool accumulate) {
#ifdef FPET_X86_AVX2_DISPATCH
  if (avx2) {
    gemm_micro_avx2<MR>(K, A, rsa, csa, Bt, ldb, Cm, ldc, accumulate);
    return;
  }
#endif
  (void)avx2;
  gemm_micro_generic<MR>(K, A, rsa, csa, Bt, ldb, Cm, ldc, accumulate);
  gemm_micro_generic<MR>(K, A, rsa, csa, Bt + 8, ldb, Cm + 8, ldc, accumulate);
}

// Np must be a multiple of kGemmNR (pad Bt and Cm with columns that are then ignored).
inline void gemm_packed(int64_t M, int64_t Np, int64_t K, const float* A, int64_t rsa, int64_t csa,
                        const float* Bt, int64_t ldb, float* Cm, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(Np % kGemmNR == 0);
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(Cm + m * ldc, Cm + m * ldc + Np, 0.f);
    return;
  }
  const bool avx2 = cpu_has_avx2_fma();
  for (int64_t k0 = 0; k0 < K; k0 += kGemmKC) {
    const int64_t kc = std::min(kGemmKC, K - k0);
    const bool accumulate = k0 > 0;
    const float* Ak = A + k0 * csa;
    const float* Bk = Bt + k0 * ldb;
    for (int64_t n0 = 0; n0 < Np; n0 += kGemmNR) {
      int64_t m0 = 0;
      for (; m0 + kGemmMR <= M; m0 += kGemmMR) {
        gemm_tile<kGemmMR>(avx2, kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate);
      }
      switch (M - m0) {
        case 3: gemm_tile<3>(avx2, kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        case 2: gemm_tile<2>(avx2, kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        case 1: gemm_tile<1>(avx2, kc, Ak + m0 * rsa, rsa, csa, Bk + n0, ldb, Cm + m0 * ldc + n0, ldc, accumulate); break;
        default: break;
      }
    }
  }
}

// dst[d][j] = src[j][d] for j < rows, d < cols (src row stride lds, dst row stride ldd), in
// blocks of 8 source rows so that every destination row gets contiguous writes.
inline void transpose_pad(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  int64_t j0 = 0;
  for (; j0 + 8 <= rows; j0 += 8) {
    for (int64_t d = 0; d < cols; ++d) {
      float* o = dst + d * ldd + j0;
      for (int jj = 0; jj < 8; ++jj) o[jj] = src[(j0 + jj) * lds + d];
    }
  }
  for (; j0 < rows; ++j0) {
    for (int64_t d = 0; d < cols; ++d) dst[d * ldd + j0] = src[j0 * lds + d];
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

// `rows` (tokens per image, 0 = unknown): below about 1M elements in all, waking a second thread
// costs more than the merge it would share (measured: ViT-B at B=1, 93 us on one thread vs 114 us on two).
inline ChannelSplit split_channels(int64_t B, int64_t C, int64_t rows = 0, int64_t min_width = 128) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = 1;
  const bool enough_work = rows == 0 || B * rows * C >= (int64_t{1} << 20);
  if (B > 0 && B < threads && C >= 2 * min_width && enough_work) {
    chunks = std::min((threads + B - 1) / B, C / min_width);
  }
  chunks = std::max<int64_t>(chunks, 1);
  int64_t width = round_up((C + chunks - 1) / chunks, 16);
  if (width <= 0) width = std::max<int64_t>(C, 1);
  chunks = std::max<int64_t>(1, (C + width - 1) / width);
  return {chunks, width};
}

// Runs body(b, c0, c1, first_block, scratch) for every (image, channel block) task in parallel;
// each task owns one Scratch. The blocks change no summation order, only who computes what.
template <typename Scratch, typename F>
void for_each_channel_block(int64_t B, int64_t C, const ChannelSplit& split, const F& body) {
  at::parallel_for(0, B * split.chunks, 1, [&](int64_t t0, int64_t t1) {
    Scratch sc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / split.chunks, c = t % split.chunks;
      body(b, split.begin(c), split.end(c, C), c == 0, sc);
    }
  });
}

// The outputs of a ToMe-matched merge (tome_merge, pyra_merge) of x [B, N, C] with r merges:
// merged tokens, float32 sizes, src/dst/unm indices and the token map (csrc/README.md).
struct TomeMergeOutputs {
  at::Tensor out, out_size, src, dst, unm, map;
  TomeMergeOutputs(const at::Tensor& x, int64_t r) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Na = (N + 1) / 2;
    const auto lopt = x.options().dtype(at::kLong);
    out = empty_output({B, N - r, C}, x.options());
    out_size = at::empty({B, N - r, 1}, x.options().dtype(at::kFloat));
    src = at::empty({B, r}, lopt);
    dst = at::empty({B, r}, lopt);
    unm = at::empty({B, Na - r}, lopt);
    map = at::empty({B, N}, lopt);
  }
};

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
  std::vector<float> an, bn, bnt, scores, best;
  std::vector<int64_t> dst, rank;
};

// NaN sorts first (as torch.sort(descending=True)): a strict weak order even with NaN.
inline bool score_greater(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

// Largest value of s[j0 .. n) and its lowest index (NaN counts as the largest, as torch.max);
// an empty or all -inf range gives (-inf, 0).
inline void row_argmax_scalar(const float* s, int64_t j0, int64_t n, float& best_out, int64_t& arg_out) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  for (int64_t j = j0; j < n; ++j) {
    if (score_greater(s[j], best)) {
      best = s[j];
      arg = j;
    }
  }
  best_out = best;
  arg_out = arg;
}

inline void row_argmax(const float* s, int64_t j0, int64_t n, float& best_out, int64_t& arg_out) {
#if defined(__SSE2__)
  // Eight lanes (two SSE vectors), each keeping its first maximum; then the lowest index among
  // the lanes that hold the overall maximum. A NaN anywhere takes the scalar path.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  __m128 m0 = _mm_set1_ps(kNegInf), m1 = m0, unordered = _mm_setzero_ps();
  __m128i i0 = _mm_setzero_si128(), i1 = i0;
  const __m128i lane0 = _mm_setr_epi32(0, 1, 2, 3), lane1 = _mm_setr_epi32(4, 5, 6, 7);
  int64_t j = j0;
  for (; j + 8 <= n; j += 8) {
    const __m128 v0 = _mm_loadu_ps(s + j), v1 = _mm_loadu_ps(s + j + 4);
    const __m128i g0 = _mm_castps_si128(_mm_cmpgt_ps(v0, m0)), g1 = _mm_castps_si128(_mm_cmpgt_ps(v1, m1));
    const __m128i jv = _mm_set1_epi32(static_cast<int32_t>(j));
    i0 = _mm_or_si128(_mm_and_si128(g0, _mm_add_epi32(jv, lane0)), _mm_andnot_si128(g0, i0));
    i1 = _mm_or_si128(_mm_and_si128(g1, _mm_add_epi32(jv, lane1)), _mm_andnot_si128(g1, i1));
    m0 = _mm_max_ps(v0, m0);  // v > m ? v : m
    m1 = _mm_max_ps(v1, m1);
    unordered = _mm_or_ps(unordered, _mm_or_ps(_mm_cmpunord_ps(v0, v0), _mm_cmpunord_ps(v1, v1)));
  }
  if (_mm_movemask_ps(unordered) != 0) return row_argmax_scalar(s, j0, n, best_out, arg_out);
  alignas(16) float mv[8];
  alignas(16) int32_t iv[8];
  _mm_store_ps(mv, m0);
  _mm_store_ps(mv + 4, m1);
  _mm_store_si128(reinterpret_cast<__m128i*>(iv), i0);
  _mm_store_si128(reinterpret_cast<__m128i*>(iv + 4), i1);
  float best = kNegInf;
  int64_t arg = 0;
  for (int l = 0; l < 8; ++l) {
    if (mv[l] > best || (mv[l] == best && mv[l] != kNegInf && iv[l] < arg)) {
      best = mv[l];
      arg = iv[l];
    }
  }
  for (; j < n; ++j) {  // tail: later indices than every lane
    if (std::isnan(s[j])) return row_argmax_scalar(s, j0, n, best_out, arg_out);
    if (s[j] > best) {
      best = s[j];
      arg = j;
    }
  }
  best_out = best;
  arg_out = arg;
#else
  row_argmax_scalar(s, j0, n, best_out, arg_out);
#endif
}

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
  ws.bn.resize(static_cast<size_t>(Nb * D));
  ws.best.resize(static_cast<size_t>(Na));
  ws.dst.resize(static_cast<size_t>(Na));
  ws.rank.resize(static_cast<size_t>(Na));

  // Normalised A rows (even positions), and B rows (odd positions) transposed to [D][Nbp].
  for (int64_t i = 0; i < Na; ++i) normalize_row(metric + (2 * i) * D, ws.an.data() + i * D, D);
  for (int64_t j = 0; j < Nb; ++j) normalize_row(metric + (2 * j + 1) * D, ws.bn.data() + j * D, D);
  transpose_pad(ws.bn.data(), Nb, D, D, ws.bnt.data(), Nbp);
  gemm_packed(Na, Nbp, D, ws.an.data(), D, 1, ws.bnt.data(), Nbp, ws.scores.data(), Nbp);

  // best / lowest argmax per A row; class token row and distill token column are -inf.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t j_begin = distill_token ? 1 : 0;
  for (int64_t i = 0; i < Na; ++i) {
    float best = kNegInf;
    int64_t arg = 0;
    if (!(class_token && i == 0)) row_argmax(ws.scores.data() + i * Nbp, j_begin, Nb, best, arg);
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

// r == 0 of a ToMe-matched merge (tome_merge, pyra_merge): x copied bit for bit, the sizes as given
// (s: float32 [B, N] or undefined), and the identity matching of the float32 metric m [B, N, D].
inline void tome_identity_merge(const at::Tensor& x, const at::Tensor& s, const at::Tensor& m,
                                const TomeMergeOutputs& outs, bool class_token, bool distill_token) {
  const int64_t B = x.size(0), N = x.size(1), D = m.size(2), Na = (N + 1) / 2;
  at::Tensor o = outs.out, os = outs.out_size;
  identity_merge(x, s, o, os);
  const float* mp = m.data_ptr<float>();
  int64_t *sp = outs.src.data_ptr<int64_t>(), *dp = outs.dst.data_ptr<int64_t>();
  int64_t *up = outs.unm.data_ptr<int64_t>(), *tp = outs.map.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    TomeWorkspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      tome_match_image(mp + b * N * D, N, D, 0, class_token, distill_token, ws, sp, dp, up + b * Na, tp + b * N);
    }
  });
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
  // Fill with head[j] as the cursor of row j (it ends at row j + 1's start), then shift back.
  for (int64_t k = 0; k < count; ++k) {
    if (dst[k] >= 0) list[head[dst[k]]++] = k;
  }
  for (int64_t j = n_rows; j > 0; --j) head[j] = head[j - 1];
  head[0] = 0;
}

}  // namespace fpet
