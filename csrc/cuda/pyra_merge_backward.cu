// CUDA registration of PYRA's backward (bodies and launcher: pyra_merge_backward.cuh).
#include "device_exec.cuh"
#include "pyra_merge_backward.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_pyra_backward<fpet::kernels::CudaExec>(m); }
