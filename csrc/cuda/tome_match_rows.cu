// CUDA registration of ToMe's per-row matching (body and launcher: tome_match_rows.cuh).
#include "device_exec.cuh"
#include "tome_match_rows.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_tome_match_rows<fpet::kernels::CudaExec>(m); }
