// CUDA registrations of the FPET merge and its backward (bodies and launchers: fpet_merge.cuh).
#include "device_exec.cuh"
#include "fpet_merge.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_fpet<fpet::kernels::CudaExec>(m); }
