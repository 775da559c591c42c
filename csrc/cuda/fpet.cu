// CUDA registrations of the FPET kernels (bodies and launchers: fpet_kernels.cuh).
#include "device_exec.cuh"
#include "fpet_kernels.cuh"

TORCH_LIBRARY_IMPL(fpet, CUDA, m) { fpet::kernels::register_fpet<fpet::kernels::CudaExec>(m); }
