// CudaExec: runs a kernel body (simt.cuh) as a __global__ kernel on the current CUDA stream.
// Included by the .cu files only.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "launch.h"

namespace fpet {
namespace kernels {

template <class Body>
__global__ void __launch_bounds__(simt::kThreads) body_kernel(const Body body) {
  extern __shared__ __align__(16) char smem[];
  simt::DeviceBlock blk;
  body(blk, smem, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y));
}

struct CudaExec {
  static constexpr const char* kDevice = "CUDA";
  using Guard = c10::cuda::OptionalCUDAGuard;  // launchers guard the device of their inputs
  static bool on_device(const at::Tensor& t) { return t.is_cuda(); }
  static int num_sms(const at::Tensor& t) {
    return at::cuda::getDeviceProperties(t.get_device())->multiProcessorCount;
  }
  // Shared memory one block may use (with the opt-in): what the launchers plan their staging for.
  static size_t smem_limit(const at::Tensor& t) {
    return at::cuda::getDeviceProperties(t.get_device())->sharedMemPerBlockOptin;
  }
  template <class Body>
  static void launch(const Body& body, int gx, int gy, size_t smem) {
    if (gx == 0 || gy == 0) return;
    auto kernel = body_kernel<Body>;
    if (smem > 48 * 1024) {
      int dev = 0, optin = 0;
      C10_CUDA_CHECK(cudaGetDevice(&dev));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      TORCH_CHECK(smem <= static_cast<size_t>(optin), "fpet_kernels: this shape needs ", smem,
                  " bytes of shared memory per block, more than the GPU's ", optin,
                  " (fewer tokens N or a smaller metric dimension D fit)");
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<dim3(gx, gy), simt::kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(body);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace kernels
}  // namespace fpet
