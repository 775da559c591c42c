// CUDA registrations of ToMe and PYRA: one kernel body (tome_kernels.cuh; PYRA's launcher in
// pyra_kernels.cuh), compiled once.
#include "device_exec.cuh"
#include "pyra_kernels.cuh"
#include "tome_kernels.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) {
  fpet::kernels::register_tome<fpet::kernels::CudaExec>(m);
  fpet::kernels::register_pyra<fpet::kernels::CudaExec>(m);
}
