// The Python module `fpet_kernels._C`. Loading it registers the C++ kernels as the CPU
// (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) implementations of the public ops `torch.ops.fpet.*`
// with TORCH_LIBRARY_IMPL. The schemas, fake kernels and autograd of those ops are defined in
// Python next to their reference (fpet_kernels/ops/<family>.py), which imports this module only
// after defining them. The module itself holds two introspection functions and the switch of
// trusted index tensors (csrc/trusted_maps.h).
#include <Python.h>
#include <torch/version.h>

#include "trusted_maps.h"

#ifdef FPET_WITH_CUDA
namespace fpet {
int cuda_image_version(int device);  // csrc/cuda/probe.cu
}
#endif

namespace {

// _C.cuda_image_version(device) -> int: see csrc/cuda/probe.cu (-1 without CUDA kernels).
PyObject* py_cuda_image_version(PyObject*, PyObject* arg) {
  long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
#ifdef FPET_WITH_CUDA
  return PyLong_FromLong(fpet::cuda_image_version(static_cast<int>(device)));
#else
  return PyLong_FromLong(-1);
#endif
}

// _C._trust_maps(on: bool) -> bool: set this thread's trusted-maps state, return the previous one.
PyObject* py_trust_maps(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool prev = fpet::trusted_maps();
  fpet::trusted_maps() = on != 0;
  return PyBool_FromLong(prev);
}

PyMethodDef methods[] = {
    {"cuda_image_version", py_cuda_image_version, METH_O,
     "Binary version of this extension's CUDA code for a device (-1: none can run there)."},
    {"_trust_maps", py_trust_maps, METH_O,
     "Internal: skip the CUDA launchers' data checks of index tensors in this thread (the backward of an op)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  // The torch this extension was compiled against (the C++ ABI must match the torch loaded).
  PyModule_AddObject(mod, "TORCH_VERSION", PyUnicode_FromFormat("%d.%d.%d", TORCH_VERSION_MAJOR,
                                                               TORCH_VERSION_MINOR, TORCH_VERSION_PATCH));
#ifdef FPET_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
