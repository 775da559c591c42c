// CUDA registration of PYRA's per-row merge and its closed-form backward (padded batches, threshold
// merging; kernels and launchers: pyra_merge_rows.cuh).
#include "device_exec.cuh"
#include "pyra_merge_rows.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_pyra_rows<fpet::kernels::CudaExec>(m); }
