// Which compiled code this extension has for a CUDA device: the `cuda` backend counts as live on a
// device only when its kernels can run there (a build for 9.0 alone has no image an A100 can load).
#include <cuda_runtime.h>

namespace {
// Compiled with the same -gencode flags as every other kernel of the extension.
__global__ void fpet_probe_kernel() {}
}  // namespace

namespace fpet {
// The binary version (e.g. 90) of the image the driver would run on `device`, or -1 when there is
// none (cudaErrorNoKernelImageForDevice / InvalidDeviceFunction) or the device cannot be queried.
int cuda_image_version(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) { cudaGetLastError(); return -1; }
  if (cudaSetDevice(device) != cudaSuccess) { cudaGetLastError(); return -1; }
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, fpet_probe_kernel);
  cudaGetLastError();  // clear a sticky-free error so later CUDA calls are unaffected
  cudaSetDevice(prev);
  return err == cudaSuccess ? attr.binaryVersion : -1;
}
}  // namespace fpet
