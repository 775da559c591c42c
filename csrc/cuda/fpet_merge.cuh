// FPET checkerboard matching: the fused forward merge and its straight-through backward.
// Contracts: csrc/README.md (`fpet_merge`, `fpet_merge_backward`); execution model: simt.cuh;
// the CPU oracle: csrc/cpu/fpet.cpp (same top-2 scan, same tie rules, same summation orders
// wherever a sum is sequential).
//
// Forward, one launch, one block per (image, channel slice) as ToMe; 8 phases at ViT-B/16 (N = 197,
// D = 64: tests/test_simt_phases.py):
//   1. position tables of the A and B sets, den[n] = max(||metric[n]||, eps) one thread per row
//   2-4. the matching over staged normalised rows (tiles.cuh, staged_match: staging, all scores A x B
//      in one phase, the column chunks merged per A row): per A row the two largest values and the
//      column of the largest, scanning the columns in ascending order (prefix columns skipped: they
//      are -inf; strict >: the lowest column wins a tie, NaN never does); in the last of them the
//      hard match: top1 column iff top1 > top2 (compared as scores), else -1
//   5. per destination the first slot of its sources (the count of sources with a lower
//      destination: no scan) and each source's slot among them (ascending A index)
//   6. sources grouped by destination, token_map (block of slice 0)
//   7. merged sizes (block of slice 0 writes them)
//   8. merged rows of this block's channel slice: B row j's sum starts with the row itself and adds
//      its sources in ascending A index.
//
// Backward, two launches and three float32 workspaces (the caching allocator's at::empty):
//   P     [B, Na, Nb]  scores, then P = G soft (1 - soft), then dS (in place)
//   norm  [B, N]       ||metric[n]|| (before the eps clamp)
//   gden  [B, Nb]      g_den = -<grad_out, out> / out_size (+ grad_size)
//   launch 1, grid (B, ceil(Na / 32)): a block owns 32 A rows: norms and g_den (all rows; the
//     block of tile 0 writes them out), score tiles and the top-2 of its rows, then per B tile
//     G = z_A g_num^T (+ s_A g_den) over C in chunks and P, then the row sums and dS.
//   launch 2, grid (B, ceil(Na / 32) + ceil(Nb / 32)): a block owns 32 A rows (dA_n = dS B_n)
//     or 32 B rows (dB_n = dS^T A_n), sums over the other set in ascending index, the
//     normalisation backward, and grad_x / grad_size of its rows.
// No atomics: every sum has one fixed order, so results are deterministic.
//
// fpet_merge_rows / fpet_merge_rows_backward (padded batches, issue 21; docs/semantics.md "Padded
// batches and threshold merging"): the same bodies with `padded` set. A token of size 0 is padding:
// its scores take no part (skipped rows / columns of the matching, 0 entries of P), it maps to -1,
// its output slot never reads it, its gradients are 0; a valid A token of a row without a valid
// destination cell (grid B token) keeps output row p (the short-row rule).
#pragma once

#include <torch/library.h>

#include "launch.h"
#include "tiles.cuh"

namespace fpet {
namespace kernels {

using simt::kTile;

// A write-only pointer whose dtype is known only at run time (grad_metric in metric.dtype).
struct FpetOut {
  void* ptr = nullptr;
  Dtype dtype = Dtype::f32;
  FPET_HD void store(int64_t i, float v) const {
    switch (dtype) {
      case Dtype::f16: static_cast<c10::Half*>(ptr)[i] = static_cast<c10::Half>(v); break;
      case Dtype::bf16: static_cast<c10::BFloat16*>(ptr)[i] = static_cast<c10::BFloat16>(v); break;
      default: static_cast<float*>(ptr)[i] = v;
    }
  }
};

// The checkerboard of csrc/README.md: p prefix tokens, then a row-major H x W grid.
// A = (even, even) cells ++ (odd, odd) cells; B = prefix ++ (odd, even) cells ++ (even, odd) cells.
struct FpetGrid {
  int p, H, W;
  int wa;    // cells of even w per grid row: ceil(W / 2)
  int wo;    // cells of odd w per grid row: W / 2
  int n_ee;  // (even, even) cells
  int n_oe;  // (odd, even) cells
  int Na, Nb, N;
  FPET_HD static FpetGrid make(int p, int H, int W) {
    FpetGrid g;
    g.p = p;
    g.H = H;
    g.W = W;
    g.wa = (W + 1) / 2;
    g.wo = W / 2;
    g.n_ee = ((H + 1) / 2) * g.wa;
    g.n_oe = (H / 2) * g.wa;
    g.Na = g.n_ee + (H / 2) * g.wo;
    g.Nb = p + g.n_oe + ((H + 1) / 2) * g.wo;
    g.N = p + H * W;
    return g;
  }
  FPET_HD int a_pos(int i) const {
    if (i < n_ee) return p + 2 * (i / wa) * W + 2 * (i % wa);
    const int k = i - n_ee;  // (odd, odd): only reached when wo > 0
    return p + (2 * (k / wo) + 1) * W + 2 * (k % wo) + 1;
  }
  FPET_HD int b_pos(int j) const {
    if (j < p) return j;
    int k = j - p;
    if (k < n_oe) return p + (2 * (k / wa) + 1) * W + 2 * (k % wa);
    k -= n_oe;  // (even, odd): only reached when wo > 0
    return p + 2 * (k / wo) * W + 2 * (k % wo) + 1;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
struct FpetMergeSmem {
  int* apos;    // [Na] token position of A row i
  int* bpos;    // [Nb] token position of B row j
  float* den;   // [N]
  float* v1;    // [Na] largest score of A row i
  float* v2;    // [Na] second largest
  int* i1;      // [Na] column of the largest (-1: none)
  int* match;   // [Na] hard match (-1: none)
  int* slot;    // [Na] place of source i among its destination's sources (ascending i)
  int* list;    // [Na] sources grouped by destination
  int* head;    // [Nb + 1] first source of each destination
  float* bden;  // [Nb] merged size of each B row
  simt::StagedMatch staged;  // the matching's staged rows (tiles.cuh)
  size_t bytes;
  FPET_HD static FpetMergeSmem make(char* base, const FpetGrid& g, int D, simt::MatchPlan plan) {
    simt::Arena ar{base};
    FpetMergeSmem s;
    s.apos = ar.take<int>(g.Na);
    s.bpos = ar.take<int>(g.Nb);
    s.den = ar.take<float>(g.N);
    s.v1 = ar.take<float>(g.Na);
    s.v2 = ar.take<float>(g.Na);
    s.i1 = ar.take<int>(g.Na);
    s.match = ar.take<int>(g.Na);
    s.slot = ar.take<int>(g.Na);
    s.list = ar.take<int>(g.Na);
    s.head = ar.take<int>(g.Nb + 1);
    s.bden = ar.take<float>(g.Nb);
    s.staged = simt::StagedMatch::take(ar, D, plan);
    s.bytes = ar.used;
    return s;
  }
  // The staging panels for `limit` bytes of shared memory: as large as the rest leaves room for.
  static simt::MatchPlan plan(const FpetGrid& g, int D, size_t limit) {
    const size_t rest = make(nullptr, g, D, simt::MatchPlan{}).bytes;
    return simt::plan_match(g.Na, g.Nb, D, limit > rest ? limit - rest : 0);
  }
};

template <typename scalar_t>
struct FpetMergeBody {
  const scalar_t* x;
  AnyPtr metric, size;
  FpetGrid g;
  int C, D;
  int slice;  // channels per block
  simt::MatchPlan plan;  // rows staged per pass (FpetMergeSmem::plan)
  scalar_t* out;
  float* out_size;
  int64_t* token_map;
  bool padded;  // fpet_merge_rows: tokens of size 0 are padding

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem_base, int bx, int by) const {
    const int T = blk.size();
    const int N = g.N, Na = g.Na, Nb = g.Nb, p = g.p;
    const int64_t b = bx;
    const bool lead = by == 0;  // the block of slice 0 writes token_map and out_size
    const int c0 = by * slice;
    const int cw = C - c0 < slice ? (C - c0 > 0 ? C - c0 : 0) : slice;
    const AnyPtr m = metric + b * N * D;
    const AnyPtr s = size + b * N;
    const scalar_t* xb = x + b * N * C;
    scalar_t* ob = out + b * Nb * C;
    float* osb = out_size + b * Nb;
    int64_t* map_b = token_map + b * N;
    const FpetMergeSmem sm = FpetMergeSmem::make(smem_base, g, D, plan);
    // padded: whether the image has a valid destination cell (every thread reads the sizes itself)
    bool has_dst = true;
    if (padded) {
      has_dst = false;
      for (int j = p; j < Nb && !has_dst; ++j) has_dst = s[g.b_pos(j)] != 0.f;
    }

    // 1. position tables, norms (one thread per row)
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) sm.apos[i] = g.a_pos(i);
      for (int j = t; j < Nb; j += T) sm.bpos[j] = g.b_pos(j);
      for (int n = t; n < N; n += T) {
        float ss = 0.f;
        for (int k = 0; k < D; ++k) {
          const float v = m[int64_t(n) * D + k];
          ss += v * v;
        }
        sm.den[n] = fmaxf(sqrtf(ss), simt::kNormEps);
      }
    });

    // 2-4. top-2 of every A row over the non-prefix columns, in ascending column order; hard matches
    simt::staged_match<simt::Top2Scan>(
        blk, sm.staged, m, sm.den, D, Na, Nb, [&](int i) { return sm.apos[i]; }, [&](int j) { return sm.bpos[j]; },
        [&](int i) { return padded && s[sm.apos[i]] == 0.f; },
        [&](int j) { return j < p || (padded && s[sm.bpos[j]] == 0.f); }, sm.v1, sm.v2, sm.i1, [&](int i) {
          const int j = sm.i1[i];
          sm.match[i] = j >= 0 && sm.v1[i] > sm.v2[i] ? j : -1;
          if (padded) sm.match[i] = s[sm.apos[i]] == 0.f ? -1 : has_dst ? sm.match[i] : p;  // short row: row p
        });
    // 5. sources per destination (ascending A index): slots, first slot of each destination
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) {
        const int j = sm.match[i];
        int before = 0;
        if (j >= 0) {
          for (int i2 = 0; i2 < i; ++i2) before += sm.match[i2] == j;
        }
        sm.slot[i] = before;
      }
      for (int j = t; j <= Nb; j += T) {
        int before = 0;
        for (int i = 0; i < Na; ++i) before += sm.match[i] >= 0 && sm.match[i] < j;
        sm.head[j] = before;
      }
    });
    // 6. sources grouped by destination, token_map
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) {
        const int j = sm.match[i];
        if (j >= 0) sm.list[sm.head[j] + sm.slot[i]] = i;
      }
      if (!lead) return;
      for (int j = t; j < Nb; j += T) map_b[sm.bpos[j]] = padded && s[sm.bpos[j]] == 0.f ? -1 : j;
      for (int i = t; i < Na; i += T) map_b[sm.apos[i]] = sm.match[i];
    });
    // 7. merged sizes, 8. the merged rows of this slice
    blk.each([&](int t) {
      for (int j = t; j < Nb; j += T) {
        float den = s[sm.bpos[j]];
        for (int h = sm.head[j]; h < sm.head[j + 1]; ++h) den += s[sm.apos[sm.list[h]]];
        sm.bden[j] = den;
        if (lead) osb[j] = den;
      }
    });
    blk.each([&](int t) {
      for (int e = t; e < Nb * cw; e += T) {
        const int j = e / cw, c = c0 + e % cw;
        const int64_t pj = sm.bpos[j];
        // padded: a padding B token (size 0) is never read
        float acc = padded && s[pj] == 0.f ? 0.f : static_cast<float>(xb[pj * C + c]) * s[pj];
        for (int h = sm.head[j]; h < sm.head[j + 1]; ++h) {
          const int64_t pi = sm.apos[sm.list[h]];
          acc += static_cast<float>(xb[pi * C + c]) * s[pi];
        }
        // a merged row whose sizes sum to 0 is 0 (docs/semantics.md)
        ob[int64_t(j) * C + c] = static_cast<scalar_t>(sm.bden[j] == 0.f ? 0.f : acc / sm.bden[j]);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, launch 1: dS of 32 A rows
// ---------------------------------------------------------------------------------------------
struct FpetScoreGradSmem {
  int* apos;     // [Na]
  int* bpos;     // [Nb]
  float* den;    // [N] max(||m||, eps)
  float* gden;   // [Nb]
  float* v1;     // [kTile] top-2 state of the block's rows
  float* v2;
  int* i1;
  int* i2;
  float* tv;     // [kTile] t = (top1 + top2) / 2
  float* sa;     // [kTile] sizes of the block's A rows
  float* rsum;   // [kTile] sum_j P[i, j]
  float* gacc;   // [kTile][kTile + 1] G tile
  simt::ScoreTiles tiles;  // row width max(D, 32): also the staging of the G chunks
  int kc;        // channels per G chunk
  size_t bytes;
  FPET_HD static FpetScoreGradSmem make(char* base, const FpetGrid& g, int D) {
    simt::Arena ar{base};
    FpetScoreGradSmem s;
    s.apos = ar.take<int>(g.Na);
    s.bpos = ar.take<int>(g.Nb);
    s.den = ar.take<float>(g.N);
    s.gden = ar.take<float>(g.Nb);
    s.v1 = ar.take<float>(kTile);
    s.v2 = ar.take<float>(kTile);
    s.i1 = ar.take<int>(kTile);
    s.i2 = ar.take<int>(kTile);
    s.tv = ar.take<float>(kTile);
    s.sa = ar.take<float>(kTile);
    s.rsum = ar.take<float>(kTile);
    s.gacc = ar.take<float>(kTile * (kTile + 1));
    s.kc = D > kTile ? D : kTile;
    s.tiles = simt::ScoreTiles::take(ar, s.kc);
    s.bytes = ar.used;
    return s;
  }
};

template <typename scalar_t>
struct FpetScoreGradBody {
  const scalar_t* x;
  AnyPtr metric, size, grad_out, out, out_size, grad_size;
  FpetGrid g;
  int C, D;
  float* ws_p;     // [B, Na, Nb]
  float* ws_norm;  // [B, N]
  float* ws_gden;  // [B, Nb]
  bool padded;     // fpet_merge_rows_backward: scores with a size-0 token take no part

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem_base, int bx, int by) const {
    const int T = blk.size();
    const int N = g.N, Na = g.Na, Nb = g.Nb, p = g.p;
    const int64_t b = bx;
    const bool lead = by == 0;
    const int i0 = by * kTile;
    const int rows = Na - i0 < kTile ? (Na - i0 > 0 ? Na - i0 : 0) : kTile;
    const AnyPtr m = metric + b * N * D;
    const AnyPtr s = size + b * N;
    const AnyPtr go = grad_out + b * Nb * C;
    const AnyPtr ot = out + b * Nb * C;
    const AnyPtr os = out_size + b * Nb;
    const AnyPtr gs = grad_size + b * Nb;
    const scalar_t* xb = x + b * N * C;
    float* P = ws_p + b * Na * Nb;  // row i0 + ii: P + (i0 + ii) * Nb
    const FpetScoreGradSmem sm = FpetScoreGradSmem::make(smem_base, g, D);
    // padded: a score with a padding token (size 0) on either side takes no part (-inf)
    auto pad = [&](int r, int j) { return padded && (sm.sa[r] == 0.f || s[sm.bpos[j]] == 0.f); };

    // position tables, top-2 state, sizes of the block's rows
    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) sm.apos[i] = g.a_pos(i);
      for (int j = t; j < Nb; j += T) sm.bpos[j] = g.b_pos(j);
      if (t < kTile) {
        sm.v1[t] = simt::neg_inf();
        sm.v2[t] = simt::neg_inf();
        sm.i1[t] = -1;
        sm.i2[t] = -1;
        sm.sa[t] = t < rows ? s[g.a_pos(i0 + t)] : 0.f;
      }
    });
    // norms of all rows, g_den of all B rows (the block of tile 0 writes both out for launch 2)
    simt::row_sums(
        blk, N, D, sm.tiles.s,
        [&](int n, int k) {
          const float v = m[int64_t(n) * D + k];
          return v * v;
        },
        [&](int n, float ss) {
          const float nrm = sqrtf(ss);
          sm.den[n] = fmaxf(nrm, simt::kNormEps);
          if (lead) ws_norm[b * N + n] = nrm;
        });
    simt::row_sums(
        blk, Nb, C, sm.tiles.s,
        [&](int j, int c) {
          const int64_t e = int64_t(j) * C + c;
          return go[e] * ot[e];
        },
        [&](int j, float dot) {
          const float osj = os[j];
          float gd = osj == 0.f ? 0.f : -dot / osj;  // a constant-0 row passes no gradient
          if (gs.defined()) gd += gs[j];
          sm.gden[j] = gd;
          if (lead) ws_gden[b * Nb + j] = gd;
        });
    if (rows == 0) return;

    // scores of the block's rows (into P), their top-2 in ascending column order
    auto pa = [&](int i) { return sm.apos[i]; };
    auto pb = [&](int j) { return sm.bpos[j]; };
    const int j_first = p / kTile * kTile;
    for (int j0 = j_first; j0 < Nb; j0 += kTile) {
      simt::score_tile(blk, sm.tiles, m, sm.den, D, i0, Na, j0, Nb, pa, pb);
      blk.each([&](int t) {
        for (int e = t; e < kTile * kTile; e += T) {
          const int ii = e / kTile, jj = e % kTile;
          const int j = j0 + jj;
          if (ii < rows && j < Nb && j >= p) P[int64_t(i0 + ii) * Nb + j] = sm.tiles.score(ii, jj);
        }
        if (t >= rows) return;
        float v1 = sm.v1[t], v2 = sm.v2[t];
        int i1 = sm.i1[t], i2 = sm.i2[t];
        for (int jj = 0; jj < kTile && j0 + jj < Nb; ++jj) {
          if (j0 + jj < p || pad(t, j0 + jj)) continue;
          const float v = sm.tiles.score(t, jj);
          if (v > v1) {
            v2 = v1;
            i2 = i1;
            v1 = v;
            i1 = j0 + jj;
          } else if (v > v2) {
            v2 = v;
            i2 = j0 + jj;
          }
        }
        sm.v1[t] = v1;
        sm.v2[t] = v2;
        sm.i1[t] = i1;
        sm.i2[t] = i2;
      });
    }
    blk.each([&](int t) {
      if (t < rows) sm.tv[t] = (sm.v1[t] + sm.v2[t]) / 2.0f;
    });

    // per B tile: G = z_A g_num^T over C in chunks, then P = (G + s_A g_den) soft (1 - soft)
    const int kc = sm.kc, ld = sm.tiles.ld;
    constexpr int H = kTile / 2;
    for (int j0 = 0; j0 < Nb; j0 += kTile) {
      const bool any = j0 + kTile > p;  // a column past the prefix
      for (int cc0 = 0; any && cc0 < C; cc0 += kc) {
        const int kw = C - cc0 < kc ? C - cc0 : kc;
        blk.each([&](int t) {
          for (int e = t; e < kTile * kw; e += T) {
            const int r = e / kw, k = e % kw, c = cc0 + k;
            const int i = i0 + r, j = j0 + r;
            sm.tiles.a[r * ld + k] =
                r < rows ? static_cast<float>(xb[int64_t(sm.apos[i]) * C + c]) * sm.sa[r] : 0.f;
            const float osj = j < Nb ? static_cast<float>(os[j]) : 0.f;
            sm.tiles.b[r * ld + k] = j < Nb && osj != 0.f ? go[int64_t(j) * C + c] / osj : 0.f;
          }
        });
        blk.each([&](int t) {
          for (int e = t; e < H * H; e += T) {
            const int ii = 2 * (e / H), jj = 2 * (e % H);
            float* out = sm.gacc + ii * (kTile + 1) + jj;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            if (cc0 != 0) {
              acc[0] = out[0];
              acc[1] = out[1];
              acc[2] = out[kTile + 1];
              acc[3] = out[kTile + 2];
            }
            simt::dot_2x2(sm.tiles.a + ii * ld, sm.tiles.b + jj * ld, ld, kw, acc);
            simt::store_2x2(acc, out, kTile + 1);
          }
        });
      }
      blk.each([&](int t) {
        for (int e = t; e < kTile * kTile; e += T) {
          const int ii = e / kTile, jj = e % kTile;
          const int j = j0 + jj;
          if (ii >= rows || j >= Nb) continue;
          float* pij = P + int64_t(i0 + ii) * Nb + j;
          if (j < p || *pij != *pij || pad(ii, j)) {  // prefix columns, NaN scores, padding take no part
            *pij = 0.f;
            continue;
          }
          const float soft = simt::sigmoid(*pij - sm.tv[ii]);
          const float gdot = C > 0 ? sm.gacc[ii * (kTile + 1) + jj] : 0.f;
          const float gij = gdot + sm.sa[ii] * sm.gden[j];
          *pij = gij * soft * (1.0f - soft);
        }
      });
    }
    // dS = P - 0.5 (sum_j P) ([j == top1] + [j == top2])
    simt::row_sums(
        blk, rows, Nb, sm.tiles.s, [&](int r, int j) { return P[int64_t(i0 + r) * Nb + j]; },
        [&](int r, float sum) { sm.rsum[r] = sum; });
    blk.each([&](int t) {
      if (t >= rows) return;
      const float half = 0.5f * sm.rsum[t];
      float* row = P + int64_t(i0 + t) * Nb;
      if (sm.i1[t] >= 0) row[sm.i1[t]] -= half;
      if (sm.i2[t] >= 0) row[sm.i2[t]] -= half;
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, launch 2: grad_metric, grad_x, grad_size of 32 A rows or 32 B rows
// ---------------------------------------------------------------------------------------------
struct FpetInputGradSmem {
  int* apos;    // [Na]
  int* bpos;    // [Nb]
  int* pos;     // [kTile] token positions of the block's rows
  int* dst;     // [kTile] output row each of them went to (-1: none)
  float* nd;    // [kTile] <n, dn>
  float* own;   // [kTile][D + 1] normalised rows of the block
  float* oth;   // [kTile][D + 1] normalised rows of the other set (one tile)
  float* acc;   // [kTile][D + 1] dn
  float* dt;    // [kTile][kTile + 1] dS tile (own rows x other rows); row_sums scratch
  int ld;
  size_t bytes;
  FPET_HD static FpetInputGradSmem make(char* base, const FpetGrid& g, int D) {
    simt::Arena ar{base};
    FpetInputGradSmem s;
    s.ld = D + 1;
    s.apos = ar.take<int>(g.Na);
    s.bpos = ar.take<int>(g.Nb);
    s.pos = ar.take<int>(kTile);
    s.dst = ar.take<int>(kTile);
    s.nd = ar.take<float>(kTile);
    s.own = ar.take<float>(int64_t{kTile} * s.ld);
    s.oth = ar.take<float>(int64_t{kTile} * s.ld);
    s.acc = ar.take<float>(int64_t{kTile} * s.ld);
    s.dt = ar.take<float>(kTile * (kTile + 1));
    s.bytes = ar.used;
    return s;
  }
};

template <typename scalar_t>
struct FpetInputGradBody {
  const scalar_t* x;
  AnyPtr metric, size, grad_out, out_size;
  const int64_t* token_map;
  FpetGrid g;
  int C, D;
  int tiles_a;  // blocks y < tiles_a own A rows, the others B rows
  const float* ws_p;
  const float* ws_norm;
  const float* ws_gden;
  scalar_t* grad_x;
  FpetOut grad_metric;
  float* grad_size;
  bool padded;  // a padding B token (size 0): its slot is an output row of its own, no gradient

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem_base, int bx, int by) const {
    const int T = blk.size();
    const int N = g.N, Na = g.Na, Nb = g.Nb;
    const int64_t b = bx;
    const bool is_a = by < tiles_a;
    const int r0 = (is_a ? by : by - tiles_a) * kTile;  // first own row (A or B index)
    const int n_own = is_a ? Na : Nb, n_oth = is_a ? Nb : Na;
    const int rows = n_own - r0 < kTile ? n_own - r0 : kTile;
    const AnyPtr m = metric + b * N * D;
    const AnyPtr s = size + b * N;
    const AnyPtr go = grad_out + b * Nb * C;
    const AnyPtr os = out_size + b * Nb;
    const scalar_t* xb = x + b * N * C;
    const int64_t* map_b = token_map + b * N;
    const float* P = ws_p + b * Na * Nb;
    const float* nrm = ws_norm + b * N;
    const float* gden = ws_gden + b * Nb;
    scalar_t* gxb = grad_x + b * N * C;
    float* gsb = grad_size + b * N;
    const int64_t gm0 = b * N * D;
    const FpetInputGradSmem sm = FpetInputGradSmem::make(smem_base, g, D);
    const int ld = sm.ld;

    blk.each([&](int t) {
      for (int i = t; i < Na; i += T) sm.apos[i] = g.a_pos(i);
      for (int j = t; j < Nb; j += T) sm.bpos[j] = g.b_pos(j);
      if (t < rows) {
        const int r = r0 + t;
        if (is_a) {
          const int pos = g.a_pos(r);
          const int64_t j = map_b[pos];
          sm.pos[t] = pos;
          sm.dst[t] = j >= 0 && j < Nb ? static_cast<int>(j) : -1;  // out of range: no match
        } else {
          sm.pos[t] = g.b_pos(r);
          sm.dst[t] = padded && s[sm.pos[t]] == 0.f ? -1 : r;
        }
      }
    });
    // the block's rows normalised; dn = 0
    blk.each([&](int t) {
      for (int e = t; e < kTile * D; e += T) {
        const int r = e / D, k = e % D;
        float v = 0.f;
        if (r < rows) {
          const int64_t pos = sm.pos[r];
          v = m[pos * D + k] / fmaxf(nrm[pos], simt::kNormEps);
          v = v == v ? v : 0.f;  // a NaN row (its dS entries are 0) spreads no NaN
        }
        sm.own[r * ld + k] = v;
        sm.acc[r * ld + k] = 0.f;
      }
    });
    // dn[r] = sum_q dS(r, q) n_q over the other set in ascending q
    for (int q0 = 0; q0 < n_oth; q0 += kTile) {
      blk.each([&](int t) {
        for (int e = t; e < kTile * D; e += T) {
          const int q = e / D, k = e % D;
          float v = 0.f;
          if (q0 + q < n_oth) {
            const int64_t pos = is_a ? sm.bpos[q0 + q] : sm.apos[q0 + q];
            v = m[pos * D + k] / fmaxf(nrm[pos], simt::kNormEps);
            v = v == v ? v : 0.f;
          }
          sm.oth[q * ld + k] = v;
        }
        for (int e = t; e < kTile * kTile; e += T) {
          // consecutive threads read consecutive floats of a P row (A: along q, B: along r)
          const int r = is_a ? e / kTile : e % kTile, q = is_a ? e % kTile : e / kTile;
          float v = 0.f;
          if (r < rows && q0 + q < n_oth) {
            v = is_a ? P[int64_t(r0 + r) * Nb + q0 + q] : P[int64_t(q0 + q) * Nb + r0 + r];
          }
          sm.dt[r * (kTile + 1) + q] = v;
        }
      });
      const int qn = n_oth - q0 < kTile ? n_oth - q0 : kTile;
      blk.each([&](int t) {
        for (int e = t; e < rows * D; e += T) {
          const int r = e / D, k = e % D;
          float a = sm.acc[r * ld + k];
          for (int q = 0; q < qn; ++q) a += sm.dt[r * (kTile + 1) + q] * sm.oth[q * ld + k];
          sm.acc[r * ld + k] = a;
        }
      });
    }
    // through the normalisation: dm = (dn - n <n, dn>) / ||m||, 0 unless eps < ||m|| < inf
    simt::row_sums(
        blk, rows, D, sm.dt, [&](int r, int k) { return sm.own[r * ld + k] * sm.acc[r * ld + k]; },
        [&](int r, float v) { sm.nd[r] = v; });
    blk.each([&](int t) {
      for (int e = t; e < rows * D; e += T) {
        const int r = e / D, k = e % D;
        const int64_t pos = sm.pos[r];
        const float norm = nrm[pos], dn = sm.acc[r * ld + k];
        const bool ok = norm > simt::kNormEps && norm < simt::pos_inf();
        const float v = ok ? (dn - sm.own[r * ld + k] * sm.nd[r]) / norm : 0.f;
        grad_metric.store(gm0 + pos * D + k, v);
      }
    });
    // grad_size = <g_num[dst], x> + g_den[dst]; grad_x = g_num[dst] * s (0 without a destination)
    simt::row_sums(
        blk, rows, C, sm.dt,
        [&](int r, int c) {
          const int j = sm.dst[r];
          if (j < 0) return 0.f;
          const int64_t pos = sm.pos[r];
          const float osj = os[j];
          return osj == 0.f ? 0.f : go[int64_t(j) * C + c] / osj * static_cast<float>(xb[pos * C + c]);
        },
        [&](int r, float v) {
          const int j = sm.dst[r];
          gsb[sm.pos[r]] = j < 0 ? 0.f : v + gden[j];
        });
    blk.each([&](int t) {
      for (int e = t; e < rows * C; e += T) {
        const int r = e / C, c = e % C;
        const int j = sm.dst[r];
        const int64_t pos = sm.pos[r];
        const float osj = j < 0 ? 0.f : static_cast<float>(os[j]);
        const float v = osj == 0.f ? 0.f : go[int64_t(j) * C + c] / osj * s[pos];
        gxb[pos * C + c] = static_cast<scalar_t>(v);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
// 0 <= num_prefix <= N, H, W >= 1, num_prefix + H * W == N (spec 2.1).
inline FpetGrid checked_fpet_grid(int64_t N, int64_t p, int64_t H, int64_t W, const char* op) {
  TORCH_CHECK(p >= 0 && p <= N, op, ": num_prefix must be in [0, N = ", N, "], got ", p);
  TORCH_CHECK(H >= 1 && W >= 1 && H <= N && W <= N, op, ": grid H, W must be in [1, N = ", N, "], got ", H, ", ", W);
  TORCH_CHECK(p + H * W == N, op, ": grid does not match the tokens: num_prefix + H * W = ", p, " + ", H, " * ", W,
              " != N = ", N);
  return FpetGrid::make(static_cast<int>(p), static_cast<int>(H), static_cast<int>(W));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_launch_impl(
    const at::Tensor& x_in, const at::Tensor& metric_in, const std::optional<at::Tensor>& size_in, int64_t num_prefix,
    int64_t H, int64_t W, bool padded) {
  const char* op = padded ? "fpet_merge_rows" : "fpet_merge";
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const at::Tensor metric = checked_bnd<Exec>(metric_in, op, "metric");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, op, ": metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  check_int32(N * std::max<int64_t>({C, D, 1}), op, "N * max(C, D)");
  const FpetGrid g = checked_fpet_grid(N, num_prefix, H, W, op);
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  check_same_device(metric, x, op, "metric");
  check_same_device(size, x, op, "size");
  at::Tensor out = at::empty({B, g.Nb, C}, x.options());
  at::Tensor out_size = at::empty({B, g.Nb, 1}, x.options().dtype(at::kFloat));
  at::Tensor token_map = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0) return {out, out_size, token_map};
  const ChannelSlices slices = channel_slices(B, C, Exec::num_sms(x));
  FPET_DISPATCH_KERNEL_TYPES(x.scalar_type(), op, "x", [&] {
    FpetMergeBody<scalar_t> body{};
    body.x = x.data_ptr<scalar_t>();
    body.metric = any_ptr(metric, op, "metric");
    body.size = any_ptr(size, op, "size");
    body.g = g;
    body.C = static_cast<int>(C);
    body.D = static_cast<int>(D);
    body.slice = static_cast<int>(slices.width);
    body.plan = FpetMergeSmem::plan(g, body.D, Exec::smem_limit(x));
    TORCH_CHECK(body.plan.pa > 0, op, ": N = ", N, " tokens with a metric of D = ", D, " channels need more shared "
                "memory than the device's ", Exec::smem_limit(x), " bytes per block (a smaller N or D fits)");
    body.out = out.data_ptr<scalar_t>();
    body.out_size = out_size.data_ptr<float>();
    body.token_map = token_map.data_ptr<int64_t>();
    body.padded = padded;
    const size_t smem = FpetMergeSmem::make(nullptr, g, body.D, body.plan).bytes;
    Exec::launch(body, static_cast<int>(B), slices.blocks, smem);
  });
  return {out, out_size, token_map};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_launch(const at::Tensor& x, const at::Tensor& metric,
                                                                  const std::optional<at::Tensor>& size,
                                                                  int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_launch_impl<Exec>(x, metric, size, num_prefix, H, W, false);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_rows_launch(const at::Tensor& x, const at::Tensor& metric,
                                                                       const std::optional<at::Tensor>& size,
                                                                       int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_launch_impl<Exec>(x, metric, size, num_prefix, H, W, true);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_backward_launch_impl(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_size_in, const at::Tensor& x_in,
    const at::Tensor& metric_in, const std::optional<at::Tensor>& size_in, const at::Tensor& out_in,
    const at::Tensor& out_size_in, const at::Tensor& token_map_in, int64_t num_prefix, int64_t H, int64_t W,
    bool padded) {
  const char* op = padded ? "fpet_merge_rows_backward" : "fpet_merge_backward";
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const at::Tensor metric = checked_bnd<Exec>(metric_in, op, "metric");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, op, ": metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  const FpetGrid g = checked_fpet_grid(N, num_prefix, H, W, op);
  const int64_t Na = g.Na, Nb = g.Nb;
  const at::Tensor grad_out = checked_bnd<Exec>(grad_out_in, op, "grad_out");
  const at::Tensor out = checked_bnd<Exec>(out_in, op, "out");
  TORCH_CHECK(grad_out.size(0) == B && grad_out.size(1) == Nb && grad_out.size(2) == C, op,
              ": grad_out must have shape [", B, ", ", Nb, ", ", C, "], got ", grad_out.sizes());
  TORCH_CHECK(out.size(0) == B && out.size(1) == Nb && out.size(2) == C, op, ": out must have shape [", B, ", ", Nb,
              ", ", C, "], got ", out.sizes());
  TORCH_CHECK(out_size_in.defined(), op, ": out_size must be a tensor");
  const at::Tensor out_size = checked_size<Exec>(out_size_in, B, Nb, op, "out_size");
  const at::Tensor grad_size = checked_size<Exec>(grad_size_in, B, Nb, op, "grad_size");
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  const at::Tensor token_map = checked_map<Exec>(token_map_in, B, N, op);
  check_map_range(token_map, Nb, op);
  check_int32(N * std::max<int64_t>({C, D, 1}), op, "N * max(C, D)");
  check_int32(Na * Nb, op, "Na * Nb");
  check_same_device(metric, x, op, "metric");
  check_same_device(grad_out, x, op, "grad_out");
  check_same_device(out, x, op, "out");
  check_same_device(out_size, x, op, "out_size");
  check_same_device(grad_size, x, op, "grad_size");
  check_same_device(size, x, op, "size");
  check_same_device(token_map, x, op, "token_map");
  at::Tensor grad_x = at::empty({B, N, C}, x.options());
  at::Tensor grad_metric = at::empty({B, N, D}, metric.options());
  at::Tensor grad_size_out = at::empty({B, N, 1}, x.options().dtype(at::kFloat));
  if (B == 0) return {grad_x, grad_metric, grad_size_out};
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor ws_p = at::empty({B, Na, Nb}, fopt);
  at::Tensor ws_norm = at::empty({B, N}, fopt);
  at::Tensor ws_gden = at::empty({B, Nb}, fopt);
  const int tiles_a = static_cast<int>((Na + kTile - 1) / kTile);
  const int tiles_b = static_cast<int>((Nb + kTile - 1) / kTile);
  FPET_DISPATCH_KERNEL_TYPES(x.scalar_type(), op, "x", [&] {
    FpetScoreGradBody<scalar_t> k1{};
    k1.x = x.data_ptr<scalar_t>();
    k1.metric = any_ptr(metric, op, "metric");
    k1.size = any_ptr(size, op, "size");
    k1.grad_out = any_ptr(grad_out, op, "grad_out");
    k1.out = any_ptr(out, op, "out");
    k1.out_size = any_ptr(out_size, op, "out_size");
    k1.grad_size = any_ptr(grad_size, op, "grad_size");
    k1.g = g;
    k1.C = static_cast<int>(C);
    k1.D = static_cast<int>(D);
    k1.ws_p = ws_p.data_ptr<float>();
    k1.ws_norm = ws_norm.data_ptr<float>();
    k1.ws_gden = ws_gden.data_ptr<float>();
    k1.padded = padded;
    // at least one block per image: it also writes the norms and g_den that launch 2 reads
    Exec::launch(k1, static_cast<int>(B), std::max(tiles_a, 1), FpetScoreGradSmem::make(nullptr, g, k1.D).bytes);

    FpetInputGradBody<scalar_t> k2{};
    k2.x = k1.x;
    k2.metric = k1.metric;
    k2.size = k1.size;
    k2.grad_out = k1.grad_out;
    k2.out_size = k1.out_size;
    k2.token_map = token_map.data_ptr<int64_t>();
    k2.g = g;
    k2.C = k1.C;
    k2.D = k1.D;
    k2.tiles_a = tiles_a;
    k2.ws_p = k1.ws_p;
    k2.ws_norm = k1.ws_norm;
    k2.ws_gden = k1.ws_gden;
    k2.grad_x = grad_x.data_ptr<scalar_t>();
    k2.grad_metric.ptr = grad_metric.data_ptr();
    k2.grad_metric.dtype = kernel_dtype(grad_metric.scalar_type(), op, "metric");
    k2.grad_size = grad_size_out.data_ptr<float>();
    k2.padded = padded;
    Exec::launch(k2, static_cast<int>(B), tiles_a + tiles_b, FpetInputGradSmem::make(nullptr, g, k2.D).bytes);
  });
  return {grad_x, grad_metric, grad_size_out};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_backward_launch(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const at::Tensor& metric, const std::optional<at::Tensor>& size, const at::Tensor& out,
    const at::Tensor& out_size, const at::Tensor& token_map, int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_backward_launch_impl<Exec>(grad_out, grad_size, x, metric, size, out, out_size, token_map,
                                               num_prefix, H, W, false);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fpet_merge_rows_backward_launch(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const at::Tensor& metric, const std::optional<at::Tensor>& size, const at::Tensor& out,
    const at::Tensor& out_size, const at::Tensor& token_map, int64_t num_prefix, int64_t H, int64_t W) {
  return fpet_merge_backward_launch_impl<Exec>(grad_out, grad_size, x, metric, size, out, out_size, token_map,
                                               num_prefix, H, W, true);
}

template <class Exec>
void register_fpet(torch::Library& m) {
  m.impl("fpet_merge", &fpet_merge_launch<Exec>);
  m.impl("fpet_merge_backward", &fpet_merge_backward_launch<Exec>);
  m.impl("fpet_merge_rows", &fpet_merge_rows_launch<Exec>);
  m.impl("fpet_merge_rows_backward", &fpet_merge_rows_backward_launch<Exec>);
}

}  // namespace kernels
}  // namespace fpet
