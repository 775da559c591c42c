// The merges driven by a token map: unmerge, merge_sum, merge_wavg and merge_wavg_backward.
// Contracts: csrc/README.md; execution model: simt.cuh.
//
// Gathers (unmerge, merge_wavg_backward): out[n] = y[map[n]] (times s[n] / out_size[map[n]] for
// the backward), an elementwise copy over the flattened [B * N, C] output in tiles of
// `rows` x `width` elements (x: row tiles, y: channel tiles, both grid-stride). Phases per tile:
//   1. per row: the source row (-1: none) and, for the backward, s[n] and out_size[map[n]]
//   2. the tile's elements, consecutive threads on consecutive channels (coalesced)
//
// Reductions (merge_sum, merge_wavg): one block per image and channel slice (channel_split).
//   1. keys[n] = (map[n] << 32) | n for valid entries, INT64_MAX for -1 and out-of-range ones
//   2. a bitonic sort of the keys (padded to a power of two P >= N): positions grouped by
//      destination, ascending position within each group (a stable grouping without atomics)
//   3. output rows in chunks of K: head[m] = the first key of destination m (binary search),
//      for merge_wavg the merged size (ascending position), then every output element sums its
//      group in ascending position in float32
// Shared memory 8 P + 8 K bytes: N = 4096 needs 40 KiB. Every sum has one fixed order, so results
// are deterministic and equal the CPU kernels' (same order of the same float32 operations).
#pragma once

#include <torch/library.h>

#include "launch.h"
#include "tiles.cuh"

namespace fpet {
namespace kernels {

// ---------------------------------------------------------------------------------------------
// Gathers
// ---------------------------------------------------------------------------------------------
struct GatherSmem {
  int64_t* src;  // [rows] source row in y (b * n_src + m), -1: zeros
  float* s;      // [rows] s[n] (backward)
  float* den;    // [rows] out_size[map[n]] (backward)
  size_t bytes;
  FPET_HD static GatherSmem make(char* base, int rows) {
    simt::Arena ar{base};
    GatherSmem g;
    g.src = ar.take<int64_t>(rows);
    g.s = ar.take<float>(rows);
    g.den = ar.take<float>(rows);
    g.bytes = ar.used;
    return g;
  }
};

template <typename scalar_t>
struct GatherBody {
  const scalar_t* y;      // [B, n_src, C]
  const int64_t* map;     // [B, N]
  AnyPtr size;            // [B, N] (backward; null = ones)
  AnyPtr out_size;        // [B, n_src] (backward)
  bool scaled;            // merge_wavg_backward: y[m] * s[n] / out_size[m]
  int64_t N, n_src, rows_total;  // rows_total = B * N
  int C;
  int rows, width;        // tile shape
  int64_t row_tiles;
  int col_tiles, grid_x, grid_y;
  scalar_t* out;          // [B, N, C]

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bx, int by) const {
    const int T = blk.size();
    const GatherSmem sm = GatherSmem::make(smem, rows);
    for (int ct = by; ct < col_tiles; ct += grid_y) {
      const int c0 = ct * width;
      const int cw = C - c0 < width ? C - c0 : width;
      for (int64_t rt = bx; rt < row_tiles; rt += grid_x) {
        const int64_t r0 = rt * rows;
        const int nr = static_cast<int>(rows_total - r0 < rows ? rows_total - r0 : rows);
        blk.each([&](int t) {
          for (int i = t; i < nr; i += T) {
            const int64_t row = r0 + i;
            const int64_t m = map[row];
            const bool ok = m >= 0 && m < n_src;
            const int64_t src = ok ? (row / N) * n_src + m : -1;
            sm.src[i] = src;
            if (scaled && ok) {
              sm.s[i] = size[row];
              sm.den[i] = out_size[src];
            }
          }
        });
        blk.each([&](int t) {
          for (int e = t; e < nr * cw; e += T) {
            const int i = e / cw, c = c0 + e % cw;
            const int64_t src = sm.src[i];
            scalar_t* dst = out + (r0 + i) * C + c;
            if (src < 0) {
              *dst = static_cast<scalar_t>(0.f);
            } else if (!scaled) {
              *dst = y[src * C + c];
            } else {  // an output row of merged size 0 is the constant 0: no gradient
              *dst = static_cast<scalar_t>(sm.den[i] == 0.f ? 0.f
                                                            : static_cast<float>(y[src * C + c]) * sm.s[i] / sm.den[i]);
            }
          }
        });
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();

struct ReduceSmem {
  int64_t* keys;  // [P] (destination << 32) | position, sorted
  int* head;      // [K + 1] first key of each destination of the chunk
  float* den;     // [K] merged sizes of the chunk (merge_wavg)
  size_t bytes;
  FPET_HD static ReduceSmem make(char* base, int64_t P, int K) {
    simt::Arena ar{base};
    ReduceSmem s;
    s.keys = ar.take<int64_t>(P);
    s.head = ar.take<int>(K + 1);
    s.den = ar.take<float>(K);
    s.bytes = ar.used;
    return s;
  }
};

// Ascending bitonic sort of v[0..P), P a power of two: log2(P) (log2(P) + 1) / 2 phases, each
// thread compare-exchanging pairs (i, i + j) that no other thread touches in that phase.
template <class Blk>
FPET_HD void bitonic_sort(Blk& blk, int64_t* v, int P) {
  const int T = blk.size();
  for (int k = 2; k <= P; k *= 2) {
    for (int j = k / 2; j >= 1; j /= 2) {
      blk.each([&](int t) {
        for (int p = t; p < P / 2; p += T) {
          const int i = 2 * j * (p / j) + p % j, l = i + j;
          const int64_t a = v[i], b = v[l];
          const bool up = (i & k) == 0;
          if (up ? a > b : a < b) {
            v[i] = b;
            v[l] = a;
          }
        }
      });
    }
  }
}

// The first index of v[0..P) (ascending) whose key is >= `key`.
FPET_HD int lower_bound(const int64_t* v, int P, int64_t key) {
  int lo = 0, hi = P;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (v[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename scalar_t>
struct ReduceBody {
  const scalar_t* x;   // [B, N, C]
  const int64_t* map;  // [B, N]
  AnyPtr size;         // [B, N] (merge_wavg; null = ones)
  bool wavg;           // merge_wavg (else merge_sum)
  int N, C, n_out, P, K, slice;
  scalar_t* out;       // [B, n_out, C]
  float* out_size;     // [B, n_out] (merge_wavg)

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bx, int by) const {
    const int T = blk.size();
    const int64_t b = bx;
    const int c0 = by * slice;
    const int cw = C - c0 < slice ? C - c0 : slice;
    const int64_t* map_b = map + b * N;
    const scalar_t* xb = x + b * N * C;
    scalar_t* ob = out + b * n_out * C;
    const AnyPtr s = size + b * N;
    const ReduceSmem sm = ReduceSmem::make(smem, P, K);

    // 1-2. keys, sorted
    blk.each([&](int t) {
      for (int i = t; i < P; i += T) {
        int64_t key = kNoKey;
        if (i < N) {
          const int64_t m = map_b[i];
          if (m >= 0 && m < n_out) key = (m << 32) | i;
        }
        sm.keys[i] = key;
      }
    });
    bitonic_sort(blk, sm.keys, P);

    // 3. output rows [m0, m0 + nk)
    for (int m0 = 0; m0 < n_out; m0 += K) {
      const int nk = n_out - m0 < K ? n_out - m0 : K;
      blk.each([&](int t) {
        for (int i = t; i <= nk; i += T) sm.head[i] = lower_bound(sm.keys, P, int64_t(m0 + i) << 32);
      });
      if (wavg) {
        blk.each([&](int t) {
          for (int i = t; i < nk; i += T) {
            float den = 0.f;
            for (int h = sm.head[i]; h < sm.head[i + 1]; ++h) den += s[sm.keys[h] & 0xFFFFFFFF];
            sm.den[i] = den;
            if (by == 0) out_size[b * n_out + m0 + i] = den;
          }
        });
      }
      blk.each([&](int t) {
        for (int e = t; e < nk * cw; e += T) {
          const int i = e / cw, c = c0 + e % cw;
          const int h0 = sm.head[i], h1 = sm.head[i + 1];
          float acc = 0.f;
          for (int h = h0; h < h1; ++h) {
            const int64_t n = sm.keys[h] & 0xFFFFFFFF;
            const float v = static_cast<float>(xb[n * C + c]);
            acc += wavg ? v * s[n] : v;
          }
          if (wavg) acc = sm.den[i] != 0.f ? acc / sm.den[i] : 0.f;  // sizes summing to 0: 0
          ob[int64_t(m0 + i) * C + c] = static_cast<scalar_t>(acc);
        }
      });
    }
  }

};

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// A token map [B, N] with any N (unmerge, merge_wavg_backward).
template <class Exec>
at::Tensor checked_map_rows(const at::Tensor& map, int64_t B, const char* op) {
  check_device<Exec>(map, op, "token_map");
  TORCH_CHECK(map.scalar_type() == at::kLong, op, ": token_map must be an int64 tensor, got ", map.scalar_type());
  TORCH_CHECK(map.dim() == 2 && map.size(0) == B, op, ": token_map must have shape [", B, ", N], got ", map.sizes());
  return map.contiguous();
}

// out[n] = y[map[n]] (scaled: * s[n] / out_size[map[n]]); `out` [B, N, C] in y's dtype.
template <class Exec>
at::Tensor gather_launch(const char* op, const char* yname, const at::Tensor& y, const at::Tensor& map,
                         const at::Tensor& size, const at::Tensor& out_size) {
  const int64_t B = y.size(0), n_src = y.size(1), C = y.size(2), N = map.size(1);
  check_int32(C, op, "C");
  at::Tensor out = at::empty({B, N, C}, y.options());
  const int64_t rows_total = B * N;
  if (rows_total == 0 || C == 0) return out;
  const int width = static_cast<int>(std::min<int64_t>((C + 31) / 32 * 32, 256));
  const int rows = std::max(1, 2048 / width);
  const int64_t row_tiles = (rows_total + rows - 1) / rows;
  const int col_tiles = static_cast<int>((C + width - 1) / width);
  const int grid_x = static_cast<int>(std::min<int64_t>(row_tiles, int64_t{1} << 30));
  const int grid_y = std::min(col_tiles, 65535);
  const bool scaled = out_size.defined();
  FPET_DISPATCH_KERNEL_TYPES(y.scalar_type(), op, yname, [&] {
    GatherBody<scalar_t> body{};
    body.y = y.data_ptr<scalar_t>();
    body.map = map.data_ptr<int64_t>();
    body.size = any_ptr(size, op, "size");
    body.out_size = any_ptr(out_size, op, "out_size");
    body.scaled = scaled;
    body.N = N;
    body.n_src = n_src;
    body.rows_total = rows_total;
    body.C = static_cast<int>(C);
    body.rows = rows;
    body.width = width;
    body.row_tiles = row_tiles;
    body.col_tiles = col_tiles;
    body.grid_x = grid_x;
    body.grid_y = grid_y;
    body.out = out.data_ptr<scalar_t>();
    Exec::launch(body, grid_x, grid_y, GatherSmem::make(nullptr, rows).bytes);
  });
  return out;
}

// merge_sum (size_in absent, wavg false) / merge_wavg: (out, out_size).
template <class Exec>
std::tuple<at::Tensor, at::Tensor> reduce_launch(const char* op, const at::Tensor& x_in,
                                                 const std::optional<at::Tensor>& size_in, const at::Tensor& map_in,
                                                 int64_t n_out, bool wavg) {
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const at::Tensor map = checked_map<Exec>(map_in, B, N, op);
  TORCH_CHECK(n_out >= 0, op, ": n_out must be >= 0, got ", n_out);
  check_map_range(map, n_out, op);
  check_int32(N, op, "N");
  check_int32(C, op, "C");
  check_int32(n_out, op, "n_out");
  const at::Tensor size = wavg ? checked_size<Exec>(size_in, B, N, op) : at::Tensor();
  at::Tensor out = at::empty({B, n_out, C}, x.options());
  at::Tensor out_size;
  if (wavg) out_size = at::empty({B, n_out, 1}, x.options().dtype(at::kFloat));
  if (B == 0 || n_out == 0) return {out, out_size};
  int64_t P = 1;
  while (P < N) P *= 2;
  check_int32(P, op, "the sort width (N rounded up to a power of two)");
  const int K = static_cast<int>(std::min<int64_t>(n_out, 1024));
  const ChannelSlices slices = channel_slices(B, C, Exec::num_sms(x));
  FPET_DISPATCH_KERNEL_TYPES(x.scalar_type(), op, "x", [&] {
    ReduceBody<scalar_t> body{};
    body.x = x.data_ptr<scalar_t>();
    body.map = map.data_ptr<int64_t>();
    body.size = any_ptr(size, op, "size");
    body.wavg = wavg;
    body.N = static_cast<int>(N);
    body.C = static_cast<int>(C);
    body.n_out = static_cast<int>(n_out);
    body.P = static_cast<int>(P);
    body.K = K;
    body.slice = static_cast<int>(slices.width);
    body.out = out.data_ptr<scalar_t>();
    body.out_size = wavg ? out_size.data_ptr<float>() : nullptr;
    Exec::launch(body, static_cast<int>(B), slices.blocks, ReduceSmem::make(nullptr, P, K).bytes);
  });
  return {out, out_size};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> merge_wavg(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                              const at::Tensor& token_map, int64_t n_out) {
  return reduce_launch<Exec>("merge_wavg", x, size, token_map, n_out, true);
}

template <class Exec>
at::Tensor merge_sum(const at::Tensor& x, const at::Tensor& token_map, int64_t n_out) {
  return std::get<0>(reduce_launch<Exec>("merge_sum", x, std::nullopt, token_map, n_out, false));
}

template <class Exec>
at::Tensor unmerge(const at::Tensor& y_in, const at::Tensor& token_map) {
  const char* op = "unmerge";
  const typename Exec::Guard guard(y_in.device());
  const at::Tensor y = checked_bnd<Exec>(y_in, op, "y");
  const at::Tensor map = checked_map_rows<Exec>(token_map, y.size(0), op);
  check_map_range(map, y.size(1), op);
  return gather_launch<Exec>(op, "y", y, map, at::Tensor(), at::Tensor());
}

template <class Exec>
at::Tensor merge_wavg_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& size_in,
                               const at::Tensor& out_size_in, const at::Tensor& token_map) {
  const char* op = "merge_wavg_backward";
  const typename Exec::Guard guard(grad_out_in.device());
  const at::Tensor g = checked_bnd<Exec>(grad_out_in, op, "grad_out");
  const int64_t B = g.size(0), n_out = g.size(1);
  const at::Tensor map = checked_map_rows<Exec>(token_map, B, op);
  check_map_range(map, n_out, op);
  const int64_t N = map.size(1);
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  check_device<Exec>(out_size_in, op, "out_size");
  TORCH_CHECK(out_size_in.dim() == 3 && out_size_in.size(0) == B && out_size_in.size(1) == n_out &&
                  out_size_in.size(2) == 1,
              op, ": out_size must have shape [", B, ", ", n_out, ", 1], got ", out_size_in.sizes());
  kernel_dtype(out_size_in.scalar_type(), op, "out_size");
  const at::Tensor out_size = out_size_in.contiguous();
  return gather_launch<Exec>(op, "grad_out", g, map, size, out_size);
}

template <class Exec>
void register_merges(torch::Library& m) {
  m.impl("merge_wavg", &merge_wavg<Exec>);
  m.impl("merge_wavg_backward", &merge_wavg_backward<Exec>);
  m.impl("unmerge", &unmerge<Exec>);
  m.impl("merge_sum", &merge_sum<Exec>);
}

}  // namespace kernels
}  // namespace fpet
