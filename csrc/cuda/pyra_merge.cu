// CUDA registration of PYRA's forward merge (modulation and launcher: pyra_merge.cuh, on the ToMe
// body of tome_merge.cuh).
#include "device_exec.cuh"
#include "pyra_merge.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_pyra<fpet::kernels::CudaExec>(m); }
