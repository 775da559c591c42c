// The schemas of the C++ kernels (contracts in csrc/README.md) for the test-only emulator library
// `fpet_simt`: the same as the Python definitions of `torch.ops.fpet.*` (tests/test_registration.py checks it).
#pragma once

#include <torch/library.h>

namespace fpet {

inline void define_kernel_schemas(torch::Library& m) {
  // ToMe (tome.cpp)
  m.def("tome_match(Tensor metric, int r, bool class_token, bool distill_token) -> "
        "(Tensor src_idx, Tensor dst_idx, Tensor unm_idx, Tensor token_map)");
  m.def("tome_merge(Tensor x, Tensor metric, int r, Tensor? size, bool class_token, bool distill_token) -> "
        "(Tensor out, Tensor out_size, Tensor src_idx, Tensor dst_idx, Tensor unm_idx, Tensor token_map)");
  m.def("merge_wavg(Tensor x, Tensor? size, Tensor token_map, int n_out) -> (Tensor out, Tensor out_size)");
  m.def("merge_wavg_backward(Tensor grad_out, Tensor? size, Tensor out_size, Tensor token_map) -> Tensor");
  m.def("unmerge(Tensor y, Tensor token_map) -> Tensor");
  m.def("merge_sum(Tensor x, Tensor token_map, int n_out) -> Tensor");
  // FPET (fpet.cpp)
  m.def("fpet_merge(Tensor x, Tensor metric, Tensor? size, int num_prefix, int H, int W) -> "
        "(Tensor out, Tensor out_size, Tensor token_map)");
  m.def("fpet_merge_backward(Tensor grad_out, Tensor? grad_size, Tensor x, Tensor metric, Tensor? size, "
        "Tensor out, Tensor out_size, Tensor token_map, int num_prefix, int H, int W) -> "
        "(Tensor grad_x, Tensor grad_metric, Tensor grad_size)");
  // PYRA (pyra.cpp)
  m.def("pyra_merge(Tensor x, Tensor metric, int r, Tensor a, Tensor b, Tensor ln_weight, Tensor ln_bias, "
        "Tensor? size, bool class_token, bool distill_token, float eps) -> "
        "(Tensor out, Tensor out_size, Tensor src_idx, Tensor dst_idx, Tensor unm_idx, Tensor token_map)");
}

}  // namespace fpet
