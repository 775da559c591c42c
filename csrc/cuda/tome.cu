// CUDA registrations of the ToMe kernels (bodies and launchers: tome_kernels.cuh).
#include "device_exec.cuh"
#include "tome_kernels.cuh"

TORCH_LIBRARY_IMPL(fpet_C, CUDA, m) { fpet::kernels::register_tome<fpet::kernels::CudaExec>(m); }
