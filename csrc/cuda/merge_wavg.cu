// CUDA registrations of the token-map merges (bodies and launchers: merge_wavg.cuh).
#include "device_exec.cuh"
#include "merge_wavg.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_merges<fpet::kernels::CudaExec>(m); }
