// CUDA registrations of ToMe's matching and merge (body and launchers: tome_merge.cuh).
#include "device_exec.cuh"
#include "tome_merge.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_tome<fpet::kernels::CudaExec>(m); }
