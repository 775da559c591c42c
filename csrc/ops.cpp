// The one TORCH_LIBRARY block of fpet_kernels: the schemas of every raw kernel (contracts in
// csrc/README.md). Implementations register with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and
// csrc/cuda/*.cu. The kernels are raw: no autograd, no fake kernels, no argument defaults.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fpet_C, m) {
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

// `import fpet_kernels._C` loads this library, which runs the registrations above; the Python
// module itself is empty (the ops live in torch.ops.fpet_C).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
