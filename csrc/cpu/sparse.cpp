// Masked (sampled dense-dense) weight gradient on CPU: the CPU kernel of fpet::masked_weight_grad,
// whose schema, fake kernel and autograd live in fpet_kernels/ops/sparse.py.
//
//   grad[k] = sum_m grad_out[m, rows[k]] * input[m, cols[k]]      (k = 0 .. K-1)
//
// i.e. the weight gradient of y = x W^T evaluated only at the K masked positions of W, never the
// dense [out, in] matrix. grad_out [M, out] and input [M, in] are transposed once into float32
// (float64 for float64 inputs) row-major [out, M] / [in, M] buffers, so every entry is one contiguous
// dot product of length M. The sum over m runs in ascending order for every entry: the result does
// not depend on the thread count.
#include <torch/library.h>

#include "common.h"

namespace fpet {
namespace {

template <typename acc_t>
void masked_dots(const acc_t* gT, const acc_t* xT, const int64_t* rows, const int64_t* cols, int64_t K,
                 int64_t M, acc_t* out) {
  at::parallel_for(0, K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* a = gT + rows[k] * M;
      const acc_t* b = xT + cols[k] * M;
      // four independent partial sums (vectorisable), combined in a fixed order
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        s0 += a[m] * b[m];
        s1 += a[m + 1] * b[m + 1];
        s2 += a[m + 2] * b[m + 2];
        s3 += a[m + 3] * b[m + 3];
      }
      for (; m < M; ++m) s0 += a[m] * b[m];
      out[k] = (s0 + s1) + (s2 + s3);
    }
  });
}

at::Tensor masked_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& rows,
                                  const at::Tensor& cols) {
  CHECK_CPU(grad_out);
  CHECK_CPU(input);
  CHECK_CPU(rows);
  CHECK_CPU(cols);
  CHECK_DIM(grad_out, 2);
  CHECK_DIM(input, 2);
  CHECK_DIM(rows, 1);
  CHECK_DIM(cols, 1);
  CHECK_FLOATING(grad_out);
  CHECK_FLOATING(input);
  CHECK_INDEX(rows);
  CHECK_INDEX(cols);
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "grad_out (", grad_out.scalar_type(),
              ") and input (", input.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(grad_out.size(0) == input.size(0), "grad_out [M, out] and input [M, in] must have the same M, got ",
              grad_out.sizes(), " and ", input.sizes());
  TORCH_CHECK(rows.size(0) == cols.size(0), "rows and cols must have the same length, got ", rows.size(0), " and ",
              cols.size(0));
  const int64_t M = grad_out.size(0), n_out = grad_out.size(1), n_in = input.size(1), K = rows.size(0);
  const at::Tensor r = rows.contiguous(), c = cols.contiguous();
  if (K > 0) {
    const auto r_min = r.min().item<int64_t>(), r_max = r.max().item<int64_t>();
    const auto c_min = c.min().item<int64_t>(), c_max = c.max().item<int64_t>();
    TORCH_CHECK(r_min >= 0 && r_max < n_out, "rows must index grad_out's ", n_out, " columns, got values in [",
                r_min, ", ", r_max, "]");
    TORCH_CHECK(c_min >= 0 && c_max < n_in, "cols must index input's ", n_in, " columns, got values in [", c_min,
                ", ", c_max, "]");
  }
  const bool f64 = grad_out.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({K}, grad_out.options().dtype(acc));
  if (K == 0) return out.to(grad_out.scalar_type());
  if (M == 0) return out.zero_().to(grad_out.scalar_type());
  const at::Tensor gT = grad_out.to(acc).t().contiguous();  // [out, M]
  const at::Tensor xT = input.to(acc).t().contiguous();     // [in, M]
  if (f64) {
    masked_dots<double>(gT.data_ptr<double>(), xT.data_ptr<double>(), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(),
                        K, M, out.data_ptr<double>());
  } else {
    masked_dots<float>(gT.data_ptr<float>(), xT.data_ptr<float>(), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), K,
                       M, out.data_ptr<float>());
  }
  return out.to(grad_out.scalar_type());
}

}  // namespace
}  // namespace fpet

TORCH_LIBRARY_IMPL(fpet, CPU, m) { m.impl("masked_weight_grad", &fpet::masked_weight_grad_cpu); }
