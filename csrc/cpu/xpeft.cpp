// X-PEFT mixed-profile bottleneck adapter on CPU (forward): every batch row through its own
// profile's combined adapter, down-projection, ReLU, up-projection and residual add fused per
// tile of tokens. Schema and semantics: fpet_kernels/ops/xpeft.py (fpet::xpeft_adapter).
//
//   out[b] = residual[b] + scale * (relu(x[b] @ down[p] + down_bias[p]) @ up[p] + up_bias[p]),
//   p = profile[b]; residual absent: residual = x.
//
// How: the batch rows are sorted by profile (counting sort), each profile present gets its
// weights once in float32 panels (padded to 16 columns for the packed GEMM of common.h), and the
// work is a list of (row, token tile) tasks in profile order, split over the threads in contiguous
// runs, so a thread streams through its tiles with one profile's weights hot in cache. Per tile
// the hidden activations [tile, r] and the up-projection [tile, d] stay in the thread's scratch:
// x and residual are read once and out is written once. Every output element is a fixed-order
// float32 sum over its own row only: the result of a row does not depend on the other rows, on
// their profiles, on the tiling or on the thread count.
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

constexpr int64_t kTileTokens = 32;

struct XpeftScratch {
  std::vector<float> x, h, y, res;
};

// The m x d float32 rows of a tile: x itself when it is float32, else converted into buf.
template <typename T>
const float* tile_rows(const T* src, int64_t m, int64_t d, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(m * d));
  for (int64_t i = 0; i < m; ++i) load_row(src + i * d, buf.data() + i * d, d);
  return buf.data();
}
template <>
const float* tile_rows<float>(const float* src, int64_t, int64_t, std::vector<float>&) {
  return src;
}

struct XpeftTask {
  int64_t row, n0, n1;
};

at::Tensor xpeft_adapter_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& residual_,
                             const at::Tensor& profile_, const at::Tensor& down_, const at::Tensor& down_bias_,
                             const at::Tensor& up_, const at::Tensor& up_bias_, double scale_) {
  CHECK_BND(x_);
  TORCH_CHECK(std::isfinite(scale_), "xpeft_adapter: scale must be a finite number, got ", scale_);
  const int64_t B = x_.size(0), N = x_.size(1), d = x_.size(2);
  const bool has_res = residual_.has_value() && residual_->defined();
  if (has_res) {
    const at::Tensor& residual = *residual_;
    CHECK_CPU(residual);
    TORCH_CHECK(residual.sizes() == x_.sizes(), "residual must have x's shape ", x_.sizes(), ", got ",
                residual.sizes());
    TORCH_CHECK(residual.scalar_type() == x_.scalar_type(), "residual must have x's dtype ", x_.scalar_type(),
                ", got ", residual.scalar_type());
  }
  const at::Tensor& profile = profile_;
  CHECK_CPU(profile);
  CHECK_INDEX(profile);
  CHECK_DIM(profile, 1);
  TORCH_CHECK(profile.size(0) == B, "profile must have shape [B] = [", B, "], got ", profile.sizes());
  const at::Tensor &down = down_, &down_bias = down_bias_, &up = up_, &up_bias = up_bias_;
  const std::pair<const at::Tensor*, const char*> weights[] = {
      {&down, "down"}, {&down_bias, "down_bias"}, {&up, "up"}, {&up_bias, "up_bias"}};
  for (const auto& [t, name] : weights) {
    CHECK_CPU_AS(*t, name);
    CHECK_FLOATING_AS(*t, name);
  }
  CHECK_DIM(down, 3);
  const int64_t P = down.size(0), r = down.size(2);
  TORCH_CHECK(down.size(1) == d, "down must have shape [P, d, r] with x's d = ", d, ", got ", down.sizes());
  CHECK_SHAPE(down_bias, P, r);
  CHECK_SHAPE(up, P, r, d);
  CHECK_SHAPE(up_bias, P, d);

  const at::Tensor x = x_.contiguous();
  const at::Tensor res = has_res ? residual_->contiguous() : at::Tensor();
  const at::Tensor prof = profile.contiguous();
  const int64_t* pp = prof.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < P, "profile ids must be in [0, P) = [0, ", P, "), got profile[", b,
                "] = ", pp[b]);
  }
  at::Tensor out = empty_output(x.sizes(), x.options());
  if (B == 0 || N == 0 || d == 0) return out;

  // Rows sorted by profile (stable); the profiles present get a slot of packed weights.
  std::vector<int64_t> count(static_cast<size_t>(P) + 1, 0), slot(static_cast<size_t>(P), -1);
  for (int64_t b = 0; b < B; ++b) ++count[pp[b] + 1];
  for (int64_t p = 0; p < P; ++p) count[p + 1] += count[p];
  std::vector<int64_t> order(static_cast<size_t>(B));
  {
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t b = 0; b < B; ++b) order[next[pp[b]]++] = b;
  }
  std::vector<int64_t> present;
  for (int64_t p = 0; p < P; ++p) {
    if (count[p + 1] > count[p]) {
      slot[p] = static_cast<int64_t>(present.size());
      present.push_back(p);
    }
  }
  const int64_t S = static_cast<int64_t>(present.size());
  const int64_t rp = round_up(std::max<int64_t>(r, 1), kGemmNR), dp = round_up(d, kGemmNR);

  // Weight panels per present profile: down as [d][rp], up as [r][dp], biases as [rp] and [d].
  // float32 weights whose widths are already multiples of 16 are used in place.
  const at::Tensor down32 = contiguous_f32(down), up32 = contiguous_f32(up);
  const at::Tensor db32 = contiguous_f32(down_bias), ub32 = contiguous_f32(up_bias);
  const bool in_place = rp == r && dp == d;
  std::vector<float> dpanel, upanel;
  if (!in_place) {
    dpanel.assign(static_cast<size_t>(S * d * rp), 0.f);
    upanel.assign(static_cast<size_t>(S * r * dp), 0.f);
    const float *ds = down32.data_ptr<float>(), *us = up32.data_ptr<float>();
    at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t p = present[s];
        for (int64_t c = 0; c < d; ++c) {
          std::memcpy(dpanel.data() + (s * d + c) * rp, ds + (p * d + c) * r, sizeof(float) * r);
        }
        for (int64_t j = 0; j < r; ++j) {
          std::memcpy(upanel.data() + (s * r + j) * dp, us + (p * r + j) * d, sizeof(float) * d);
        }
      }
    });
  }
  auto down_panel = [&](int64_t p) -> const float* {
    return in_place ? down32.data_ptr<float>() + p * d * r : dpanel.data() + slot[p] * d * rp;
  };
  auto up_panel = [&](int64_t p) -> const float* {
    return in_place ? up32.data_ptr<float>() + p * r * d : upanel.data() + slot[p] * r * dp;
  };
  const float* dbp = db32.data_ptr<float>();
  const float* ubp = ub32.data_ptr<float>();
  const float scale = static_cast<float>(scale_);

  std::vector<XpeftTask> tasks;
  tasks.reserve(static_cast<size_t>(B * ((N + kTileTokens - 1) / kTileTokens)));
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t n0 = 0; n0 < N; n0 += kTileTokens) tasks.push_back({order[i], n0, std::min(N, n0 + kTileTokens)});
  }
  const int64_t T = static_cast<int64_t>(tasks.size());
  // Below ~64 tiles of work a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, T / std::max<int64_t>(1, at::get_num_threads())));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xpeft_adapter", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rsp = has_res ? res.data_ptr<scalar_t>() : xp;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      XpeftScratch sc;
      sc.h.resize(static_cast<size_t>(kTileTokens * rp));
      sc.y.resize(static_cast<size_t>(kTileTokens * dp));
      sc.res.resize(static_cast<size_t>(d));
      for (int64_t t = t0; t < t1; ++t) {
        const XpeftTask& task = tasks[t];
        const int64_t p = pp[task.row], m = task.n1 - task.n0;
        const int64_t base = (task.row * N + task.n0) * d;
        const float* X = tile_rows<scalar_t>(xp + base, m, d, sc.x);
        // h = relu(X @ down[p] + down_bias[p])   [m, rp]
        float* H = sc.h.data();
        gemm_packed(m, rp, d, X, d, 1, down_panel(p), rp, H, rp);
        const float* a = dbp + p * r;
        for (int64_t i = 0; i < m; ++i) {
          float* hi = H + i * rp;
          for (int64_t j = 0; j < r; ++j) hi[j] = std::max(hi[j] + a[j], 0.f);
        }
        // y = h @ up[p]   [m, dp]; out = residual + scale * (y + up_bias[p])
        float* Y = sc.y.data();
        if (r > 0) {
          gemm_packed(m, dp, r, H, rp, 1, up_panel(p), dp, Y, dp);
        } else {
          std::fill(Y, Y + m * dp, 0.f);
        }
        const float* ub = ubp + p * d;
        float* rr = sc.res.data();
        for (int64_t i = 0; i < m; ++i) {
          load_row(rsp + base + i * d, rr, d);
          const float* yi = Y + i * dp;
          for (int64_t c = 0; c < d; ++c) rr[c] = rr[c] + scale * (yi[c] + ub[c]);
          store_row(rr, op + base + i * d, d);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) { m.impl("xpeft_adapter", &fpet::xpeft_adapter_cpu); }
