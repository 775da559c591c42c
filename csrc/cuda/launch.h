// Host side of the CUDA kernels: argument checks, dtype switches, output allocation. Every
// launcher is a template over an executor `Exec` that runs a kernel body on a grid:
//   CudaExec (csrc/cuda/device_exec.cuh)  a __global__ launch on the current stream
//   HostExec (csrc/emu/host_exec.h)       the same body on the host, one thread at a time
// so the launchers in csrc/cuda/<op>.cuh are written once for both.
//
// Executor interface:
//   static constexpr const char* kDevice;              "CUDA" or "CPU" (tensors it accepts)
//   using Guard = ...;                                   Guard g(device): the device of a launch
//   static bool on_device(const at::Tensor&);
//   static int num_sms(const at::Tensor&);              multiprocessors (grid sizing)
//   static size_t smem_limit(const at::Tensor&);       shared memory per block (staging plans)
//   template <class Body> static void launch(const Body&, int gx, int gy, size_t smem_bytes);
#pragma once

#include <ATen/ATen.h>

#include <optional>

#if defined(__CUDACC__)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include "../trusted_maps.h"
#include "simt.cuh"

namespace fpet {
namespace kernels {

using simt::AnyPtr;
using simt::Dtype;

// A static switch over the three kernel dtypes of x: `scalar_t` is float, c10::Half or
// c10::BFloat16 inside the lambda body.
#define FPET_DISPATCH_KERNEL_TYPES(ST, NAME, ARG, ...)                                                 \
  [&] {                                                                                                \
    switch (ST) {                                                                                      \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                               \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                            \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }                    \
      default:                                                                                         \
        TORCH_CHECK(false, NAME, ": ", ARG, " must be float32, float16 or bfloat16, got ", ST);     \
    }                                                                                                  \
  }()

inline Dtype kernel_dtype(at::ScalarType st, const char* op, const char* name) {
  switch (st) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", st);
  }
  return Dtype::f32;
}

template <class Exec>
void check_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(Exec::on_device(t), op, ": ", name, " must be a ", Exec::kDevice, " tensor, got ", t.device());
}

// A floating [B, N, D] tensor on the executor's device, made contiguous.
template <class Exec>
at::Tensor checked_bnd(const at::Tensor& t, const char* op, const char* name) {
  check_device<Exec>(t, op, name);
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have 3 dimensions [B, N, C], got shape ", t.sizes());
  kernel_dtype(t.scalar_type(), op, name);
  return t.contiguous();
}

// The contiguous tensor behind an AnyPtr must outlive the launch: callers keep `holder`.
inline AnyPtr any_ptr(const at::Tensor& t, const char* op, const char* name) {
  AnyPtr p;
  if (!t.defined()) return p;
  p.ptr = t.data_ptr();
  p.dtype = kernel_dtype(t.scalar_type(), op, name);
  return p;
}

// Optional sizes [B, N, 1], any kernel dtype; undefined when absent (all ones).
template <class Exec>
at::Tensor checked_size(const std::optional<at::Tensor>& size, int64_t B, int64_t N, const char* op,
                        const char* name = "size") {
  if (!size.has_value() || !size->defined()) return at::Tensor();
  const at::Tensor& s = *size;
  check_device<Exec>(s, op, name);
  TORCH_CHECK(s.dim() == 3 && s.size(0) == B && s.size(1) == N && s.size(2) == 1, op, ": ", name,
              " must have shape [", B, ", ", N, ", 1], got ", s.sizes());
  kernel_dtype(s.scalar_type(), op, name);
  return s.contiguous();
}

// An int64 token map [B, N] on the executor's device.
template <class Exec>
at::Tensor checked_map(const at::Tensor& map, int64_t B, int64_t N, const char* op, const char* name = "token_map") {
  check_device<Exec>(map, op, name);
  TORCH_CHECK(map.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", map.scalar_type());
  TORCH_CHECK(map.dim() == 2 && map.size(0) == B && map.size(1) == N, op, ": ", name, " must have shape [", B, ", ",
              N, "], got ", map.sizes());
  return map.contiguous();
}

// Token-map entries must be in [-1, n_out): checked on the host before the launch (one device
// sync). Skipped for a map the forward produced or checked (inside a backward: trusted_maps.h),
// and while a CUDA graph is being captured (no sync is possible); the kernels skip out-of-range
// entries (they never index memory with them), so nothing is read or written out of bounds either way.
inline void check_map_range(const at::Tensor& map, int64_t n_out, const char* op, const char* name = "token_map") {
  if (map.numel() == 0 || trusted_maps()) return;
#if defined(__CUDACC__)
  if (map.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
#endif
  const auto mm = at::aminmax(map);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < n_out, op, ": ", name, " entries must be in [-1, ", n_out, "), got entries in [", lo,
              ", ", hi, "]");
}

// Kernel index arithmetic is 32-bit within an image; the image offset is 64-bit.
inline void check_int32(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v < (int64_t{1} << 31), op, ": ", what, " = ", v, " is too large for the CUDA kernels");
}

// Channel split: one block per image when there are enough images to fill the GPU; otherwise the
// channels of an image are split over `split` blocks (each recomputes the matching, which is
// cheap, and merges its channel slice), aiming at about two blocks per multiprocessor. Slices are
// multiples of 32 channels.
inline int channel_split(int64_t B, int64_t C, int sms) {
  if (B >= sms) return 1;
  const int64_t want = (2 * int64_t(sms) + B - 1) / B;
  const int64_t most = std::max<int64_t>(1, (C + 31) / 32);
  return static_cast<int>(std::min<int64_t>(std::min<int64_t>(want, most), 65535));
}

inline int64_t slice_width(int64_t C, int split) { return ((C + split - 1) / split + 31) / 32 * 32; }

// The channel slices of one image: `width` channels per block (at least 32) and `blocks` blocks
// along the channels (at least 1, so that C == 0 still runs the per-token part of a kernel).
struct ChannelSlices {
  int64_t width;
  int blocks;
};
inline ChannelSlices channel_slices(int64_t B, int64_t C, int sms) {
  const int64_t width = std::max<int64_t>(slice_width(C, channel_split(B, C, sms)), 32);
  return {width, C > 0 ? static_cast<int>((C + width - 1) / width) : 1};
}

}  // namespace kernels
}  // namespace fpet
