// PYRA's backward: the gradients of pyra_merge in x, a, b, ln_weight, ln_bias and size, from the
// forward's inputs, its output and its matching. Contract: csrc/README.md (pyra_merge_backward);
// execution model: simt.cuh; the CPU oracle: csrc/cpu/pyra_backward.cpp (same formulas; sums over
// channels are in the row_sums order here, so float32 agrees to a few ulps, not bitwise).
//
// Notation per image: the r sources k in rank order, S = z_A[src_k], T = z_B[dst_k] (z = x * s),
// y = S + T, yh = (y - mean) rstd, W = yh ln_w + ln_b, G = g_num of k's destination row with
// g_num = grad_out / out_size (0 where out_size == 0: that output row is the constant 0).
//
// Two launches and two float32 workspaces (the caching allocator's at::empty):
//   ws    [B, 6r + 2C]  per source: mean, rstd, wt, g_v, and the two means of the LayerNorm
//                       backward; per channel: wc and g_u
//   part  [B, r + 3C]   per image: the partial sums of grad_a, grad_b, grad_ln_weight, grad_ln_bias,
//                       summed over images afterwards by at::sum (a fixed-order reduction)
//   launch 1, grid (B, 1): the statistics (row sums over C for the per-source values, one thread per
//     channel summing over the sources in rank order for the per-channel values), and the partials;
//   launch 2, grid (B, ceil(N / 32)): a block owns 32 tokens, enumerated as the unmerged slots, the
//     sources (rank order), then the B rows; each token's g_z (its row's g_num; a source adds
//     G wc wt_k + g_y[k], a B row the g_y of its sources in rank order), grad_x = g_z s and
//     grad_size = sum_c (g_z x - g_num out) + grad_out_size of its output row.
// No atomics: every sum has one fixed order, so results are deterministic. The launcher checks the
// matching (ranges, and that src_idx and unm_idx name every A row once) with one host sync.
#pragma once

#include <torch/library.h>

#include "pyra_merge.cuh"

namespace fpet {
namespace kernels {

// Tokens per block of launch 2.
constexpr int kPyraBwdItems = 32;
// Floats of row_sums scratch: one per thread, for any block size the executors use (<= 1024).
constexpr int kPyraBwdScratch = 1024;

// The per-image statistics of launch 1 in the workspace `ws` [6r + 2C].
struct PyraBwdStats {
  float *mean, *rstd, *wt, *gv, *m1, *m2, *wc, *gu;
  FPET_HD static PyraBwdStats at(float* base, int r, int C) {
    PyraBwdStats s;
    s.mean = base;
    s.rstd = base + r;
    s.wt = base + 2 * r;
    s.gv = base + 3 * r;
    s.m1 = base + 4 * r;
    s.m2 = base + 5 * r;
    s.wc = base + 6 * r;
    s.gu = base + 6 * r + C;
    return s;
  }
};

// What both launches read, with the per-image views and the recomputed quantities.
template <typename scalar_t>
struct PyraBwdArgs {
  const scalar_t* x;
  AnyPtr size, grad_out, grad_out_size, out, out_size;  // grad_out_size may be null (no term)
  const int64_t *src_idx, *dst_idx, *unm_idx;
  AnyPtr a, b, ln_weight, ln_bias;
  float eps;
  int N, C, r;
  bool distill_token;
  float* ws;    // [B, 6r + 2C]
  float* part;  // [B, r + 3C]
};

template <typename scalar_t>
struct PyraBwdImage {
  const PyraBwdArgs<scalar_t>& p;
  const scalar_t* xb;
  AnyPtr s, go, out, os;
  const int64_t *src, *dst;
  PyraBwdStats st;
  TomeRows rows;
  FPET_HD PyraBwdImage(const PyraBwdArgs<scalar_t>& args, int64_t img)
      : p(args),
        xb(args.x + img * args.N * args.C),
        s(args.size + img * args.N),
        go(args.grad_out + img * (args.N - args.r) * args.C),
        out(args.out + img * (args.N - args.r) * args.C),
        os(args.out_size + img * (args.N - args.r)),
        src(args.src_idx + img * args.r),
        dst(args.dst_idx + img * args.r),
        st(PyraBwdStats::at(args.ws + img * (6 * args.r + 2 * args.C), args.r, args.C)),
        rows{(args.N + 1) / 2, args.r, args.distill_token} {}
  FPET_HD float z(int64_t pos, int c) const { return static_cast<float>(xb[pos * p.C + c]) * s[pos]; }
  FPET_HD float y(int k, int c) const { return z(2 * src[k], c) + z(2 * dst[k] + 1, c); }
  FPET_HD float yh(int k, int c) const { return (y(k, c) - st.mean[k]) * st.rstd[k]; }
  FPET_HD float w(int k, int c) const { return yh(k, c) * p.ln_weight[c] + p.ln_bias[c]; }
  FPET_HD float gnum(int64_t row, int c) const {  // 0 where the row's sizes sum to 0 (a constant 0 row)
    const float den = os[row];
    return den == 0.0f ? 0.0f : go[row * p.C + c] / den;
  }
  FPET_HD float g_src(int k, int c) const { return gnum(rows.b_row(static_cast<int>(dst[k])), c); }
  // g_yh = (a g_u + g_v b) ln_w, and the LayerNorm backward g_y = rstd (g_yh - m1 - yh m2)
  FPET_HD float gyh(int k, int c) const { return (p.a[k] * st.gu[c] + st.gv[k] * p.b[c]) * p.ln_weight[c]; }
  FPET_HD float gy(int k, int c) const {
    return st.rstd[k] * (gyh(k, c) - st.m1[k] - yh(k, c) * st.m2[k]);
  }
};

// Launch 1: the statistics and the parameter partials of one image.
template <typename scalar_t>
struct PyraBwdStatsBody {
  PyraBwdArgs<scalar_t> p;

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bx, int /*by*/) const {
    const int T = blk.size();
    const int C = p.C, r = p.r;
    const PyraBwdImage<scalar_t> im(p, bx);
    const PyraBwdStats& st = im.st;
    float* part = p.part + int64_t(bx) * (r + 3 * C);
    float* scratch = reinterpret_cast<float*>(smem);
    const float inv_c = 1.0f / static_cast<float>(C);
    // (a) mean, rstd, wt = 2 sigmoid(<W, b>) - 1 per source
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return im.y(k, c); },
                   [&](int k, float v) { st.mean[k] = v * inv_c; });
    simt::row_sums(
        blk, r, C, scratch,
        [&](int k, int c) {
          const float d = im.y(k, c) - st.mean[k];
          return d * d;
        },
        [&](int k, float v) { st.rstd[k] = 1.0f / sqrtf(v * inv_c + p.eps); });
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return im.w(k, c) * p.b[c]; },
                   [&](int k, float v) { st.wt[k] = 2.0f * simt::sigmoid(v) - 1.0f; });
    // (b) per channel: wc = 2 sigmoid(sum_k a_k W), g_wc = sum_k G S wt_k, g_u = g_wc wc (1 - wc / 2)
    blk.each([&](int t) {
      for (int c = t; c < C; c += T) {
        float u = 0.f, gwc = 0.f;
        for (int k = 0; k < r; ++k) {
          u += p.a[k] * im.w(k, c);
          gwc += im.g_src(k, c) * im.z(2 * im.src[k], c) * st.wt[k];
        }
        const float wc = 2.0f * simt::sigmoid(u);
        st.wc[c] = wc;
        st.gu[c] = gwc * wc * (1.0f - wc / 2.0f);
      }
    });
    // (c) per source: g_v from g_wt = <G S, wc>, grad_a = <g_u, W>, the two means of g_yh
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return im.g_src(k, c) * im.z(2 * im.src[k], c) * st.wc[c]; },
                   [&](int k, float gwt) {
                     const float sv = (st.wt[k] + 1.0f) / 2.0f;
                     st.gv[k] = gwt * 2.0f * sv * (1.0f - sv);
                   });
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return st.gu[c] * im.w(k, c); },
                   [&](int k, float v) { part[k] = v; });
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return im.gyh(k, c); },
                   [&](int k, float v) { st.m1[k] = v * inv_c; });
    simt::row_sums(blk, r, C, scratch, [&](int k, int c) { return im.gyh(k, c) * im.yh(k, c); },
                   [&](int k, float v) { st.m2[k] = v * inv_c; });
    // (d) per channel: grad_b = sum_k g_v W, grad_ln_weight = sum_k g_W yh, grad_ln_bias = sum_k g_W
    blk.each([&](int t) {
      for (int c = t; c < C; c += T) {
        float gb = 0.f, glw = 0.f, glb = 0.f;
        for (int k = 0; k < r; ++k) {
          const float yh = im.yh(k, c);
          const float gw = p.a[k] * st.gu[c] + st.gv[k] * p.b[c];
          gb += st.gv[k] * (yh * p.ln_weight[c] + p.ln_bias[c]);
          glw += gw * yh;
          glb += gw;
        }
        part[r + c] = gb;
        part[r + C + c] = glw;
        part[r + 2 * C + c] = glb;
      }
    });
  }
};

// Shared memory of launch 2.
struct PyraBwdTokenSmem {
  int* kind;  // [items] 0 unmerged, 1 source, 2 B row, -1 past the end
  int* k;     // [items] the source's rank
  int* pos;   // [items] token position
  int* row;   // [items] output row
  int* head;  // [items + 1] a B row's sources in `list`
  int* list;  // [r] ranks, grouped by B row, ascending within
  float* scratch;
  size_t bytes;
  FPET_HD static PyraBwdTokenSmem make(char* base, int r) {
    simt::Arena ar{base};
    PyraBwdTokenSmem s;
    s.kind = ar.take<int>(kPyraBwdItems);
    s.k = ar.take<int>(kPyraBwdItems);
    s.pos = ar.take<int>(kPyraBwdItems);
    s.row = ar.take<int>(kPyraBwdItems);
    s.head = ar.take<int>(kPyraBwdItems + 1);
    s.list = ar.take<int>(r);
    s.scratch = ar.take<float>(kPyraBwdScratch);
    s.bytes = ar.used;
    return s;
  }
};

// Launch 2: grad_x and grad_size of a block of tokens.
template <typename scalar_t>
struct PyraBwdTokensBody {
  PyraBwdArgs<scalar_t> p;
  scalar_t* grad_x;
  float* grad_size;

  template <class Blk>
  FPET_HD void operator()(Blk& blk, char* smem, int bx, int by) const {
    const int T = blk.size();
    const int N = p.N, C = p.C, r = p.r, Na = (N + 1) / 2, Nb = N / 2;
    const int64_t img = bx;
    const PyraBwdImage<scalar_t> im(p, img);
    const PyraBwdTokenSmem sm = PyraBwdTokenSmem::make(smem, r);
    const int64_t* unm = p.unm_idx + img * (Na - r);
    const AnyPtr gos = p.grad_out_size + img * (N - r);
    scalar_t* gx = grad_x + img * N * C;
    float* gsz = grad_size + img * N;
    const int first = by * kPyraBwdItems;
    // 1. what each token is; a B row counts its sources
    blk.each([&](int t) {
      if (t >= kPyraBwdItems) return;
      const int it = first + t;
      int kind = -1, k = 0, pos = 0, row = 0, count = 0;
      if (it < Na - r) {
        kind = 0;
        pos = 2 * static_cast<int>(unm[it]);
        row = im.rows.unm_row(it);
      } else if (it < Na) {
        kind = 1;
        k = it - (Na - r);
        pos = 2 * static_cast<int>(im.src[k]);
        row = im.rows.b_row(static_cast<int>(im.dst[k]));
      } else if (it < Na + Nb) {
        kind = 2;
        const int j = it - Na;
        pos = 2 * j + 1;
        row = im.rows.b_row(j);
        for (int q = 0; q < r; ++q) count += im.dst[q] == j;
      }
      sm.kind[t] = kind;
      sm.k[t] = k;
      sm.pos[t] = pos;
      sm.row[t] = row;
      sm.head[t + 1] = count;
    });
    blk.each([&](int t) {
      if (t != 0) return;
      sm.head[0] = 0;
      for (int i = 0; i < kPyraBwdItems; ++i) sm.head[i + 1] += sm.head[i];
    });
    blk.each([&](int t) {
      if (t >= kPyraBwdItems || sm.kind[t] != 2) return;
      const int j = sm.pos[t] / 2;
      int h = sm.head[t];
      for (int q = 0; q < r; ++q) {
        if (im.dst[q] == j) sm.list[h++] = q;
      }
    });
    // g_z of token i at channel c
    auto gz = [&](int i, int c) {
      const float g = im.gnum(sm.row[i], c);
      if (sm.kind[i] == 1) {
        const int k = sm.k[i];
        return g * (1.0f + im.st.wc[c] * im.st.wt[k]) + im.gy(k, c);
      }
      float acc = g;
      for (int h = sm.head[i]; h < sm.head[i + 1]; ++h) acc += im.gy(sm.list[h], c);
      return acc;
    };
    // 2. grad_size = sum_c (g_z x - g_num out) + grad_out_size
    simt::row_sums(
        blk, kPyraBwdItems, C, sm.scratch,
        [&](int i, int c) {
          if (sm.kind[i] < 0) return 0.0f;
          const int64_t pos = sm.pos[i], row = sm.row[i];
          return gz(i, c) * static_cast<float>(im.xb[pos * C + c]) - im.gnum(row, c) * im.out[row * C + c];
        },
        [&](int i, float v) {
          if (sm.kind[i] < 0) return;
          gsz[sm.pos[i]] = v + (gos.defined() ? gos[sm.row[i]] : 0.0f);
        });
    // 3. grad_x = g_z s
    blk.each([&](int t) {
      for (int e = t; e < kPyraBwdItems * C; e += T) {
        const int i = e / C, c = e % C;
        if (sm.kind[i] < 0) continue;
        const int64_t pos = sm.pos[i];
        gx[pos * C + c] = static_cast<scalar_t>(gz(i, c) * im.s[pos]);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------
using PyraBwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <class Exec>
at::Tensor checked_index(const at::Tensor& t, int64_t B, int64_t cols, const char* op, const char* name) {
  check_device<Exec>(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == cols, op, ": ", name, " must have shape [", B, ", ",
              cols, "], got ", t.sizes());
  return t.contiguous();
}

// src_idx in [0, Na), dst_idx in [0, Nb), and src_idx with unm_idx naming every A row once (so that
// every position of grad_x is written exactly once). One host sync; skipped for the matching of
// pyra_merge's own forward (inside its backward: csrc/trusted_maps.h).
inline void check_pyra_matching(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& unm, int64_t Na,
                                int64_t Nb, const char* op) {
  if (src.size(0) == 0 || Na == 0 || trusted_maps()) return;
  const at::Tensor both = std::get<0>(at::sort(at::cat({src, unm}, 1), 1));
  at::Tensor ok = both.eq(at::arange(Na, src.options()).unsqueeze(0)).all();
  if (dst.numel() > 0) ok = ok.logical_and(dst.ge(0).logical_and(dst.lt(Nb)).all());
  TORCH_CHECK(ok.item<bool>(), op, ": src_idx and unm_idx must together name every A row in [0, ", Na,
              ") once, and dst_idx entries must be in [0, ", Nb, ")");
}

template <class Exec>
PyraBwdOutputs pyra_merge_backward_launch(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_out_size_in,
                                          const at::Tensor& x_in, const std::optional<at::Tensor>& size_in,
                                          const at::Tensor& out_in, const at::Tensor& out_size_in,
                                          const at::Tensor& src_in, const at::Tensor& dst_in, const at::Tensor& unm_in,
                                          const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& ln_weight_in,
                                          const at::Tensor& ln_bias_in, double eps, bool distill_token) {
  const char* op = "pyra_merge_backward";
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Na = (N + 1) / 2, Nb = N / 2;
  check_device<Exec>(src_in, op, "src_idx");
  TORCH_CHECK(src_in.dim() == 2, op, ": src_idx must have shape [B, r], got ", src_in.sizes());
  const int64_t r = src_in.size(1);
  TORCH_CHECK(r <= std::min(Na, Nb), op, ": src_idx must have at most min(ceil(N/2), N//2) = ", std::min(Na, Nb),
              " columns, got ", src_in.sizes());
  TORCH_CHECK(!distill_token || Nb == 0 || r < Na, op,
              ": with distill_token, at least one A row must stay unmerged, got r = ", r);
  const at::Tensor src = checked_index<Exec>(src_in, B, r, op, "src_idx");
  const at::Tensor dst = checked_index<Exec>(dst_in, B, r, op, "dst_idx");
  const at::Tensor unm = checked_index<Exec>(unm_in, B, Na - r, op, "unm_idx");
  const at::Tensor grad_out = checked_bnd<Exec>(grad_out_in, op, "grad_out");
  const at::Tensor out = checked_bnd<Exec>(out_in, op, "out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, N - r, C}), op, ": grad_out must have shape [", B, ", ",
              N - r, ", ", C, "], got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({B, N - r, C}), op, ": out must have shape [", B, ", ", N - r, ", ", C,
              "], got ", out.sizes());
  TORCH_CHECK(out_size_in.defined(), op, ": out_size must be a tensor");
  const at::Tensor out_size = checked_size<Exec>(out_size_in, B, N - r, op, "out_size");
  const at::Tensor grad_out_size = checked_size<Exec>(grad_out_size_in, B, N - r, op, "grad_out_size");
  const at::Tensor size = checked_size<Exec>(size_in, B, N, op);
  const at::Tensor a = checked_param<Exec>(a_in, {r, 1}, op, "a");
  const at::Tensor b = checked_param<Exec>(b_in, {1, C}, op, "b");
  const at::Tensor ln_weight = checked_param<Exec>(ln_weight_in, {C}, op, "ln_weight");
  const at::Tensor ln_bias = checked_param<Exec>(ln_bias_in, {C}, op, "ln_bias");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite float, got ", eps);
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&src, "src_idx"}, {&dst, "dst_idx"}, {&unm, "unm_idx"}, {&grad_out, "grad_out"}, {&out, "out"},
      {&out_size, "out_size"}, {&grad_out_size, "grad_out_size"}, {&size, "size"}, {&a, "a"}, {&b, "b"},
      {&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}};
  for (const auto& [t, name] : all) {
    TORCH_CHECK(!t->defined() || t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
                ", got ", t->device());
  }
  check_int32(N * std::max<int64_t>(C, 1), op, "N * C");
  check_pyra_matching(src, dst, unm, Na, Nb, op);

  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty({B, N, C}, x.options());
  at::Tensor grad_size = at::empty({B, N, 1}, fopt);
  at::Tensor part = at::zeros({B, r + 3 * C}, fopt);
  if (B > 0 && N > 0) {
    at::Tensor ws = at::empty({B, 6 * r + 2 * C}, fopt);
    FPET_DISPATCH_KERNEL_TYPES(x.scalar_type(), op, "x", [&] {
      PyraBwdArgs<scalar_t> args{};
      args.x = x.data_ptr<scalar_t>();
      args.size = any_ptr(size, op, "size");
      args.grad_out = any_ptr(grad_out, op, "grad_out");
      args.grad_out_size = any_ptr(grad_out_size, op, "grad_out_size");
      args.out = any_ptr(out, op, "out");
      args.out_size = any_ptr(out_size, op, "out_size");
      args.src_idx = src.data_ptr<int64_t>();
      args.dst_idx = dst.data_ptr<int64_t>();
      args.unm_idx = unm.data_ptr<int64_t>();
      args.a = any_ptr(a, op, "a");
      args.b = any_ptr(b, op, "b");
      args.ln_weight = any_ptr(ln_weight, op, "ln_weight");
      args.ln_bias = any_ptr(ln_bias, op, "ln_bias");
      args.eps = static_cast<float>(eps);
      args.N = static_cast<int>(N);
      args.C = static_cast<int>(C);
      args.r = static_cast<int>(r);
      args.distill_token = distill_token;
      args.ws = ws.data_ptr<float>();
      args.part = part.data_ptr<float>();
      if (r > 0) {
        PyraBwdStatsBody<scalar_t> k1{args};
        Exec::launch(k1, static_cast<int>(B), 1, kPyraBwdScratch * sizeof(float));
      }
      PyraBwdTokensBody<scalar_t> k2{args, grad_x.data_ptr<scalar_t>(), grad_size.data_ptr<float>()};
      const int blocks = static_cast<int>((Na + Nb + kPyraBwdItems - 1) / kPyraBwdItems);
      Exec::launch(k2, static_cast<int>(B), blocks, PyraBwdTokenSmem::make(nullptr, args.r).bytes);
    });
  }
  const at::Tensor total = part.sum(0);
  // copy=true: every output gets its own storage, whatever the parameter dtypes
  return {grad_x,
          total.narrow(0, 0, r).view({r, 1}).to(a_in.scalar_type(), false, true),
          total.narrow(0, r, C).view({1, C}).to(b_in.scalar_type(), false, true),
          total.narrow(0, r + C, C).to(ln_weight_in.scalar_type(), false, true),
          total.narrow(0, r + 2 * C, C).to(ln_bias_in.scalar_type(), false, true),
          grad_size.to(out_size_in.scalar_type())};
}

template <class Exec>
void register_pyra_backward(torch::Library& m) {
  m.impl("pyra_merge_backward", &pyra_merge_backward_launch<Exec>);
}

}  // namespace kernels
}  // namespace fpet
