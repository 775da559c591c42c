// ToMe bipartite soft matching and the fused size-weighted merge, one thread block per image
// (and channel slice). Contracts: csrc/README.md (`tome_match`, `tome_merge`); execution model:
// simt.cuh. PYRA (pyra_merge.cuh) reuses this body with its modulation (PyraModulation) plugged in.
//
// Phases of one block (9 at ViT-B/16, N = 197, D = 64; PYRA adds 7: tests/test_simt_phases.py):
//   1. den[n] = max(||metric[n]||, eps), one thread per row
//   2. the normalised A (even positions) and B (odd) rows staged in shared memory (tiles.cuh,
//      staged_match: all at once where they fit the device's shared memory, else in panels)
//   3. all scores A x B in one phase, each thread 2 A rows x a chunk of columns: per A row and chunk
//      the best score and its lowest argmax (class-token row and distill-token column excluded)
//   4. the chunks merged in column order: per A row the best score and its lowest argmax
//   5. rank of every A row (best descending, ties by lower index): a counting sort, each thread
//      counting the rows ahead of its own, then order[rank] = row
//   6. unmerged rows in output order; per destination the first slot of its sources (the count of
//      sources with a lower destination: no scan) and each source's slot among them (rank order)
//   7. sources grouped by destination; index outputs (src_idx, dst_idx, unm_idx, token_map),
//      written by the block of slice 0
//   8. merged sizes (PYRA: then its weights, PyraModulation::weights in pyra_merge.cuh)
//   9. the output rows of this block's channel slice: unmerged rows are (x * s) / s; B row j's sum
//      starts with the row itself and adds its sources in rank order
// No atomics: every sum has one fixed order, so results are deterministic.
#pragma once

#include <torch/library.h>

#include "launch.h"
#include "tiles.cuh"

namespace fpet {
namespace kernels {

using simt::MatchPlan;

// Output rows of the ToMe merge (csrc/README.md, tome_match).
struct TomeRows {
  int Na, r;
  bool distill;
  FPET_HD int unm_row(int k) const { return distill ? (k == 0 ? 0 : k + 1) : k; }
  FPET_HD int b_row(int j) const { return distill && j == 0 ? 1 : Na - r + j; }
};

// Shared memory of the ToMe block; the launcher calls make() with base == nullptr for the size.
struct TomeSmem {
  float* den;    // [N]
  float* best;   // [Na]
  int* dst;      // [Na]
  int* rank;     // [Na]
  int* order;    // [Na] rows in rank order
  int* unm;      // [Na] unmerged A rows in output order
  int* head;     // [Nb + 1] first source of each destination
  int* slot;     // [Na] a source's place among its destination's sources (by rank)
  int* list;     // [Na] A rows of the sources, grouped by destination, rank order within
  float* bden;   // [Nb] merged size of each B row
  // the modulation's scratch (PYRA, pyra_merge.cuh; none without a modulation):
  float* wc;     // [slice] channel weights
  float* mu;     // [r] mean, then rstd, then token weight of each source
  float* rstd;
  float* wt;
  float* red;    // [kRedFloats] row_sums_wide scratch (one float per thread)
  simt::StagedMatch staged;  // the matching's staged rows (tiles.cuh)
  size_t bytes;
  static constexpr int kRedFloats = 1024;  // the most threads per block any executor runs
  FPET_HD static TomeSmem make(char* base, int N, int D, int r, int cw, bool modulated, MatchPlan plan) {
    const int Na = (N + 1) / 2, Nb = N / 2;
    simt::Arena ar{base};
    TomeSmem s;
    s.den = ar.take<float>(N);
    s.best = ar.take<float>(Na);
    s.dst = ar.take<int>(Na);
    s.rank = ar.take<int>(Na);
    s.order = ar.take<int>(Na);
    s.unm = ar.take<int>(Na);
    s.head = ar.take<int>(Nb + 1);
    s.slot = ar.take<int>(Na);
    s.list = ar.take<int>(Na);
    s.bden = ar.take<float>(Nb);
    s.wc = ar.take<float>(modulated ? cw : 0);
    s.mu = ar.take<float>(modulated ? r : 0);
    s.rstd = ar.take<float>(modulated ? r : 0);
    s.wt = ar.take<float>(modulated ? r : 0);
    s.red = ar.take<float>(modulated ? kRedFloats : 0);
    s.staged = simt::StagedMatch::take(ar, D, plan);
    s.bytes = ar.used;
    return s;
  }
  // The staging panels for `limit` bytes of shared memory: as large as the rest leaves room for.
  static MatchPlan plan(int N, int D, int r, int cw, bool modulated, size_t limit) {
    const size_t rest = make(nullptr, N, D, r, cw, modulated, MatchPlan{}).bytes;
    return simt::plan_match((N + 1) / 2, N / 2, D, limit > rest ? limit - rest : 0);
  }
};

// The modulation of the merged sources: ToMe's is none. A modulation (PYRA's: PyraModulation,
// pyra_merge.cuh) has the same three members: enabled() (its scratch in TomeSmem, its phase run),
// weights(), run by the block after the merged sizes (phase 8) to fill its scratch, and
// source(sm, v, cc, i), what A row i adds at channel c0 + cc to its destination's sum in place of
// v = x * s.
struct NoModulation {
  FPET_HD bool enabled() const { return false; }
  template <class Body, class Blk, typename scalar_t>
  FPET_HD void weights(const Body&, Blk&, const TomeSmem&, const scalar_t*, const AnyPtr&, int, int) const {}
  FPET_HD float source(const TomeSmem&, float v, int, int) const { return v; }
};

template <typename scalar_t, class Mod = NoModulation>
struct TomeBody {
  // inputs (x null: tome_match only)
  const scalar_t* x;
  AnyPtr metric, size;
  Mod mod;
  int N, C, D, r;
  bool class_token, distill_token;
  int slice;  // channels per block
  MatchPlan plan;  // rows staged per pass (TomeSmem::plan)
  // outputs (out, out_size null for tome_match)
  scalar_t* out;
  float* out_size;
  int64_t *src_idx, *dst_idx, *unm_idx, *token_map;

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem_base, int bx, int by) const {
    const int T = blk.size();
    const int Na = (N + 1) / 2, Nb = N / 2;
    const int64_t b = bx;
    const bool lead = by == 0;  // the block of slice 0 writes the per-token outputs
    const int c0 = by * slice;
    const int cw = x ? (C - c0 < slice ? C - c0 : slice) : 0;
    const AnyPtr m = metric + b * N * D;
    const AnyPtr s = size + b * N;
    const scalar_t* xb = x ? x + b * N * C : nullptr;
    scalar_t* ob = out ? out + b * (N - r) * C : nullptr;
    float* osb = out_size ? out_size + b * (N - r) : nullptr;
    int64_t* src_b = src_idx + b * r;
    int64_t* dst_b = dst_idx + b * r;
    int64_t* unm_b = unm_idx + b * (Na - r);
    int64_t* map_b = token_map + b * N;
    const TomeSmem sm = TomeSmem::make(smem_base, N, D, r, cw, mod.enabled(), plan);

    if (r == 0) {  // the identity: out = x (bit for bit), out_size = s
      blk.each([&](int t) {
        if (!lead) return;
        for (int n = t; n < N; n += T) {
          map_b[n] = n;
          if (osb) osb[n] = s[n];
        }
        for (int i = t; i < Na; i += T) unm_b[i] = i;
      });
      if (xb) copy_rows(blk, xb, s, ob, N, c0, cw, [](int n) { return n; }, [](int n) { return n; }, true);
      return;
    }

    // 1-4. norms, staged rows, scores, best and argmax per A row
    simt::row_norms_direct(blk, m, N, D, sm.den);
    simt::staged_match<simt::Top1Scan>(
        blk, sm.staged, m, sm.den, D, Na, Nb, [](int i) { return 2 * i; }, [](int j) { return 2 * j + 1; },
        [&](int i) { return class_token && i == 0; }, [&](int j) { return distill_token && j == 0; }, sm.best,
        nullptr, sm.dst, [](int) {});
    // 5. rank: rows ahead of row i are the greater ones and the equal ones of lower index
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) {
        const float bi = sm.best[i];
        int ahead = 0;
        for (int k = 0; k < Na; ++k) {
          const float bk = sm.best[k];
          ahead += simt::greater(bk, bi) || (k < i && !simt::greater(bi, bk));
        }
        sm.rank[i] = ahead;
        sm.order[ahead] = i;
      }
    });
    // 6. unmerged rows in output order (ascending index with a class token, else rank order), the
    //    first slot of each destination's sources (sources with a lower destination) and each
    //    source's slot among its destination's sources
    const TomeRows rows{Na, r, distill_token};
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) {
        if (sm.rank[i] < r) continue;
        int k = sm.rank[i] - r;
        if (class_token) {
          k = 0;
          for (int i2 = 0; i2 < i; ++i2) k += sm.rank[i2] >= r;
        }
        sm.unm[k] = i;
      }
      for (int k = t; k < r; k += T) {
        const int j = sm.dst[sm.order[k]];
        int before = 0;
        for (int k2 = 0; k2 < k; ++k2) before += sm.dst[sm.order[k2]] == j;
        sm.slot[k] = before;
      }
      for (int j = t; j <= Nb; j += T) {
        int before = 0;
        for (int k = 0; k < r; ++k) before += sm.dst[sm.order[k]] < j;
        sm.head[j] = before;
      }
    });
    // 7. sources grouped by destination, index outputs
    blk.each([&](int t) {
      for (int k = t; k < r; k += T) {
        const int i = sm.order[k];
        sm.list[sm.head[sm.dst[i]] + sm.slot[k]] = i;
      }
      if (!lead) return;
      for (int k = t; k < r; k += T) {
        const int i = sm.order[k];
        src_b[k] = i;
        dst_b[k] = sm.dst[i];
        map_b[2 * i] = rows.b_row(sm.dst[i]);
      }
      for (int k = t; k < Na - r; k += T) {
        unm_b[k] = sm.unm[k];
        map_b[2 * sm.unm[k]] = rows.unm_row(k);
      }
      for (int j = t; j < Nb; j += T) map_b[2 * j + 1] = rows.b_row(j);
    });
    if (!xb) return;

    // 8. merged sizes
    blk.each([&](int t) {
      for (int j = t; j < Nb; j += T) {
        float den = s[2 * j + 1];
        for (int h = sm.head[j]; h < sm.head[j + 1]; ++h) den += s[2 * sm.list[h]];
        sm.bden[j] = den;
        if (lead && osb) osb[rows.b_row(j)] = den;
      }
      if (!lead || !osb) return;
      for (int k = t; k < Na - r; k += T) osb[rows.unm_row(k)] = s[2 * sm.unm[k]];
    });
    if (mod.enabled()) mod.weights(*this, blk, sm, xb, s, c0, cw);

    // 9. the output rows of this slice: unmerged rows, then merged rows, in one phase
    blk.each([&](int t) {
      for (int e = t; e < (Na - r) * cw; e += T) {
        const int k = e / cw, c = c0 + e % cw;
        ob[int64_t(rows.unm_row(k)) * C + c] = scaled_copy(xb, s, 2 * sm.unm[k], c);
      }
      for (int e = t; e < Nb * cw; e += T) {
        const int j = e / cw, c = c0 + e % cw;
        const int64_t pj = 2 * j + 1;
        float acc = static_cast<float>(xb[pj * C + c]) * s[pj];
        for (int h = sm.head[j]; h < sm.head[j + 1]; ++h) {
          const int i = sm.list[h];
          const float v = static_cast<float>(xb[int64_t(2 * i) * C + c]) * s[2 * i];
          acc += mod.source(sm, v, c - c0, i);
        }
        // a merged row whose sizes sum to 0 is 0 (docs/semantics.md)
        ob[int64_t(rows.b_row(j)) * C + c] = static_cast<scalar_t>(sm.bden[j] == 0.f ? 0.f : acc / sm.bden[j]);
      }
    });
  }

  // (x[p][c] * s) / s with s = size[p]: x itself if s == 1, 0 if s == 0.
  FPET_HD scalar_t scaled_copy(const scalar_t* xb, const AnyPtr& s, int64_t p, int c) const {
    const float sv = static_cast<float>(s[p]);
    const scalar_t v = xb[p * C + c];
    return sv == 1.0f ? v : sv == 0.f ? static_cast<scalar_t>(0.f) : static_cast<scalar_t>((static_cast<float>(v) * sv) / sv);
  }

  // out[out_row(k)][c] = (x[pos(k)][c] * s) / s for k < rows, c in the slice (exact copy if s == 1 or
  // `exact`, 0 if s == 0).
  template <class Blk, class Pos, class Row>
  FPET_HD void copy_rows(Blk& blk, const scalar_t* xb, const AnyPtr& s, scalar_t* ob, int rows, int c0, int cw,
                         Pos pos, Row out_row, bool exact = false) const {
    const int T = blk.size();
    blk.each([&](int t) {
      for (int e = t; e < rows * cw; e += T) {
        const int k = e / cw, c = c0 + e % cw;
        const int64_t p = pos(k);
        const float sv = exact ? 1.0f : static_cast<float>(s[p]);
        const scalar_t v = xb[p * C + c];
        ob[int64_t(out_row(k)) * C + c] = sv == 1.0f ? v
                                          : sv == 0.f ? static_cast<scalar_t>(0.f)
                                                      : static_cast<scalar_t>((static_cast<float>(v) * sv) / sv);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
using TomeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// r in [0, cap]: cap = (N - protected) / 2, and 0 when no B token may be a destination (the
// distillation token is the only B token); docs/semantics.md.
inline int64_t checked_tome_r(int64_t r, int64_t N, bool class_token, bool distill_token, const char* op) {
  const int64_t cap = N / 2 - int64_t(distill_token) <= 0
                          ? 0
                          : std::max<int64_t>(0, (N - int64_t(class_token) - int64_t(distill_token)) / 2);
  TORCH_CHECK(r >= 0 && r <= cap, op, ": r must be in [0, ", cap, "] (the cap for N = ", N, " tokens), got ", r);
  return r;
}

// tome_merge (x defined) / tome_match (x undefined) / pyra_merge (Mod = PyraModulation, pyra_merge.cuh).
template <class Exec, class Mod = NoModulation>
TomeOutputs tome_launch(const char* op, const at::Tensor& x_in, const at::Tensor& metric_in, int64_t r,
                        const std::optional<at::Tensor>& size_in, bool class_token, bool distill_token,
                        const Mod& mod = Mod()) {
  const bool merge = x_in.defined();
  const typename Exec::Guard guard(metric_in.device());
  const at::Tensor metric = checked_bnd<Exec>(metric_in, op, "metric");
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  at::Tensor x;
  int64_t C = 0;
  if (merge) {
    x = checked_bnd<Exec>(x_in, op, "x");
    TORCH_CHECK(x.size(0) == B && x.size(1) == N, op, ": metric must be [B, N, D] with x's B, N = ", x.size(0), ", ",
                x.size(1), ", got ", metric.sizes());
    C = x.size(2);
  }
  checked_tome_r(r, N, class_token, distill_token, op);
  check_int32(N * std::max<int64_t>({C, D, 1}), op, "N * max(C, D)");
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  const int64_t Na = (N + 1) / 2;
  const auto lopt = metric.options().dtype(at::kLong);
  at::Tensor src = at::empty({B, r}, lopt), dst = at::empty({B, r}, lopt);
  at::Tensor unm = at::empty({B, Na - r}, lopt), map = at::empty({B, N}, lopt);
  at::Tensor out, out_size;
  if (merge) {
    out = at::empty({B, N - r, C}, x.options());
    out_size = at::empty({B, N - r, 1}, x.options().dtype(at::kFloat));
  }
  if (B == 0) return {out, out_size, src, dst, unm, map};
  const ChannelSlices slices = merge ? channel_slices(B, C, Exec::num_sms(metric)) : ChannelSlices{0, 1};
  auto run = [&](auto* xp) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    TomeBody<scalar_t, Mod> body{};
    body.x = xp;
    body.metric = any_ptr(metric, op, "metric");
    body.size = any_ptr(size, op, "size");
    body.mod = mod;
    body.N = static_cast<int>(N);
    body.C = static_cast<int>(C);
    body.D = static_cast<int>(D);
    body.r = static_cast<int>(r);
    body.class_token = class_token;
    body.distill_token = distill_token;
    body.slice = static_cast<int>(slices.width);
    body.plan = TomeSmem::plan(body.N, body.D, body.r, body.slice, mod.enabled(), Exec::smem_limit(metric));
    TORCH_CHECK(body.plan.pa > 0, op, ": N = ", N, " tokens with a metric of D = ", D, " channels need more shared "
                "memory than the device's ", Exec::smem_limit(metric), " bytes per block (a smaller N or D fits)");
    body.out = merge ? out.data_ptr<scalar_t>() : nullptr;
    body.out_size = merge ? out_size.data_ptr<float>() : nullptr;
    body.src_idx = src.data_ptr<int64_t>();
    body.dst_idx = dst.data_ptr<int64_t>();
    body.unm_idx = unm.data_ptr<int64_t>();
    body.token_map = map.data_ptr<int64_t>();
    const size_t smem =
        TomeSmem::make(nullptr, body.N, body.D, body.r, body.slice, mod.enabled(), body.plan).bytes;
    Exec::launch(body, static_cast<int>(B), slices.blocks, smem);
  };
  if (merge) {
    FPET_DISPATCH_KERNEL_TYPES(x.scalar_type(), op, "x", [&] { run(x.data_ptr<scalar_t>()); });
  } else {
    run(static_cast<const float*>(nullptr));
  }
  return {out, out_size, src, dst, unm, map};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match(const at::Tensor& metric, int64_t r,
                                                                       bool class_token, bool distill_token) {
  auto res = tome_launch<Exec>("tome_match", at::Tensor(), metric, r, std::nullopt, class_token, distill_token);
  return {std::get<2>(res), std::get<3>(res), std::get<4>(res), std::get<5>(res)};
}

template <class Exec>
TomeOutputs tome_merge(const at::Tensor& x, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
                       bool class_token, bool distill_token) {
  return tome_launch<Exec>("tome_merge", x, metric, r, size, class_token, distill_token);
}

template <class Exec>
void register_tome(torch::Library& m) {
  m.impl("tome_match", &tome_match<Exec>);
  m.impl("tome_merge", &tome_merge<Exec>);
}

}  // namespace kernels
}  // namespace fpet
