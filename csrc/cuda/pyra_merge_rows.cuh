// PYRA's modulated merge along a GIVEN per-row matching (padded batches, threshold merging; issue 21,
// docs/semantics.md "Padded batches and threshold merging"): the ops pyra_merge_rows and its
// closed-form backward pyra_merge_rows_backward, for CUDA (pyra_merge_rows.cu) and the host emulator
// (csrc/emu/). Reference and oracle: fpet_kernels/ops/pyra.py (pyra_merge_rows_op_reference,
// pyra_merge_rows_backward_reference); the CPU kernels: csrc/cpu/pyra_rows.cpp (same formulas).
//
// The matching comes in (tome_match_rows): src_idx / dst_idx [B, R] hold row b's r_b ranks, -1 after
// them (rank k is live when src_idx[k] >= 0); token_map [B, N] sends every token to its output row
// (-1: padding, dropped). Per image, with z = x * s: S = z_A[src_k], T = z_B[dst_k], y = S + T,
// yh = (y - mean) rstd, W = yh ln_w + ln_b, wt[k] = 2 sigmoid(<W[k], b>) - 1 and
// wc = 2 sigmoid(sum_k a[k] W[k]) over the live ranks only; a source's z is replaced by
// S' = S (1 + wc wt[k]); every output row m is sum z' / sum s over the tokens mapped to it (0 where the
// sizes sum to 0), in ascending token order.
//
// One block per image (grid (B, 1)), one launch per op; per-image state in two workspaces (the
// caching allocator's at::empty): floats [B, 6R + 2C + M] (per rank: mean, rstd, wt, g_v and the two
// means of the LayerNorm backward; per channel: wc, g_u; per output row: g_den) and ints
// [B, Na + (M + 1) + N + (Nb + 1) + R] (the live rank of each A token; the tokens of each output row and
// the live ranks of each destination, as ascending lists: group_by). The parameter gradients are
// per-image partials [B, R + 3C] summed over images by at::sum (a fixed-order reduction). No atomics:
// every sum has one fixed order, results are deterministic. Sums over channels are in the row_sums_wide
// order, so float32 agrees with the CPU kernel to a few ulps, not bitwise.
//
// Bad input: the launcher checks shapes, devices and dtypes, and the index ranges with one host sync
// (skipped inside a backward, csrc/trusted_maps.h, and under CUDA graph capture); the kernels treat an
// out-of-range entry as absent (a dead rank, a dropped token), so nothing is read or written out of
// bounds either way.
#pragma once

#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "pyra_merge_backward.cuh"

namespace fpet {
namespace kernels {

// Floats of row_sums scratch (shared memory): one per thread, for any block size the executors use.
constexpr int kPyraRowsScratch = 1024;

template <typename scalar_t>
struct PyraRowsArgs {
  const scalar_t* x = nullptr;
  AnyPtr size, a, b, ln_weight, ln_bias;
  const int64_t *src = nullptr, *dst = nullptr, *map = nullptr;
  float eps = 1e-5f;
  int N = 0, C = 0, R = 0, M = 0;
  float* ws = nullptr;  // [B, floats()]
  int* wsi = nullptr;   // [B, ints()]
  FPET_HD int Na() const { return (N + 1) / 2; }
  FPET_HD int Nb() const { return N / 2; }
  FPET_HD int64_t floats() const { return 6 * int64_t(R) + 2 * int64_t(C) + M; }
  FPET_HD int64_t ints() const { return int64_t(Na()) + (M + 1) + N + (Nb() + 1) + R; }
};

// One image's view of the arguments and of its workspace.
template <typename scalar_t>
struct PyraRowsImage {
  const scalar_t* x;
  AnyPtr s;
  const int64_t *src, *dst, *map;
  float *mean, *rstd, *wt, *gv, *m1, *m2, *wc, *gu, *gden;
  int *rank_of, *head, *list, *dhead, *dlist;
  int N, C, R, M, Na, Nb;
  AnyPtr a, b, lnw, lnb;
  float eps;

  FPET_HD static PyraRowsImage make(const PyraRowsArgs<scalar_t>& p, int bi) {
    PyraRowsImage v;
    v.N = p.N, v.C = p.C, v.R = p.R, v.M = p.M, v.Na = p.Na(), v.Nb = p.Nb();
    v.x = p.x + int64_t(bi) * p.N * p.C;
    v.s = p.size + int64_t(bi) * p.N;
    v.src = p.src + int64_t(bi) * p.R;
    v.dst = p.dst + int64_t(bi) * p.R;
    v.map = p.map + int64_t(bi) * p.N;
    float* f = p.ws + int64_t(bi) * p.floats();
    v.mean = f, v.rstd = f + p.R, v.wt = f + 2 * p.R, v.gv = f + 3 * p.R, v.m1 = f + 4 * p.R, v.m2 = f + 5 * p.R;
    v.wc = f + 6 * p.R, v.gu = v.wc + p.C, v.gden = v.gu + p.C;
    int* q = p.wsi + int64_t(bi) * p.ints();
    v.rank_of = q, v.head = q + v.Na, v.list = v.head + (p.M + 1), v.dhead = v.list + p.N;
    v.dlist = v.dhead + (v.Nb + 1);
    v.a = p.a, v.b = p.b, v.lnw = p.ln_weight, v.lnb = p.ln_bias, v.eps = p.eps;
    return v;
  }

  // Rank k is live: a source in [0, Na) and a destination in [0, Nb) (anything else: dead).
  FPET_HD bool live(int k) const { return src[k] >= 0 && src[k] < Na && dst[k] >= 0 && dst[k] < Nb; }
  // The output row of token n, -1 for padding (or an out-of-range entry).
  FPET_HD int row_of(int n) const { return map[n] >= 0 && map[n] < M ? static_cast<int>(map[n]) : -1; }
  FPET_HD float z(int n, int c) const { return static_cast<float>(x[int64_t(n) * C + c]) * s[n]; }
  FPET_HD float S(int k, int c) const { return z(2 * static_cast<int>(src[k]), c); }
  FPET_HD float y(int k, int c) const { return S(k, c) + z(2 * static_cast<int>(dst[k]) + 1, c); }
  FPET_HD float yh(int k, int c) const { return (y(k, c) - mean[k]) * rstd[k]; }
  FPET_HD float w(int k, int c) const { return yh(k, c) * lnw[c] + lnb[c]; }
};

// head[0..K] and list: the i in [0, L) with key(i) == g, ascending, at list[head[g] .. head[g + 1])
// (keys outside [0, K) are left out). Three phases; O(K L) work over the block's threads.
template <class Blk, class Key>
FPET_HD void group_by(Blk& blk, int L, int K, Key&& key, int* head, int* list) {
  const int T = blk.size();
  blk.each([&](int t) {
    for (int g = t; g < K; g += T) {
      int cnt = 0;
      for (int i = 0; i < L; ++i) cnt += key(i) == g ? 1 : 0;
      head[g + 1] = cnt;
    }
    if (t == 0) head[0] = 0;
  });
  blk.each([&](int t) {
    if (t == 0) {
      for (int g = 0; g < K; ++g) head[g + 1] += head[g];
    }
  });
  blk.each([&](int t) {
    for (int g = t; g < K; g += T) {
      int pos = head[g];
      for (int i = 0; i < L; ++i) {
        if (key(i) == g) list[pos++] = i;
      }
    }
  });
}

// The modulation of one image: rank_of, and per live rank mean, rstd, wt; wc per channel (dead ranks:
// wt = 0, no part in wc).
template <class Blk, typename scalar_t>
FPET_HD void rows_modulation(Blk& blk, const PyraRowsImage<scalar_t>& v, float* red) {
  const int T = blk.size();
  const int R = v.R, C = v.C;
  const float inv_c = 1.0f / static_cast<float>(C);
  blk.each([&](int t) {
    for (int i = t; i < v.Na; i += T) v.rank_of[i] = -1;
  });
  blk.each([&](int t) {  // a matching names each source once (a bad one: the last writer wins, in bounds)
    if (t == 0) {
      for (int k = 0; k < R; ++k) {
        if (v.live(k)) v.rank_of[v.src[k]] = k;
      }
    }
  });
  simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? v.y(k, c) : 0.f; },
                      [&](int k, float sum) { v.mean[k] = sum * inv_c; });
  simt::row_sums_wide(
      blk, R, C, red,
      [&](int k, int c) {
        if (!v.live(k)) return 0.f;
        const float d = v.y(k, c) - v.mean[k];
        return d * d;
      },
      [&](int k, float sum) { v.rstd[k] = 1.0f / sqrtf(sum * inv_c + v.eps); });
  simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? v.w(k, c) * v.b[c] : 0.f; },
                      [&](int k, float sum) { v.wt[k] = v.live(k) ? 2.0f * simt::sigmoid(sum) - 1.0f : 0.f; });
  blk.each([&](int t) {
    for (int c = t; c < C; c += T) {
      float acc = 0.f;
      for (int k = 0; k < R; ++k) {
        if (v.live(k)) acc += v.a[k] * v.w(k, c);
      }
      v.wc[c] = 2.0f * simt::sigmoid(acc);
    }
  });
}

// The forward: out [B, M, C] (x's dtype), out_size [B, M] float32.
template <typename scalar_t>
struct PyraRowsFwdBody {
  PyraRowsArgs<scalar_t> p;
  scalar_t* out;
  float* out_size;

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bi, int) const {
    float* red = reinterpret_cast<float*>(smem);
    const PyraRowsImage<scalar_t> v = PyraRowsImage<scalar_t>::make(p, bi);
    const int T = blk.size();
    const int C = v.C, M = v.M;
    rows_modulation(blk, v, red);
    group_by(blk, v.N, M, [&](int n) { return v.row_of(n); }, v.head, v.list);
    scalar_t* o = out + int64_t(bi) * M * C;
    float* os = out_size + int64_t(bi) * M;
    blk.each([&](int t) {
      for (int64_t q = t; q < int64_t(M) * C; q += T) {
        const int m = static_cast<int>(q / C), c = static_cast<int>(q % C);
        float num = 0.f, den = 0.f;
        for (int h = v.head[m]; h < v.head[m + 1]; ++h) {
          const int n = v.list[h];
          const float zn = v.z(n, c);
          const int k = n % 2 == 0 ? v.rank_of[n / 2] : -1;
          num += k >= 0 ? zn + zn * v.wc[c] * v.wt[k] : zn;
          den += v.s[n];
        }
        o[q] = static_cast<scalar_t>(den == 0.f ? 0.f : num / den);
      }
      for (int m = t; m < M; m += T) {
        float den = 0.f;
        for (int h = v.head[m]; h < v.head[m + 1]; ++h) den += v.s[v.list[h]];
        os[m] = den;
      }
    });
  }
};

// The backward's extra inputs and outputs.
template <typename scalar_t>
struct PyraRowsBwdBody {
  PyraRowsArgs<scalar_t> p;
  AnyPtr grad_out, grad_out_size, out, out_size;  // [B, M, C], [B, M], [B, M, C], [B, M]
  scalar_t* grad_x;                               // [B, N, C]
  float* grad_size;                               // [B, N]
  float* part;                                    // [B, R + 3C]

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bi, int) const {
    float* red = reinterpret_cast<float*>(smem);
    const PyraRowsImage<scalar_t> v = PyraRowsImage<scalar_t>::make(p, bi);
    const int T = blk.size();
    const int N = v.N, C = v.C, R = v.R, M = v.M;
    const float inv_c = 1.0f / static_cast<float>(C);
    const AnyPtr go = grad_out + int64_t(bi) * M * C, ob = out + int64_t(bi) * M * C;
    const AnyPtr gos = grad_out_size + int64_t(bi) * M, osz = out_size + int64_t(bi) * M;
    float* ga = part + int64_t(bi) * (R + 3 * int64_t(C));
    float *gb = ga + R, *glw = gb + C, *glb = glw + C;
    // g_num[m] = grad_out[m] / out_size[m], 0 where out_size[m] == 0 (the row is the constant 0) or m < 0
    auto gnum = [&](int m, int c) {
      if (m < 0) return 0.f;
      const float den = osz[m];
      return den == 0.f ? 0.f : go[int64_t(m) * C + c] / den;
    };
    // G[k] = g_num of rank k's source row (its destination's output row)
    auto G = [&](int k, int c) { return gnum(v.row_of(2 * static_cast<int>(v.src[k])), c); };
    auto gW = [&](int k, int c) { return v.a[k] * v.gu[c] + v.gv[k] * v.b[c]; };
    auto gyh = [&](int k, int c) { return gW(k, c) * v.lnw[c]; };
    auto gy = [&](int k, int c) { return v.rstd[k] * (gyh(k, c) - v.m1[k] - v.yh(k, c) * v.m2[k]); };

    rows_modulation(blk, v, red);
    group_by(blk, R, v.Nb, [&](int k) { return v.live(k) ? static_cast<int>(v.dst[k]) : -1; }, v.dhead, v.dlist);
    // 1. through the sigmoids: g_v[k] from g_wt[k] = <G S, wc>; g_u[c] from g_wc = sum_k G S wt[k]
    simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? G(k, c) * v.S(k, c) * v.wc[c] : 0.f; },
                        [&](int k, float sum) {
                          const float sv = (v.wt[k] + 1.0f) / 2.0f;
                          v.gv[k] = v.live(k) ? sum * 2.0f * sv * (1.0f - sv) : 0.f;
                        });
    blk.each([&](int t) {
      for (int c = t; c < C; c += T) {
        float acc = 0.f;
        for (int k = 0; k < R; ++k) {
          if (v.live(k)) acc += G(k, c) * v.S(k, c) * v.wt[k];
        }
        const float wc = v.wc[c];
        v.gu[c] = acc * wc * (1.0f - wc / 2.0f);
      }
    });
    // 2. the parameters' partials and the LayerNorm backward's two means per rank
    simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? v.gu[c] * v.w(k, c) : 0.f; },
                        [&](int k, float sum) { ga[k] = sum; });
    blk.each([&](int t) {
      for (int c = t; c < C; c += T) {
        float sb = 0.f, sw = 0.f, sbias = 0.f;
        for (int k = 0; k < R; ++k) {
          if (!v.live(k)) continue;
          const float g = gW(k, c);
          sb += v.gv[k] * v.w(k, c);
          sw += g * v.yh(k, c);
          sbias += g;
        }
        gb[c] = sb, glw[c] = sw, glb[c] = sbias;
      }
    });
    simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? gyh(k, c) : 0.f; },
                        [&](int k, float sum) { v.m1[k] = sum * inv_c; });
    simt::row_sums_wide(blk, R, C, red, [&](int k, int c) { return v.live(k) ? gyh(k, c) * v.yh(k, c) : 0.f; },
                        [&](int k, float sum) { v.m2[k] = sum * inv_c; });
    // 3. per output row: g_den[m] = -<g_num[m], out[m]> (+ grad_out_size[m])
    simt::row_sums_wide(blk, M, C, red, [&](int m, int c) { return -gnum(m, c) * ob[int64_t(m) * C + c]; },
                        [&](int m, float sum) { v.gden[m] = sum + (gos.defined() ? gos[m] : 0.f); });
    // 4. per token: g_z = G (a source: G (1 + wc wt) + g_y; a destination: + the g_y of its sources, rank order)
    auto gz = [&](int n, int c) {
      float g = gnum(v.row_of(n), c);
      if (n % 2 == 0) {
        const int k = v.rank_of[n / 2];
        if (k >= 0) g = g * (1.0f + v.wc[c] * v.wt[k]) + gy(k, c);
      } else {
        const int j = n / 2;
        for (int h = v.dhead[j]; h < v.dhead[j + 1]; ++h) g += gy(v.dlist[h], c);
      }
      return g;
    };
    scalar_t* gx = grad_x + int64_t(bi) * N * C;
    blk.each([&](int t) {
      for (int64_t q = t; q < int64_t(N) * C; q += T) {
        const int n = static_cast<int>(q / C), c = static_cast<int>(q % C);
        gx[q] = static_cast<scalar_t>(gz(n, c) * v.s[n]);
      }
    });
    float* gs = grad_size + int64_t(bi) * N;
    simt::row_sums_wide(blk, N, C, red,
                        [&](int n, int c) { return gz(n, c) * static_cast<float>(v.x[int64_t(n) * C + c]); },
                        [&](int n, float sum) {
                          const int m = v.row_of(n);
                          gs[n] = sum + (m >= 0 ? v.gden[m] : 0.f);
                        });
  }
};

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
// src_idx in [-1, Na), dst_idx in [0, Nb) where src_idx >= 0: one host sync; skipped inside a backward
// (trusted_maps.h) and while a CUDA graph is being captured.
inline void check_rows_matching(const at::Tensor& src, const at::Tensor& dst, int64_t Na, int64_t Nb, const char* op) {
  if (src.numel() == 0 || trusted_maps()) return;
#if defined(__CUDACC__)
  if (src.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
#endif
  const at::Tensor live = src.ge(0);
  const bool src_ok = src.ge(-1).logical_and(src.lt(Na)).all().item<bool>();
  TORCH_CHECK(src_ok, op, ": src_idx entries must be in [-1, ", Na, ")");
  const bool dst_ok = dst.ge(0).logical_and(dst.lt(Nb)).logical_or(live.logical_not()).all().item<bool>();
  TORCH_CHECK(dst_ok, op, ": dst_idx entries of live ranks (src_idx >= 0) must be in [0, ", Nb, ")");
}

// The arguments both ops share, checked; fills `p` but x and the workspaces.
struct PyraRowsChecked {
  at::Tensor x, size, src, dst, map, a, b, ln_weight, ln_bias;
  int64_t B, N, C, R;
};

template <class Exec>
PyraRowsChecked check_rows_args(const char* op, const at::Tensor& x_in, const std::optional<at::Tensor>& size_in,
                                const at::Tensor& src_in, const at::Tensor& dst_in, const at::Tensor& map_in,
                                const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& lnw_in,
                                const at::Tensor& lnb_in, double eps) {
  PyraRowsChecked k;
  k.x = checked_bnd<Exec>(x_in, op, "x");
  k.B = k.x.size(0), k.N = k.x.size(1), k.C = k.x.size(2);
  const int64_t Na = (k.N + 1) / 2;
  check_device<Exec>(src_in, op, "src_idx");
  TORCH_CHECK(src_in.dim() == 2, op, ": src_idx must have shape [B, R], got ", src_in.sizes());
  k.R = src_in.size(1);
  TORCH_CHECK(k.R <= Na, op, ": src_idx must have at most ceil(N/2) = ", Na, " columns, got ", src_in.sizes());
  k.src = checked_index<Exec>(src_in, k.B, k.R, op, "src_idx");
  k.dst = checked_index<Exec>(dst_in, k.B, k.R, op, "dst_idx");
  k.map = checked_map<Exec>(map_in, k.B, k.N, op);
  k.size = checked_size<Exec>(size_in, k.B, k.N, op);
  k.a = checked_param<Exec>(a_in, {k.R, 1}, op, "a");
  k.b = checked_param<Exec>(b_in, {1, k.C}, op, "b");
  k.ln_weight = checked_param<Exec>(lnw_in, {k.C}, op, "ln_weight");
  k.ln_bias = checked_param<Exec>(lnb_in, {k.C}, op, "ln_bias");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite float, got ", eps);
  check_int32(k.N * std::max<int64_t>(k.C, 1), op, "N * C");
  return k;
}

template <class Exec>
void check_same_device(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> all,
                       const char* op) {
  for (const auto& [t, name] : all) {
    TORCH_CHECK(!t->defined() || t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
                ", got ", t->device());
  }
}

template <typename scalar_t>
PyraRowsArgs<scalar_t> rows_args(const PyraRowsChecked& k, int64_t M, double eps, at::Tensor& ws, at::Tensor& wsi,
                                 const char* op) {
  PyraRowsArgs<scalar_t> p{};
  p.x = k.x.data_ptr<scalar_t>();
  p.size = any_ptr(k.size, op, "size");
  p.src = k.src.data_ptr<int64_t>();
  p.dst = k.dst.data_ptr<int64_t>();
  p.map = k.map.data_ptr<int64_t>();
  if (k.R > 0) {
    p.a = any_ptr(k.a, op, "a");
  }
  p.b = any_ptr(k.b, op, "b");
  p.ln_weight = any_ptr(k.ln_weight, op, "ln_weight");
  p.ln_bias = any_ptr(k.ln_bias, op, "ln_bias");
  p.eps = static_cast<float>(eps);
  p.N = static_cast<int>(k.N), p.C = static_cast<int>(k.C), p.R = static_cast<int>(k.R), p.M = static_cast<int>(M);
  ws = at::empty({k.B, p.floats()}, k.x.options().dtype(at::kFloat));
  wsi = at::empty({k.B, p.ints()}, k.x.options().dtype(at::kInt));
  p.ws = ws.data_ptr<float>();
  p.wsi = wsi.data_ptr<int>();
  return p;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> pyra_merge_rows_launch(const at::Tensor& x_in, const std::optional<at::Tensor>& size,
                                                          const at::Tensor& src_in, const at::Tensor& dst_in,
                                                          const at::Tensor& map_in, const at::Tensor& a_in,
                                                          const at::Tensor& b_in, const at::Tensor& lnw_in,
                                                          const at::Tensor& lnb_in, int64_t n_out, double eps) {
  const char* op = "pyra_merge_rows";
  const typename Exec::Guard guard(x_in.device());
  const PyraRowsChecked k = check_rows_args<Exec>(op, x_in, size, src_in, dst_in, map_in, a_in, b_in, lnw_in, lnb_in,
                                                  eps);
  TORCH_CHECK(n_out >= 0 && n_out <= k.N, op, ": n_out must be in [0, ", k.N, "] (x has N = ", k.N, " tokens), got ",
              n_out);
  check_same_device<Exec>(k.x, {{&k.size, "size"}, {&k.src, "src_idx"}, {&k.dst, "dst_idx"}, {&k.map, "token_map"},
                                {&k.a, "a"}, {&k.b, "b"}, {&k.ln_weight, "ln_weight"}, {&k.ln_bias, "ln_bias"}}, op);
  check_rows_matching(k.src, k.dst, (k.N + 1) / 2, k.N / 2, op);
  check_map_range(k.map, n_out, op);
  at::Tensor out = at::empty({k.B, n_out, k.C}, k.x.options());
  at::Tensor out_size = at::empty({k.B, n_out, 1}, k.x.options().dtype(at::kFloat));
  if (k.B > 0 && k.N > 0) {
    at::Tensor ws, wsi;
    FPET_DISPATCH_KERNEL_TYPES(k.x.scalar_type(), op, "x", [&] {
      PyraRowsFwdBody<scalar_t> body{rows_args<scalar_t>(k, n_out, eps, ws, wsi, op), out.data_ptr<scalar_t>(),
                                     out_size.data_ptr<float>()};
      Exec::launch(body, static_cast<int>(k.B), 1, kPyraRowsScratch * sizeof(float));
    });
  }
  return {out, out_size};
}

template <class Exec>
PyraBwdOutputs pyra_merge_rows_backward_launch(const at::Tensor& grad_out_in,
                                               const std::optional<at::Tensor>& grad_out_size_in,
                                               const at::Tensor& x_in, const std::optional<at::Tensor>& size,
                                               const at::Tensor& out_in, const at::Tensor& out_size_in,
                                               const at::Tensor& src_in, const at::Tensor& dst_in,
                                               const at::Tensor& map_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                               const at::Tensor& lnw_in, const at::Tensor& lnb_in, double eps) {
  const char* op = "pyra_merge_rows_backward";
  const typename Exec::Guard guard(x_in.device());
  const PyraRowsChecked k = check_rows_args<Exec>(op, x_in, size, src_in, dst_in, map_in, a_in, b_in, lnw_in, lnb_in,
                                                  eps);
  const at::Tensor grad_out = checked_bnd<Exec>(grad_out_in, op, "grad_out");
  const int64_t M = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == k.B && M <= k.N && grad_out.size(2) == k.C, op,
              ": grad_out must have shape [B, n_out, C] with n_out <= N = ", k.N, ", got ", grad_out.sizes());
  const at::Tensor out = checked_bnd<Exec>(out_in, op, "out");
  TORCH_CHECK(out.sizes() == grad_out.sizes(), op, ": out must have shape ", grad_out.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out_size_in.defined(), op, ": out_size must be a tensor");
  const at::Tensor out_size = checked_size<Exec>(out_size_in, k.B, M, op, "out_size");
  const at::Tensor grad_out_size = checked_size<Exec>(grad_out_size_in, k.B, M, op, "grad_out_size");
  check_same_device<Exec>(k.x, {{&k.size, "size"}, {&k.src, "src_idx"}, {&k.dst, "dst_idx"}, {&k.map, "token_map"},
                                {&k.a, "a"}, {&k.b, "b"}, {&k.ln_weight, "ln_weight"}, {&k.ln_bias, "ln_bias"},
                                {&grad_out, "grad_out"}, {&out, "out"}, {&out_size, "out_size"},
                                {&grad_out_size, "grad_out_size"}}, op);
  check_rows_matching(k.src, k.dst, (k.N + 1) / 2, k.N / 2, op);
  check_map_range(k.map, M, op);
  const auto fopt = k.x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty({k.B, k.N, k.C}, k.x.options());
  at::Tensor grad_size = at::empty({k.B, k.N, 1}, fopt);
  at::Tensor part = at::zeros({k.B, k.R + 3 * k.C}, fopt);
  if (k.B > 0 && k.N > 0) {
    at::Tensor ws, wsi;
    FPET_DISPATCH_KERNEL_TYPES(k.x.scalar_type(), op, "x", [&] {
      PyraRowsBwdBody<scalar_t> body{rows_args<scalar_t>(k, M, eps, ws, wsi, op),
                                     any_ptr(grad_out, op, "grad_out"),
                                     any_ptr(grad_out_size, op, "grad_out_size"),
                                     any_ptr(out, op, "out"),
                                     any_ptr(out_size, op, "out_size"),
                                     grad_x.data_ptr<scalar_t>(),
                                     grad_size.data_ptr<float>(),
                                     part.data_ptr<float>()};
      Exec::launch(body, static_cast<int>(k.B), 1, kPyraRowsScratch * sizeof(float));
    });
  }
  const at::Tensor total = part.sum(0);
  const int64_t R = k.R, C = k.C;
  // copy=true: every output gets its own storage, whatever the parameter dtypes
  return {grad_x,
          total.narrow(0, 0, R).view({R, 1}).to(a_in.scalar_type(), false, true),
          total.narrow(0, R, C).view({1, C}).to(b_in.scalar_type(), false, true),
          total.narrow(0, R + C, C).to(lnw_in.scalar_type(), false, true),
          total.narrow(0, R + 2 * C, C).to(lnb_in.scalar_type(), false, true),
          grad_size.to(out_size_in.scalar_type())};
}

template <class Exec>
void register_pyra_rows(torch::Library& m) {
  m.impl("pyra_merge_rows", &pyra_merge_rows_launch<Exec>);
  m.impl("pyra_merge_rows_backward", &pyra_merge_rows_backward_launch<Exec>);
}

}  // namespace kernels
}  // namespace fpet
