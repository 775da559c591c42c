// tome_match_rows: ToMe's bipartite matching with a token count and an r per row (padded batches:
// tokens of size 0 are padding; threshold merging: each row merges the A tokens whose best score
// reaches the threshold), one thread block per image. The oracle is `tome_match_rows_reference`
// (fpet_kernels/ops/tome.py); the semantics: docs/semantics.md "Padded batches and threshold merging";
// execution model: simt.cuh.
//
// Phases of one block:
//   1. valid[n] = size[n] != 0; best / dst initialised (-inf, 0)
//   2. one thread: the row's counts (valid tokens, valid and candidate A / B tokens, the protected
//      valid tokens), its cap on r, the rank of every valid token among the valid tokens (the map of a
//      row that merges nothing) and of every valid B token among the valid B tokens
//   3-5. (cap > 0 only) norms, staged rows and scores of the candidate sources (valid A tokens but the
//      class token) against the candidate destinations (valid B tokens but the distillation token):
//      best score and lowest argmax per A row (tiles.cuh, staged_match)
//   6. rank of every A row by the key (group: candidate 0, the class token 1, padding 2; best
//      descending, NaN first; index): a counting sort; one thread: the row's r (cap, or the count
//      of candidates reaching the threshold, NaN reaching it, capped)
//   7. the outputs: src / dst (-1 after the row's r), unm (rank order, ascending with a class token
//      or when the row merges nothing; -1 after), the token map (spec 1.7 order of the row alone,
//      padding -1; input order when the row merges nothing), kept
// No atomics; the index outputs equal the CPU kernel's (same float32 scores).
#pragma once

#include <torch/library.h>

#include "launch.h"
#include "tiles.cuh"

namespace fpet {
namespace kernels {

// Shared memory of the per-row matching block; make() with base == nullptr gives the size.
struct TomeRowsSmem {
  float* den;    // [N] metric norms
  float* best;   // [Na]
  int* dst;      // [Na]
  int* rank;     // [Na]
  int* order;    // [Na] A rows in rank order
  int* valid;    // [N] 1: not padding
  int* vrank;    // [N] rank of a valid token among the valid tokens
  int* brank;    // [Nb] rank of a valid B token among the valid B tokens
  int* cnt;      // [kCounts] the row's counts (below)
  simt::StagedMatch staged;
  size_t bytes;
  enum { kNValid, kNaValid, kCap, kRRow, kCounts };
  FPET_HD static TomeRowsSmem make(char* base, int N, int D, simt::MatchPlan plan) {
    const int Na = (N + 1) / 2, Nb = N / 2;
    simt::Arena ar{base};
    TomeRowsSmem s;
    s.den = ar.take<float>(N);
    s.best = ar.take<float>(Na);
    s.dst = ar.take<int>(Na);
    s.rank = ar.take<int>(Na);
    s.order = ar.take<int>(Na);
    s.valid = ar.take<int>(N);
    s.vrank = ar.take<int>(N);
    s.brank = ar.take<int>(Nb);
    s.cnt = ar.take<int>(kCounts);
    s.staged = simt::StagedMatch::take(ar, D, plan);
    s.bytes = ar.used;
    return s;
  }
  static simt::MatchPlan plan(int N, int D, size_t limit) {
    const size_t rest = make(nullptr, N, D, simt::MatchPlan{}).bytes;
    return simt::plan_match((N + 1) / 2, N / 2, D, limit > rest ? limit - rest : 0);
  }
};

struct TomeMatchRowsBody {
  AnyPtr metric, size;  // size null: no padding
  int N, D, R, r;       // R: the width of src / dst (static_r); r < 0: no cap from r
  bool has_thr;
  float thr;
  bool class_token, distill_token;
  simt::MatchPlan plan;
  int64_t *src_idx, *dst_idx, *unm_idx, *token_map, *kept;

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem_base, int bx, int) const {
    const int T = blk.size();
    const int Na = (N + 1) / 2, Nb = N / 2;
    const int64_t b = bx;
    const AnyPtr m = metric + b * N * D;
    const AnyPtr s = size + b * N;
    const bool padded = size.defined();
    int64_t* src_b = src_idx + b * R;
    int64_t* dst_b = dst_idx + b * R;
    int64_t* unm_b = unm_idx + b * Na;
    int64_t* map_b = token_map + b * N;
    const TomeRowsSmem sm = TomeRowsSmem::make(smem_base, N, D, plan);
    const bool cls = class_token, dist = distill_token;
    // candidate sources / destinations (read after phase 1)
    auto cand_a = [&](int i) { return sm.valid[2 * i] != 0 && !(cls && i == 0); };
    auto cand_b = [&](int j) { return sm.valid[2 * j + 1] != 0 && !(dist && j == 0); };

    // 1. validity
    blk.each([&](int t) {
      for (int n = t; n < N; n += T) sm.valid[n] = padded ? int(s[n] != 0.f) : 1;
      for (int i = t; i < Na; i += T) {
        sm.best[i] = simt::neg_inf();
        sm.dst[i] = 0;
      }
    });
    // 2. counts, cap and ranks among the valid tokens (one thread: O(N))
    blk.each([&](int t) {
      if (t != 0) return;
      int n_valid = 0, na_valid = 0, n_cand_a = 0, n_cand_b = 0;
      for (int n = 0; n < N; ++n) {
        sm.vrank[n] = n_valid;
        n_valid += sm.valid[n];
      }
      for (int i = 0; i < Na; ++i) {
        na_valid += sm.valid[2 * i];
        n_cand_a += cand_a(i);
      }
      int nb_valid = 0;
      for (int j = 0; j < Nb; ++j) {
        sm.brank[j] = nb_valid;  // valid B tokens before j
        nb_valid += sm.valid[2 * j + 1];
        n_cand_b += cand_b(j);
      }
      const int prot = (cls && N > 0 ? sm.valid[0] : 0) + (dist && N > 1 ? sm.valid[1] : 0);
      int cap = (n_valid - prot) / 2 < n_cand_a ? (n_valid - prot) / 2 : n_cand_a;
      if (n_cand_b == 0) cap = 0;
      if (r >= 0 && r < cap) cap = r;
      sm.cnt[TomeRowsSmem::kNValid] = n_valid;
      sm.cnt[TomeRowsSmem::kNaValid] = na_valid;
      sm.cnt[TomeRowsSmem::kCap] = cap;
    });
    const int cap = sm.cnt[TomeRowsSmem::kCap];  // uniform across the block
    // 3-5. best score and lowest argmax of every candidate source over the candidate destinations
    if (cap > 0) {
      simt::row_norms_direct(blk, m, N, D, sm.den);
      simt::staged_match<simt::Top1Scan>(
          blk, sm.staged, m, sm.den, D, Na, Nb, [](int i) { return 2 * i; }, [](int j) { return 2 * j + 1; },
          [&](int i) { return !cand_a(i); }, [&](int j) { return !cand_b(j); }, sm.best, nullptr, sm.dst,
          [](int) {});
    }
    // 6. rank: rows ahead of row i have a lower group, or the same group and a greater best score, or
    //    an equal one and a lower index; the row's r
    auto group = [&](int i) { return (sm.valid[2 * i] ? 0 : 2) + (cls && i == 0 && sm.valid[0] ? 1 : 0); };
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) {
        const float bi = sm.best[i];
        const int gi = group(i);
        int ahead = 0;
        for (int k = 0; k < Na; ++k) {
          const int gk = group(k);
          const float bk = sm.best[k];
          ahead += gk < gi || (gk == gi && (simt::greater(bk, bi) || (k < i && !simt::greater(bi, bk))));
        }
        sm.rank[i] = ahead;
        sm.order[ahead] = i;
      }
      if (t == 0) {
        int r_row = cap;
        if (has_thr && cap > 0) {  // the reaching candidates are a prefix of the ranking
          int reach = 0;
          for (int i = 0; i < Na; ++i) reach += cand_a(i) && !(sm.best[i] < thr);
          r_row = reach < cap ? reach : cap;
        }
        sm.cnt[TomeRowsSmem::kRRow] = r_row;
      }
    });
    // 7. outputs
    const int r_row = sm.cnt[TomeRowsSmem::kRRow];
    const int n_valid = sm.cnt[TomeRowsSmem::kNValid];
    const int n_unm = sm.cnt[TomeRowsSmem::kNaValid] - r_row;
    const bool ascending = cls || r_row == 0;
    auto b_row = [&](int j) { return dist && sm.brank[j] == 0 ? 1 : n_unm + sm.brank[j]; };
    blk.each([&](int t) {
      for (int k = t; k < R; k += T) {
        src_b[k] = k < r_row ? sm.order[k] : -1;
        dst_b[k] = k < r_row ? sm.dst[sm.order[k]] : -1;
      }
      for (int i = t; i < Na; i += T) {  // slot n_unm + ... of unm_idx: -1
        if (i >= n_unm) unm_b[i] = -1;
      }
      if (t == 0) kept[b] = n_valid - r_row;
      if (r_row == 0) {  // every valid token in input order
        for (int n = t; n < N; n += T) map_b[n] = sm.valid[n] ? sm.vrank[n] : -1;
        for (int i = t; i < Na; i += T) {
          if (sm.valid[2 * i]) unm_b[ascending_slot(sm, i)] = i;
        }
        return;
      }
      for (int j = t; j < Nb; j += T) map_b[2 * j + 1] = sm.valid[2 * j + 1] ? b_row(j) : -1;
      for (int i = t; i < Na; i += T) {
        const int rk = sm.rank[i];
        if (!sm.valid[2 * i]) {
          map_b[2 * i] = -1;
        } else if (rk < r_row) {
          map_b[2 * i] = b_row(sm.dst[i]);
        } else {
          const int k = ascending ? ascending_slot(sm, i) : rk - r_row;
          unm_b[k] = i;
          map_b[2 * i] = dist && k > 0 ? k + 1 : k;
        }
      }
    });
  }

  // The place of unmerged valid A row i among the unmerged valid A rows in index order.
  FPET_HD int ascending_slot(const TomeRowsSmem& sm, int i) const {
    const int r_row = sm.cnt[TomeRowsSmem::kRRow];
    int k = 0;
    for (int i2 = 0; i2 < i; ++i2) k += sm.valid[2 * i2] && sm.rank[i2] >= r_row;
    return k;
  }
};

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------
using TomeRowsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <class Exec>
TomeRowsOutputs tome_match_rows(const at::Tensor& metric_in, std::optional<int64_t> r, bool class_token,
                                bool distill_token, const std::optional<at::Tensor>& size_in,
                                std::optional<double> threshold) {
  const char* op = "tome_match_rows";
  const typename Exec::Guard guard(metric_in.device());
  const at::Tensor metric = checked_bnd<Exec>(metric_in, op, "metric");
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  TORCH_CHECK(!r.has_value() || *r >= 0, op, ": r must be >= 0, got ", r.value_or(0));
  TORCH_CHECK(!threshold.has_value() || (*threshold >= -1.0 && *threshold <= 1.0), op,
              ": threshold must be a number in [-1, 1], got ", threshold.value_or(0.0));
  check_int32(N * std::max<int64_t>(D, 1), op, "N * D");
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  const int64_t cap = N / 2 - int64_t(distill_token) <= 0
                          ? 0
                          : std::max<int64_t>(0, (N - int64_t(class_token) - int64_t(distill_token)) / 2);
  const int64_t R = r.has_value() ? std::min(*r, cap) : cap;  // static_r
  const int64_t Na = (N + 1) / 2;
  const auto lopt = metric.options().dtype(at::kLong);
  at::Tensor src = at::empty({B, R}, lopt), dst = at::empty({B, R}, lopt);
  at::Tensor unm = at::empty({B, Na}, lopt), map = at::empty({B, N}, lopt), kept = at::empty({B}, lopt);
  if (B == 0) return {src, dst, unm, map, kept};
  if (N == 0) {
    kept.zero_();
    return {src, dst, unm, map, kept};
  }
  TomeMatchRowsBody body{};
  body.metric = any_ptr(metric, op, "metric");
  body.size = any_ptr(size, op, "size");
  body.N = static_cast<int>(N);
  body.D = static_cast<int>(D);
  body.R = static_cast<int>(R);
  body.r = r.has_value() ? static_cast<int>(std::min<int64_t>(*r, N)) : -1;
  body.has_thr = threshold.has_value();
  // compared in float32, as the float32 reference compares its scores with a Python float
  body.thr = threshold.has_value() ? static_cast<float>(*threshold) : 0.f;
  body.class_token = class_token;
  body.distill_token = distill_token;
  body.plan = TomeRowsSmem::plan(body.N, body.D, Exec::smem_limit(metric));
  TORCH_CHECK(body.plan.pa > 0, op, ": N = ", N, " tokens with a metric of D = ", D, " channels need more shared "
              "memory than the device's ", Exec::smem_limit(metric), " bytes per block (a smaller N or D fits)");
  body.src_idx = src.data_ptr<int64_t>();
  body.dst_idx = dst.data_ptr<int64_t>();
  body.unm_idx = unm.data_ptr<int64_t>();
  body.token_map = map.data_ptr<int64_t>();
  body.kept = kept.data_ptr<int64_t>();
  Exec::launch(body, static_cast<int>(B), 1, TomeRowsSmem::make(nullptr, body.N, body.D, body.plan).bytes);
  return {src, dst, unm, map, kept};
}

template <class Exec>
void register_tome_match_rows(torch::Library& m) {
  m.impl("tome_match_rows", &tome_match_rows<Exec>);
}

}  // namespace kernels
}  // namespace fpet
