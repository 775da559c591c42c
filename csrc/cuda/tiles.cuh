// Shared-memory layout and the similarity tiles of the matching kernels (ToMe, PYRA, FPET).
//
// Scores are computed tile by tile: TILE rows of A against TILE rows of B, the normalised metric
// rows staged in shared memory, each thread accumulating a 2 x 2 block of scores over D in
// float32 FMAs (one sequential sum over k per score: deterministic, independent of the tiling).
#pragma once

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

}  // namespace simt
}  // namespace fpet
