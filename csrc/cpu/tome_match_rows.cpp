// tome_match_rows on CPU: ToMe's bipartite matching with a token count and an r per row (padded
// batches: tokens of size 0 are padding; threshold merging: each row merges the A tokens whose best
// score reaches the threshold). The oracle is `tome_match_rows_reference` (fpet_kernels/ops/tome.py);
// the semantics: docs/semantics.md "Padded batches and threshold merging".
//
// Per image (at::parallel_for over B): the valid tokens, the row's cap on r, the scores of the
// candidate sources (valid A tokens but the class token) against the candidate destinations (valid B
// tokens but the distillation token), the ranking (candidates by best score descending, NaN first,
// ties to the lower index; then the class token; then padding), the row's r, and the token map in
// the spec 1.7 order of the row alone (padding -1; a row that merges nothing keeps input order).
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

struct RowsWorkspace {
  std::vector<float> an, bn, bnt, scores, best;
  std::vector<int64_t> dst, order, pos_b;
  std::vector<uint8_t> valid, group;
};

// metric: float32 [N, D]; s: float32 [N] or null (no padding). Writes src/dst [R], unm [Na], map [N]
// and *kept. r < 0: no cap from r (threshold only); has_thr: threshold merging.
void tome_match_rows_image(const float* metric, const float* s, int64_t N, int64_t D, int64_t R, int64_t r,
                           bool has_thr, float thr, bool class_token, bool distill_token, RowsWorkspace& ws,
                           int64_t* src_idx, int64_t* dst_idx, int64_t* unm_idx, int64_t* token_map, int64_t* kept) {
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  ws.valid.resize(static_cast<size_t>(N));
  int64_t n_valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    ws.valid[n] = s ? static_cast<uint8_t>(s[n] != 0.f) : uint8_t{1};
    n_valid += ws.valid[n];
  }
  auto va = [&](int64_t i) { return ws.valid[2 * i] != 0; };
  auto vb = [&](int64_t j) { return ws.valid[2 * j + 1] != 0; };
  auto cand_a = [&](int64_t i) { return va(i) && !(class_token && i == 0); };
  auto cand_b = [&](int64_t j) { return vb(j) && !(distill_token && j == 0); };
  int64_t n_cand_a = 0, na_valid = 0, n_cand_b = 0;
  for (int64_t i = 0; i < Na; ++i) {
    na_valid += va(i);
    n_cand_a += cand_a(i);
  }
  for (int64_t j = 0; j < Nb; ++j) n_cand_b += cand_b(j);
  const int64_t prot = (class_token && N > 0 ? int64_t(ws.valid[0]) : 0) + (distill_token && N > 1 ? int64_t(ws.valid[1]) : 0);
  int64_t cap = std::min((n_valid - prot) / 2, n_cand_a);
  if (n_cand_b == 0) cap = 0;
  if (r >= 0) cap = std::min(cap, r);

  // best score and its lowest-index destination of every candidate source (others: -inf, 0)
  ws.best.assign(static_cast<size_t>(Na), kNegInf);
  ws.dst.assign(static_cast<size_t>(Na), 0);
  if (cap > 0) {
    const int64_t Nbp = round_up(std::max<int64_t>(Nb, 1), kGemmNR);
    ws.an.assign(static_cast<size_t>(Na * D), 0.f);
    ws.bn.assign(static_cast<size_t>(Nb * D), 0.f);
    ws.bnt.assign(static_cast<size_t>(D * Nbp), 0.f);
    ws.scores.resize(static_cast<size_t>(Na * Nbp));
    for (int64_t i = 0; i < Na; ++i) {
      if (cand_a(i)) normalize_row(metric + (2 * i) * D, ws.an.data() + i * D, D);
    }
    for (int64_t j = 0; j < Nb; ++j) {
      if (cand_b(j)) normalize_row(metric + (2 * j + 1) * D, ws.bn.data() + j * D, D);
    }
    transpose_pad(ws.bn.data(), Nb, D, D, ws.bnt.data(), Nbp);
    gemm_packed(Na, Nbp, D, ws.an.data(), D, 1, ws.bnt.data(), Nbp, ws.scores.data(), Nbp);
    for (int64_t i = 0; i < Na; ++i) {
      if (!cand_a(i)) continue;
      float* row = ws.scores.data() + i * Nbp;
      for (int64_t j = 0; j < Nb; ++j) {
        if (!cand_b(j)) row[j] = kNegInf;
      }
      row_argmax(row, 0, Nb, ws.best[i], ws.dst[i]);
    }
  }
  // the ranking: group (0 candidate, 1 the class token, 2 padding), best descending (NaN first), index
  ws.group.resize(static_cast<size_t>(Na));
  for (int64_t i = 0; i < Na; ++i) ws.group[i] = static_cast<uint8_t>(!cand_a(i)) + static_cast<uint8_t>(!va(i));
  ws.order.resize(static_cast<size_t>(Na));
  std::iota(ws.order.begin(), ws.order.end(), int64_t{0});
  const float* best = ws.best.data();
  const uint8_t* group = ws.group.data();
  std::stable_sort(ws.order.begin(), ws.order.end(), [best, group](int64_t a, int64_t b) {
    return group[a] != group[b] ? group[a] < group[b] : score_greater(best[a], best[b]);
  });
  int64_t r_row = cap;
  if (has_thr && cap > 0) {  // the reaching candidates are a prefix of the ranking (NaN reaches it)
    int64_t reach = 0;
    for (int64_t i = 0; i < Na; ++i) reach += cand_a(i) && !(best[i] < thr);
    r_row = std::min(reach, cap);
  }
  for (int64_t k = 0; k < R; ++k) {
    src_idx[k] = k < r_row ? ws.order[k] : -1;
    dst_idx[k] = k < r_row ? ws.dst[ws.order[k]] : -1;
  }
  // unmerged valid A tokens: rank order, ascending with a class token or when the row merges nothing
  const int64_t n_unm = na_valid - r_row;
  std::copy(ws.order.begin() + r_row, ws.order.begin() + na_valid, unm_idx);
  if (class_token || r_row == 0) std::sort(unm_idx, unm_idx + n_unm);
  std::fill(unm_idx + n_unm, unm_idx + Na, int64_t{-1});
  *kept = n_valid - r_row;

  if (r_row == 0) {  // every valid token in input order
    int64_t k = 0;
    for (int64_t n = 0; n < N; ++n) token_map[n] = ws.valid[n] ? k++ : -1;
    return;
  }
  std::fill(token_map, token_map + N, int64_t{-1});
  ws.pos_b.resize(static_cast<size_t>(Nb));
  int64_t jr = 0;  // the rank of a valid B token among the valid B tokens
  for (int64_t j = 0; j < Nb; ++j) {
    if (!vb(j)) {
      ws.pos_b[j] = -1;
      continue;
    }
    ws.pos_b[j] = distill_token && jr == 0 ? 1 : n_unm + jr;
    token_map[2 * j + 1] = ws.pos_b[j];
    ++jr;
  }
  for (int64_t k = 0; k < n_unm; ++k) token_map[2 * unm_idx[k]] = distill_token && k > 0 ? k + 1 : k;
  for (int64_t k = 0; k < r_row; ++k) token_map[2 * src_idx[k]] = ws.pos_b[dst_idx[k]];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_rows_cpu(
    const at::Tensor& metric, std::optional<int64_t> r, bool class_token, bool distill_token,
    const std::optional<at::Tensor>& size, std::optional<double> threshold) {
  CHECK_BND(metric);
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  TORCH_CHECK(!r.has_value() || *r >= 0, "r must be >= 0, got ", r.value_or(0));
  TORCH_CHECK(!threshold.has_value() || (*threshold >= -1.0 && *threshold <= 1.0),
              "threshold must be a number in [-1, 1], got ", threshold.value_or(0.0));
  const int64_t cap = tome_r_cap(N, class_token, distill_token);
  const int64_t R = r.has_value() ? std::min(*r, cap) : cap;  // the static width (static_r)
  const int64_t Na = (N + 1) / 2;
  const at::Tensor m = contiguous_f32(metric);
  const at::Tensor s = sizes_f32(size, B, N);
  const auto lopt = metric.options().dtype(at::kLong);
  at::Tensor src = at::empty({B, R}, lopt), dst = at::empty({B, R}, lopt);
  at::Tensor unm = at::empty({B, Na}, lopt), map = at::empty({B, N}, lopt), kept = at::empty({B}, lopt);
  const float* mp = m.data_ptr<float>();
  const float* sp = ptr_or_null(s);
  int64_t *srp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>(), *up = unm.data_ptr<int64_t>();
  int64_t *tp = map.data_ptr<int64_t>(), *kp = kept.data_ptr<int64_t>();
  const int64_t r_in = r.has_value() ? *r : -1;
  const bool has_thr = threshold.has_value();
  // threshold compared in float32, as the float32 reference compares its scores with a Python float
  const float thr = has_thr ? static_cast<float>(*threshold) : 0.f;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    RowsWorkspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      tome_match_rows_image(mp + b * N * D, sp ? sp + b * N : nullptr, N, D, R, r_in, has_thr, thr, class_token,
                            distill_token, ws, srp + b * R, dp + b * R, up + b * Na, tp + b * N, kp + b);
    }
  });
  return {src, dst, unm, map, kept};
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) { m.impl("tome_match_rows", &fpet::tome_match_rows_cpu); }
