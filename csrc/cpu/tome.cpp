// ToMe on CPU: bipartite matching, the fused match + size-weighted merge, and the merges driven
// by a token map (merge_wavg and its backward, unmerge, merge_sum). Contracts: csrc/README.md.
//
// Work is split over images (at::parallel_for over B). When there are fewer images than
// threads, the merges also split the channels into blocks; that changes no summation order
// (every sum runs over tokens, per channel), so results are identical for any thread count.
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

struct MergeScratch {
  std::vector<float> acc, den, w;
  std::vector<int64_t> head, list, count, pos;
};

// Check a token map [B, N] (int64, CPU) against x's leading dims.
void check_token_map(const at::Tensor& token_map, int64_t B, int64_t N) {
  CHECK_CPU(token_map);
  CHECK_INDEX(token_map);
  CHECK_SHAPE(token_map, B, N);
}

inline int64_t checked_target(int64_t m, int64_t n_out) {
  TORCH_CHECK(m >= -1 && m < n_out, "token_map entries must be in [-1, ", n_out, "), got ", m);
  return m;
}

// ---------------------------------------------------------------------------------------------
// tome_merge, one image, channels [c0, c1): unmerged rows, then each B row with its sources in
// rank order. Writes out_size too when it is not null.
// ---------------------------------------------------------------------------------------------
template <typename T>
void tome_merge_image(const T* x, const float* s, int64_t N, int64_t C, int64_t r, bool distill_token,
                      const int64_t* src_idx, const int64_t* dst_idx, const int64_t* unm_idx, T* out,
                      float* out_size, int64_t c0, int64_t c1, MergeScratch& sc) {
  const int64_t cw = c1 - c0;
  auto size_of = [s](int64_t pos) { return s ? s[pos] : 1.0f; };
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  const TomeRows rows{Na, r, distill_token};
  for (int64_t k = 0; k < Na - r; ++k) {
    const int64_t pos = 2 * unm_idx[k], row = rows.unm_row(k);
    scaled_copy(x + pos * C + c0, size_of(pos), out + row * C + c0, cw);
    if (out_size) out_size[row] = size_of(pos);
  }
  group_by_destination(dst_idx, r, Nb, sc.head, sc.list);
  sc.acc.resize(static_cast<size_t>(cw));
  sc.pos.resize(static_cast<size_t>(r + 1));
  sc.w.resize(static_cast<size_t>(r + 1));
  for (int64_t j = 0; j < Nb; ++j) {
    const int64_t row = rows.b_row(j);
    // The B row itself, then its sources in rank order.
    int64_t count = 0;
    sc.pos[count] = 2 * j + 1;
    sc.w[count++] = size_of(2 * j + 1);
    float den = sc.w[0];
    for (int64_t h = sc.head[j]; h < sc.head[j + 1]; ++h) {
      const int64_t spos = 2 * src_idx[sc.list[h]];
      sc.pos[count] = spos;
      sc.w[count] = size_of(spos);
      den += sc.w[count++];
    }
    weighted_mean_row(x + c0, C, sc.pos.data(), sc.w.data(), count, den, out + row * C + c0, cw, sc.acc.data());
    if (out_size) out_size[row] = den;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_cpu(const at::Tensor& metric, int64_t r,
                                                                           bool class_token, bool distill_token) {
  CHECK_BND(metric);
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  checked_r(r, N, class_token, distill_token);
  const int64_t Na = (N + 1) / 2;
  const at::Tensor m = contiguous_f32(metric);
  const auto lopt = metric.options().dtype(at::kLong);
  at::Tensor src = at::empty({B, r}, lopt), dst = at::empty({B, r}, lopt);
  at::Tensor unm = at::empty({B, Na - r}, lopt), map = at::empty({B, N}, lopt);
  const float* mp = m.data_ptr<float>();
  int64_t *sp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>();
  int64_t *up = unm.data_ptr<int64_t>(), *tp = map.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    TomeWorkspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      tome_match_image(mp + b * N * D, N, D, r, class_token, distill_token, ws, sp + b * r, dp + b * r,
                       up + b * (Na - r), tp + b * N);
    }
  });
  return {src, dst, unm, map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_merge_cpu(
    const at::Tensor& x_, const at::Tensor& metric, int64_t r, const std::optional<at::Tensor>& size,
    bool class_token, bool distill_token) {
  CHECK_BND(x_);
  CHECK_BND(metric);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2), D = metric.size(2);
  TORCH_CHECK(metric.size(0) == B && metric.size(1) == N, "metric must be [B, N, D] with x's B, N = ", B, ", ",
              N, ", got ", metric.sizes());
  checked_r(r, N, class_token, distill_token);
  const int64_t Na = (N + 1) / 2;
  const at::Tensor x = x_.contiguous();
  const at::Tensor m = contiguous_f32(metric);
  const at::Tensor s = sizes_f32(size, B, N);
  const TomeMergeOutputs outs(x, r);
  const at::Tensor &out = outs.out, &out_size = outs.out_size, &src = outs.src, &dst = outs.dst;
  const at::Tensor &unm = outs.unm, &map = outs.map;
  const float* mp = m.data_ptr<float>();
  const float* sp_all = ptr_or_null(s);
  float* osp = out_size.data_ptr<float>();
  int64_t *sp = src.data_ptr<int64_t>(), *dp = dst.data_ptr<int64_t>();
  int64_t *up = unm.data_ptr<int64_t>(), *tp = map.data_ptr<int64_t>();
  if (r == 0) {  // the identity: x copied bit for bit, the sizes as given
    tome_identity_merge(x, s, m, outs, class_token, distill_token);
    return {out, out_size, src, dst, unm, map};
  }
  const ChannelSplit split = split_channels(B, C, N);
  const bool fused = split.chunks == 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto merge = [&](int64_t b, int64_t c0, int64_t c1, bool write_size, MergeScratch& sc) {
      tome_merge_image<scalar_t>(xp + b * N * C, sp_all ? sp_all + b * N : nullptr, N, C, r, distill_token,
                                 sp + b * r, dp + b * r, up + b * (Na - r), op + b * (N - r) * C,
                                 write_size ? osp + b * (N - r) : nullptr, c0, c1, sc);
    };
    // Matching (and, with one channel block per image, the merge) per image in one body.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TomeWorkspace ws;
      MergeScratch sc;
      for (int64_t b = b0; b < b1; ++b) {
        tome_match_image(mp + b * N * D, N, D, r, class_token, distill_token, ws, sp + b * r, dp + b * r,
                         up + b * (Na - r), tp + b * N);
        if (fused) merge(b, 0, C, true, sc);
      }
    });
    if (!fused) {  // fewer images than threads: merge in channel blocks
      for_each_channel_block<MergeScratch>(B, C, split, merge);
    }
  });
  return {out, out_size, src, dst, unm, map};
}

// ---------------------------------------------------------------------------------------------
// Token-map driven ops. Each task is (image, channel block); sums run in ascending position.
// ---------------------------------------------------------------------------------------------
template <typename F>
void for_each_image_block(int64_t B, int64_t C, const F& body) {
  for_each_channel_block<MergeScratch>(B, C, split_channels(B, C), body);
}

std::tuple<at::Tensor, at::Tensor> merge_wavg_cpu(const at::Tensor& x_, const std::optional<at::Tensor>& size,
                                                  const at::Tensor& token_map_, int64_t n_out) {
  CHECK_BND(x_);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2);
  check_token_map(token_map_, B, N);
  check_n_out(n_out);
  const at::Tensor x = x_.contiguous(), token_map = token_map_.contiguous();
  const at::Tensor s = sizes_f32(size, B, N);
  at::Tensor out = empty_output({B, n_out, C}, x.options());
  at::Tensor out_size = at::empty({B, n_out, 1}, x.options().dtype(at::kFloat));
  const float* sp_all = ptr_or_null(s);
  const int64_t* mp = token_map.data_ptr<int64_t>();
  float* osp = out_size.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge_wavg", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_image_block(B, C, [&](int64_t b, int64_t c0, int64_t c1, bool first, MergeScratch& sc) {
      const int64_t cw = c1 - c0;
      const int64_t* map = mp + b * N;
      const float* s = sp_all ? sp_all + b * N : nullptr;
      const scalar_t* xb = xp + b * N * C + c0;
      scalar_t* ob = op + b * n_out * C + c0;
      sc.den.assign(static_cast<size_t>(n_out), 0.f);
      sc.count.assign(static_cast<size_t>(n_out), 0);
      sc.acc.assign(static_cast<size_t>(n_out * cw), 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t m = checked_target(map[n], n_out);
        if (m < 0) continue;
        const float sv = s ? s[n] : 1.0f;
        sc.den[m] += sv;
        ++sc.count[m];
        acc_add(sc.acc.data() + m * cw, xb + n * C, sv, cw);
      }
      for (int64_t m = 0; m < n_out; ++m) {  // a row whose sizes sum to 0 (or that nobody maps to) is 0
        acc_store(sc.acc.data() + m * cw, sc.den[m], ob + m * C, cw);
        if (first) osp[b * n_out + m] = sc.den[m];
      }
    });
  });
  return {out, out_size};
}

at::Tensor merge_wavg_backward_cpu(const at::Tensor& grad_out_, const std::optional<at::Tensor>& size,
                                   const at::Tensor& out_size_, const at::Tensor& token_map_) {
  CHECK_BND(grad_out_);
  const int64_t B = grad_out_.size(0), n_out = grad_out_.size(1), C = grad_out_.size(2);
  CHECK_CPU(token_map_);
  CHECK_INDEX(token_map_);
  CHECK_DIM(token_map_, 2);
  TORCH_CHECK(token_map_.size(0) == B, "token_map must have ", B, " rows, got ", token_map_.sizes());
  const int64_t N = token_map_.size(1);
  CHECK_FLOATING(grad_out_);
  CHECK_CPU(out_size_);
  CHECK_FLOATING(out_size_);
  CHECK_SHAPE(out_size_, B, n_out, 1);
  const at::Tensor g = grad_out_.contiguous(), token_map = token_map_.contiguous();
  const at::Tensor os = contiguous_f32(out_size_);
  const at::Tensor s = sizes_f32(size, B, N);
  at::Tensor grad_x = empty_output({B, N, C}, g.options());
  const float* sp_all = ptr_or_null(s);
  const float* osp = os.data_ptr<float>();
  const int64_t* mp = token_map.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "merge_wavg_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    for_each_image_block(B, C, [&](int64_t b, int64_t c0, int64_t c1, bool, MergeScratch&) {
      const int64_t cw = c1 - c0;
      const int64_t* map = mp + b * N;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t m = checked_target(map[n], n_out);
        scalar_t* dst = xp + (b * N + n) * C + c0;
        if (m < 0) {
          std::fill(dst, dst + cw, static_cast<scalar_t>(0.f));
          continue;
        }
        const float sv = sp_all ? sp_all[b * N + n] : 1.0f;
        const float den = osp[b * n_out + m];
        if (den == 0.f) {  // the output row is the constant 0
          zero_row(dst, cw);
          continue;
        }
        const scalar_t* src = gp + (b * n_out + m) * C + c0;
        for (int64_t c = 0; c < cw; ++c) dst[c] = static_cast<scalar_t>(static_cast<float>(src[c]) * sv / den);
      }
    });
  });
  return grad_x;
}

at::Tensor unmerge_cpu(const at::Tensor& y_, const at::Tensor& token_map_) {
  CHECK_BND(y_);
  const int64_t B = y_.size(0), n_out = y_.size(1), C = y_.size(2);
  CHECK_CPU(token_map_);
  CHECK_INDEX(token_map_);
  CHECK_DIM(token_map_, 2);
  TORCH_CHECK(token_map_.size(0) == B, "token_map must have ", B, " rows, got ", token_map_.sizes());
  const int64_t N = token_map_.size(1);
  const at::Tensor y = y_.contiguous(), token_map = token_map_.contiguous();
  at::Tensor out = empty_output({B, N, C}, y.options());
  const int64_t* mp = token_map.data_ptr<int64_t>();
  const int64_t esize = static_cast<int64_t>(y.element_size());
  const char* yp = static_cast<const char*>(y.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  for_each_image_block(B, C, [&](int64_t b, int64_t c0, int64_t c1, bool, MergeScratch&) {
    const size_t bytes = static_cast<size_t>((c1 - c0) * esize);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t m = checked_target(mp[b * N + n], n_out);
      char* dst = op + ((b * N + n) * C + c0) * esize;
      if (m < 0) {
        std::memset(dst, 0, bytes);  // all-zero bits are 0.0 in every float dtype
      } else {
        std::memcpy(dst, yp + ((b * n_out + m) * C + c0) * esize, bytes);
      }
    }
  });
  return out;
}

at::Tensor merge_sum_cpu(const at::Tensor& x_, const at::Tensor& token_map_, int64_t n_out) {
  CHECK_BND(x_);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2);
  check_token_map(token_map_, B, N);
  check_n_out(n_out);
  const at::Tensor x = x_.contiguous(), token_map = token_map_.contiguous();
  at::Tensor out = empty_output({B, n_out, C}, x.options());
  const int64_t* mp = token_map.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge_sum", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_image_block(B, C, [&](int64_t b, int64_t c0, int64_t c1, bool, MergeScratch& sc) {
      const int64_t cw = c1 - c0;
      const scalar_t* xb = xp + b * N * C + c0;
      scalar_t* ob = op + b * n_out * C + c0;
      sc.acc.assign(static_cast<size_t>(n_out * cw), 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t m = checked_target(mp[b * N + n], n_out);
        if (m >= 0) acc_add(sc.acc.data() + m * cw, xb + n * C, 1.0f, cw);
      }
      for (int64_t m = 0; m < n_out; ++m) store_row(sc.acc.data() + m * cw, ob + m * C, cw);
    });
  });
  return out;
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) {
  m.impl("tome_match", &fpet::tome_match_cpu);
  m.impl("tome_merge", &fpet::tome_merge_cpu);
  m.impl("merge_wavg", &fpet::merge_wavg_cpu);
  m.impl("merge_wavg_backward", &fpet::merge_wavg_backward_cpu);
  m.impl("unmerge", &fpet::unmerge_cpu);
  m.impl("merge_sum", &fpet::merge_sum_cpu);
}
