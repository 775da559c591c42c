// The TORCH_LIBRARY block of fpet_kernels: the schemas of every raw kernel (csrc/schemas.h,
// contracts in csrc/README.md). Implementations register with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and
// csrc/cuda/*.cu. The kernels are raw: no autograd, no fake kernels, no argument defaults.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(fpet_C, m) { fpet::define_kernel_schemas(m); }

// `import fpet_kernels._C` loads this library, which runs the registrations above; the Python
// module itself is empty (the ops live in torch.ops.fpet_C).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
