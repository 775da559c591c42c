// Shared-memory layout and the similarity scores of the matching kernels (ToMe, PYRA, FPET).
//
// The forward merges (ToMe, PYRA, FPET) match in a handful of phases (StagedMatch below): norms
// one thread per row; the normalised A and B rows staged once in shared memory (whole sets when
// they fit the device's shared memory, else panels of rows); then ONE phase scores every A row
// against every staged B row (a thread owns 2 A rows and a chunk of columns, 2 x 4 scores per
// pass, and keeps the running best of its rows over its chunk in ascending column order), and one
// phase merges the chunks' results per A row in chunk order (the same result as one scan over all
// columns: ties keep the lowest column). At ViT-B/16 (N = 197, D = 64) that is 4 phases for the
// whole matching instead of ~100.
//
// The FPET backward still computes scores tile by tile (score_tile): TILE rows of A against TILE
// rows of B, each thread accumulating a 2 x 2 block of scores over D.
//
// Every score is one sequential float32 sum over k of the normalised products: deterministic and
// independent of the tiling, the panels and the thread count.
#pragma once

#include <algorithm>

#include "simt.cuh"

namespace fpet {
namespace simt {

constexpr int kTile = 32;               // rows of A and of B per score tile
constexpr float kNormEps = 1e-12f;      // F.normalize: m / max(||m||, eps)

// A bump allocator over the block's dynamic shared memory. The launcher runs the same sequence of
// take() calls with base == nullptr to learn the byte count.
struct Arena {
  char* base;
  size_t used = 0;
  template <typename V>
  FPET_HD V* take(int64_t count) {
    used = (used + 15) / 16 * 16;
    V* p = reinterpret_cast<V*>(base + used);
    used += static_cast<size_t>(count > 0 ? count : 0) * sizeof(V);
    return p;
  }
};

// Shared memory of one score tile pass: A and B rows [kTile][D + 1] (the +1 avoids bank
// conflicts when threads read different rows at the same k), scores [kTile][kTile + 1].
struct ScoreTiles {
  float* a;
  float* b;
  float* s;
  int ld;  // D + 1
  FPET_HD static ScoreTiles take(Arena& ar, int D) {
    ScoreTiles t;
    t.ld = D + 1;
    t.a = ar.take<float>(int64_t{kTile} * t.ld);
    t.b = ar.take<float>(int64_t{kTile} * t.ld);
    t.s = ar.take<float>(int64_t{kTile} * (kTile + 1));
    return t;
  }
  FPET_HD float score(int ii, int jj) const { return s[ii * (kTile + 1) + jj]; }
};

// den[n] = max(||metric[n]||, eps) for the N rows of one image (`scratch`: blk.size() floats).
template <class Blk>
FPET_HD void row_norms(Blk& blk, const AnyPtr& m, int N, int D, float* scratch, float* den) {
  row_sums(
      blk, N, D, scratch,
      [&](int n, int k) {
        const float v = m[int64_t(n) * D + k];
        return v * v;
      },
      [&](int n, float ss) { den[n] = fmaxf(sqrtf(ss), kNormEps); });
}

// acc[2 * u + v] += <a0 + u * ld, b0 + v * ld> over k < n for u, v in {0, 1}: a thread's 2 x 2 block
// of a tile product, each entry one sequential float32 sum over k (4 FMAs per 4 loads).
FPET_HD void dot_2x2(const float* a0, const float* b0, int ld, int n, float* acc) {
  const float* a1 = a0 + ld;
  const float* b1 = b0 + ld;
  float s00 = acc[0], s01 = acc[1], s10 = acc[2], s11 = acc[3];
  for (int k = 0; k < n; ++k) {
    const float x0 = a0[k], x1 = a1[k], y0 = b0[k], y1 = b1[k];
    s00 += x0 * y0;
    s01 += x0 * y1;
    s10 += x1 * y0;
    s11 += x1 * y1;
  }
  acc[0] = s00;
  acc[1] = s01;
  acc[2] = s10;
  acc[3] = s11;
}

// The 2 x 2 block acc to rows out, out + ld.
FPET_HD void store_2x2(const float* acc, float* out, int ld) {
  out[0] = acc[0];
  out[1] = acc[1];
  out[ld] = acc[2];
  out[ld + 1] = acc[3];
}

// Two phases: stage normalised rows pa(i0 ..), pb(j0 ..) (zeros past na / nb), then
// s[ii][jj] = <a_{i0+ii}, b_{j0+jj}>. `pa`, `pb` map a set index to a token position.
template <class Blk, class PosA, class PosB>
FPET_HD void score_tile(Blk& blk, const ScoreTiles& tl, const AnyPtr& m, const float* den, int D, int i0, int na,
                        int j0, int nb, PosA pa, PosB pb) {
  const int T = blk.size();
  blk.each([&](int t) {
    for (int e = t; e < kTile * D; e += T) {
      const int ii = e / D, k = e % D;
      const int i = i0 + ii, j = j0 + ii;
      if (i < na) {
        const int64_t p = pa(i);
        tl.a[ii * tl.ld + k] = m[p * D + k] / den[p];
      } else {
        tl.a[ii * tl.ld + k] = 0.f;
      }
      if (j < nb) {
        const int64_t p = pb(j);
        tl.b[ii * tl.ld + k] = m[p * D + k] / den[p];
      } else {
        tl.b[ii * tl.ld + k] = 0.f;
      }
    }
  });
  constexpr int H = kTile / 2;
  blk.each([&](int t) {
    for (int e = t; e < H * H; e += T) {
      const int ii = 2 * (e / H), jj = 2 * (e % H);
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      dot_2x2(tl.a + ii * tl.ld, tl.b + jj * tl.ld, tl.ld, D, acc);
      store_2x2(acc, tl.s + ii * (kTile + 1) + jj, kTile + 1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// StagedMatch: the forward merges' matching over staged rows
// ---------------------------------------------------------------------------------------------
constexpr int kMaxChunks = 8;  // column chunks per A row pair (bounds the partial results)

// The running best of one A row over the columns scanned so far.
struct TopState {
  float v1, v2;  // largest and second largest score (FPET); v1 only (ToMe)
  int i1;        // column of v1
};

// ToMe / PYRA: the greatest score with NaN first (torch.max) and its lowest column; column 0 and
// -inf when no column is scanned (the class-token row, no eligible column).
struct Top1Scan {
  FPET_HD static TopState init() { return TopState{neg_inf(), neg_inf(), 0}; }
  FPET_HD static void push(TopState& s, float v, int j) {
    if (greater(v, s.v1)) {
      s.v1 = v;
      s.i1 = j;
    }
  }
  // `hi` scanned columns after those of `s`: the result of one scan over both.
  FPET_HD static void merge(TopState& s, const TopState& hi) {
    if (greater(hi.v1, s.v1)) s = hi;
  }
};

// FPET: the two largest values (a multiset: a repeated maximum is also the second) and the lowest
// column of the largest, by strict > (NaN never enters); column -1 when nothing entered.
struct Top2Scan {
  FPET_HD static TopState init() { return TopState{neg_inf(), neg_inf(), -1}; }
  FPET_HD static void push(TopState& s, float v, int j) {
    if (v > s.v1) {
      s.v2 = s.v1;
      s.v1 = v;
      s.i1 = j;
    } else if (v > s.v2) {
      s.v2 = v;
    }
  }
  FPET_HD static void merge(TopState& s, const TopState& hi) {
    if (hi.v1 > s.v1) {
      s.v2 = s.v1 > hi.v2 ? s.v1 : hi.v2;
      s.v1 = hi.v1;
      s.i1 = hi.i1;
    } else if (hi.v1 > s.v2) {
      s.v2 = hi.v1;
    }
  }
};

// Rows of A and B staged per pass (all of them when they fit).
struct MatchPlan {
  int pa = 0, pb = 0;
};

// Shared memory of StagedMatch: the staged panels [pa][D + 1] and [pb][D + 1] (the +1 keeps threads
// reading different rows at one k in different banks) and the chunks' partial results
// [kMaxChunks][pa].
struct StagedMatch {
  float* a;
  float* b;
  float* pv1;
  float* pv2;
  int* pi1;
  int ld;
  MatchPlan plan;
  FPET_HD static StagedMatch take(Arena& ar, int D, MatchPlan plan) {
    StagedMatch m;
    m.ld = D + 1;
    m.plan = plan;
    m.a = ar.take<float>(int64_t{plan.pa} * m.ld);
    m.b = ar.take<float>(int64_t{plan.pb} * m.ld);
    m.pv1 = ar.take<float>(int64_t{kMaxChunks} * plan.pa);
    m.pv2 = ar.take<float>(int64_t{kMaxChunks} * plan.pa);
    m.pi1 = ar.take<int>(int64_t{kMaxChunks} * plan.pa);
    return m;
  }
  // Bytes of `pa` A rows and `pb` B rows (with the arena's alignment slack).
  FPET_HD static size_t bytes(int D, MatchPlan plan) {
    Arena ar{nullptr};
    take(ar, D, plan);
    return ar.used + 16;
  }
};

// The largest panels whose StagedMatch fits in `budget` bytes: every row of A and B when they fit,
// else an A panel of about half the budget and a B panel of the rest. {0, 0} when not even one row
// of each fits (the launcher reports the shape as too large).
inline MatchPlan plan_match(int Na, int Nb, int D, size_t budget) {
  const MatchPlan all{Na > 0 ? Na : 1, Nb > 0 ? Nb : 1};
  if (StagedMatch::bytes(D, all) <= budget) return all;
  const size_t row_a = size_t(4) * (D + 1) + size_t(12) * kMaxChunks, row_b = size_t(4) * (D + 1);
  const size_t usable = budget > 6 * 16 ? budget - 6 * 16 : 0;
  MatchPlan p;
  p.pa = static_cast<int>(std::min<size_t>(all.pa, usable / 2 / row_a));
  p.pb = static_cast<int>(std::min<size_t>(all.pb, p.pa > 0 ? (usable - p.pa * row_a) / row_b : 0));
  while (p.pa > 0 && p.pb > 0 && StagedMatch::bytes(D, p) > budget) --p.pa;
  if (p.pa < 1 || p.pb < 1) return MatchPlan{};
  return p;
}

// One phase: den[n] = max(||metric[n]||, eps) for n < N, one thread per row (a sequential sum).
template <class Blk>
FPET_HD void row_norms_direct(Blk& blk, const AnyPtr& m, int N, int D, float* den) {
  const int T = blk.size();
  blk.each([&](int t) {
    for (int n = t; n < N; n += T) {
      float ss = 0.f;
      for (int k = 0; k < D; ++k) {
        const float v = m[int64_t(n) * D + k];
        ss += v * v;
      }
      den[n] = fmaxf(sqrtf(ss), kNormEps);
    }
  });
}

// The matching of every A row i < Na against the B columns j < Nb, in phases over the panels of
// `sm.plan` (one panel each at ViT shapes: 3 phases): state(i) ends as the scan of row i's scores
// over the columns in ascending order (Scan: Top1Scan or Top2Scan), skipping rows skip_row(i) and
// columns skip_col(j) entirely. `pa`, `pb` map a set index to a token position; `den` holds the
// norms (row_norms_direct). State lives in v1[i], v2[i] (may be null for Top1Scan), i1[i];
// `done(i)` is called once per row after its last panel, in the last phase (may write per-row
// results that depend only on row i's state).
template <class Scan, class Blk, class PosA, class PosB, class SkipRow, class SkipCol, class Done>
FPET_HD void staged_match(Blk& blk, const StagedMatch& sm, const AnyPtr& m, const float* den, int D, int Na, int Nb,
                          PosA pa, PosB pb, SkipRow skip_row, SkipCol skip_col, float* v1, float* v2, int* i1,
                          Done done) {
  const int T = blk.size();
  const int ld = sm.ld;
  const int PA = sm.plan.pa, PB = sm.plan.pb;
  for (int ia0 = 0; ia0 < Na; ia0 += PA) {
    const int na = Na - ia0 < PA ? Na - ia0 : PA;
    const int G = (na + 1) / 2;  // A row pairs
    int Q = T / G;               // column chunks per pair
    Q = Q < 1 ? 1 : (Q > kMaxChunks ? kMaxChunks : Q);
    for (int jb0 = 0; jb0 < Nb || jb0 == 0; jb0 += PB) {
      const int nb = Nb - jb0 < PB ? (Nb - jb0 > 0 ? Nb - jb0 : 0) : PB;
      const bool stage_a = jb0 == 0, last = jb0 + PB >= Nb;
      // stage the normalised rows (the A panel once per A panel)
      blk.each([&](int t) {
        const int rows = (stage_a ? na : 0) + nb;
        for (int e = t; e < rows * D; e += T) {
          int row = e / D;
          const int k = e % D;
          if (stage_a && row < na) {
            const int64_t p = pa(ia0 + row);
            sm.a[row * ld + k] = m[p * D + k] / den[p];
          } else {
            row -= stage_a ? na : 0;
            const int64_t p = pb(jb0 + row);
            sm.b[row * ld + k] = m[p * D + k] / den[p];
          }
        }
      });
      // scores: thread (pair g, chunk q) scans columns [q * cw, (q + 1) * cw) of its two rows
      const int cw = (nb + Q - 1) / Q;
      blk.each([&](int t) {
        for (int e = t; e < G * Q; e += T) {
          const int g = e % G, q = e / G;
          const int r0 = 2 * g, r1 = r0 + 1 < na ? r0 + 1 : r0;  // a lone last row is paired with itself
          const bool use0 = !skip_row(ia0 + r0), use1 = r1 != r0 && !skip_row(ia0 + r1);
          TopState s0 = Scan::init(), s1 = Scan::init();
          const int j_end = (q + 1) * cw < nb ? (q + 1) * cw : nb;
          if (use0 || use1) {
            const float* a0 = sm.a + r0 * ld;
            const float* a1 = sm.a + r1 * ld;
            for (int j = q * cw; j < j_end; j += 4) {
              const float* bj[4];
              for (int u = 0; u < 4; ++u) bj[u] = sm.b + (j + u < j_end ? j + u : j_end - 1) * ld;
              float acc0[4] = {0.f, 0.f, 0.f, 0.f}, acc1[4] = {0.f, 0.f, 0.f, 0.f};
              for (int k = 0; k < D; ++k) {
                const float x0 = a0[k], x1 = a1[k];
                for (int u = 0; u < 4; ++u) {
                  const float y = bj[u][k];
                  acc0[u] += x0 * y;
                  acc1[u] += x1 * y;
                }
              }
              for (int u = 0; u < 4 && j + u < j_end; ++u) {
                if (skip_col(jb0 + j + u)) continue;
                if (use0) Scan::push(s0, acc0[u], jb0 + j + u);
                if (use1) Scan::push(s1, acc1[u], jb0 + j + u);
              }
            }
          }
          sm.pv1[q * PA + r0] = s0.v1;
          sm.pv2[q * PA + r0] = s0.v2;
          sm.pi1[q * PA + r0] = s0.i1;
          if (r1 != r0) {
            sm.pv1[q * PA + r1] = s1.v1;
            sm.pv2[q * PA + r1] = s1.v2;
            sm.pi1[q * PA + r1] = s1.i1;
          }
        }
      });
      // merge the chunks, in column order, into the row's running state
      blk.each([&](int t) {
        for (int row = t; row < na; row += T) {
          const int i = ia0 + row;
          TopState s = Scan::init();
          if (!stage_a) s = TopState{v1[i], v2 ? v2[i] : neg_inf(), i1[i]};
          for (int q = 0; q < Q; ++q) Scan::merge(s, TopState{sm.pv1[q * PA + row], sm.pv2[q * PA + row],
                                                              sm.pi1[q * PA + row]});
          v1[i] = s.v1;
          if (v2) v2[i] = s.v2;
          i1[i] = s.i1;
          if (last) done(i);
        }
      });
      if (Nb <= 0) break;
    }
  }
}

}  // namespace simt
}  // namespace fpet
