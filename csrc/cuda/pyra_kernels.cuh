// PYRA's modulated merge: the ToMe body of tome_kernels.cuh with its PYRA modulation switched on
// (PyraParams, TomeBody::pyra_weights). Contract: csrc/README.md (pyra_merge). This file holds the
// launcher: the checks of the PYRA parameters, then tome_launch.
#pragma once

#include <torch/library.h>

#include "tome_kernels.cuh"

namespace fpet {
namespace kernels {

// A PYRA parameter of an exact shape, on the executor's device, in a kernel dtype, contiguous.
template <class Exec>
at::Tensor checked_param(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  check_device<Exec>(t, op, name);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  kernel_dtype(t.scalar_type(), op, name);
  return t.contiguous();
}

template <class Exec>
TomeOutputs pyra_merge(const at::Tensor& x_in, const at::Tensor& metric, int64_t r, const at::Tensor& a_in,
                       const at::Tensor& b_in, const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in,
                       const std::optional<at::Tensor>& size, bool class_token, bool distill_token, double eps) {
  const char* op = "pyra_merge";
  const typename Exec::Guard guard(x_in.device());
  const at::Tensor x = checked_bnd<Exec>(x_in, op, "x");
  const int64_t N = x.size(1), C = x.size(2);
  checked_tome_r(r, N, class_token, distill_token, op);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ", eps);
  // The contiguous parameters live until the launch has returned (PyraParams holds raw pointers).
  const at::Tensor a = checked_param<Exec>(a_in, {r, 1}, op, "a");
  const at::Tensor b = checked_param<Exec>(b_in, {1, C}, op, "b");
  const at::Tensor ln_weight = checked_param<Exec>(ln_weight_in, {C}, op, "ln_weight");
  const at::Tensor ln_bias = checked_param<Exec>(ln_bias_in, {C}, op, "ln_bias");
  PyraParams pyra;
  if (r > 0) {  // r == 0: the identity, as tome_merge (no modulation, `a` is empty)
    pyra.a = any_ptr(a, op, "a");
    pyra.b = any_ptr(b, op, "b");
    pyra.ln_weight = any_ptr(ln_weight, op, "ln_weight");
    pyra.ln_bias = any_ptr(ln_bias, op, "ln_bias");
    pyra.eps = static_cast<float>(eps);
  }
  return tome_launch<Exec>(op, x, metric, r, size, class_token, distill_token, pyra);
}

template <class Exec>
void register_pyra(torch::Library& m) {
  m.impl("pyra_merge", &pyra_merge<Exec>);
}

}  // namespace kernels
}  // namespace fpet
