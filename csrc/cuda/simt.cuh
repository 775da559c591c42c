// The execution model of the fpet_kernels CUDA kernels, written so that the *same* kernel source
// runs on a GPU (nvcc) and, one thread at a time, on the host (g++): the host build is how the
// kernels are tested on machines without a GPU (csrc/emu/, tests/test_cuda_emulated.py).
//
// A kernel is a functor `Body` with
//     template <class Blk> FPET_HD void operator()(Blk& blk, char* smem, int bx, int by) const;
// run once per thread block (bx, by) of a grid, with `smem` its dynamic shared memory. Its code
// is a sequence of *phases*:
//     blk.each([&](int t) { ... });   // every thread t in [0, blk.size()) runs the lambda once,
//                                     // then the block synchronises (__syncthreads)
// State that lives across phases is in shared or global memory, never in a thread's registers;
// no warp intrinsics. Inside a phase a thread may write only locations that no other thread
// of the block touches in that phase (the host runner checks this by running the threads of
// every phase in forward and in reverse order: a result that depends on the order is a race).
//
//   DeviceBlock   threadIdx.x, __syncthreads()               (csrc/cuda/*.cu)
//   HostBlock     a loop over t in the chosen order           (csrc/emu/*.cpp)
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FPET_HD __host__ __device__ __forceinline__
#define FPET_DEVICE_ONLY __device__ __forceinline__
#else
#define FPET_HD inline
#define FPET_DEVICE_ONLY inline
#endif

namespace fpet {
namespace simt {

// Threads per block of every fpet_kernels CUDA kernel (a multiple of 32).
constexpr int kThreads = 256;

#if defined(__CUDACC__)
struct DeviceBlock {
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};
#endif

// The host runner's block: the threads of a phase one after another, in `order`
// (0 forward, 1 reverse), with `threads` threads per block. `phases` (when set) counts the phases
// the block ran: each one is a __syncthreads on the GPU.
struct HostBlock {
  int threads = kThreads;
  int order = 0;
  int64_t* phases = nullptr;
  int size() const { return threads; }
  template <class F>
  void each(F&& f) {
    if (phases != nullptr) ++*phases;
    if (order == 0) {
      for (int t = 0; t < threads; ++t) f(t);
    } else {
      for (int t = threads - 1; t >= 0; --t) f(t);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Loads and stores of the three kernel dtypes: c10::Half and c10::BFloat16 convert on host and
// device alike (float -> half/bfloat16 rounds to nearest even in both).
// ---------------------------------------------------------------------------------------------
enum class Dtype : int8_t { f32 = 0, f16 = 1, bf16 = 2 };

// A read-only pointer whose dtype is known only at run time (metric, size, gradients whose dtype
// may differ from x): one uniform branch per load, and no conversion kernel before the launch.
struct AnyPtr {
  const void* ptr = nullptr;
  Dtype dtype = Dtype::f32;
  FPET_HD bool defined() const { return ptr != nullptr; }
  // The same tensor from element `elems` on (a null pointer stays null).
  FPET_HD AnyPtr operator+(int64_t elems) const {
    AnyPtr q = *this;
    if (ptr != nullptr) q.ptr = static_cast<const char*>(ptr) + elems * (dtype == Dtype::f32 ? 4 : 2);
    return q;
  }
  // Element i, in float32; 1 when the pointer is null (absent sizes are all ones).
  FPET_HD float operator[](int64_t i) const {
    if (ptr == nullptr) return 1.0f;
    switch (dtype) {
      case Dtype::f16: return static_cast<float>(static_cast<const c10::Half*>(ptr)[i]);
      case Dtype::bf16: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]);
      default: return static_cast<const float*>(ptr)[i];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Scalar math (host and device give the same results for everything but expf, which may differ
// in the last bit; kernels only compare sigmoid(d) against 0.5, or return it as a value).
// ---------------------------------------------------------------------------------------------
FPET_HD float neg_inf() { return -std::numeric_limits<float>::infinity(); }
FPET_HD float pos_inf() { return std::numeric_limits<float>::infinity(); }
FPET_HD bool is_nan(float v) { return v != v; }
// NaN sorts first (as torch.sort(descending=True) and torch.max): a strict weak order.
FPET_HD bool greater(float a, float b) { return (is_nan(a) && !is_nan(b)) || a > b; }
FPET_HD float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
FPET_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Block-level building blocks, each a few phases. `scratch` is shared memory the caller lends.
// ---------------------------------------------------------------------------------------------

// Exclusive prefix sum of v[0..n) in place (n <= blk.size() * 8), Hillis-Steele over the n
// values with `scratch` (2 * n ints) as the ping-pong buffer; total in v[n] (v has n + 1 slots).
template <class Blk>
FPET_HD void exclusive_scan(Blk& blk, int* v, int n, int* scratch) {
  int* src = scratch;
  int* dst = scratch + n;
  const int T = blk.size();
  blk.each([&](int t) {
    for (int i = t; i < n; i += T) src[i] = v[i];
  });
  for (int off = 1; off < n; off *= 2) {
    blk.each([&](int t) {
      for (int i = t; i < n; i += T) dst[i] = i >= off ? src[i] + src[i - off] : src[i];
    });
    int* tmp = src;
    src = dst;
    dst = tmp;
  }
  blk.each([&](int t) {
    for (int i = t; i < n; i += T) v[i + 1] = src[i];
    if (t == 0) v[0] = 0;
  });
}

// out[row] = sum_{col < ncols} f(row, col) for rows [0, nrows), each sum in a fixed order: lane l
// of a 32-thread group sums cols l, l + 32, ... (coalesced loads along a row), then one thread
// adds the 32 partials in lane order. `scratch` holds blk.size() floats. `out` is called as
// out(row, value) in a phase of its own, by one thread per row.
template <class Blk, class F, class Out>
FPET_HD void row_sums(Blk& blk, int nrows, int ncols, float* scratch, F&& f, Out&& out) {
  const int T = blk.size();
  const int groups = T / 32;
  for (int r0 = 0; r0 < nrows; r0 += groups) {
    blk.each([&](int t) {
      const int row = r0 + t / 32, lane = t % 32;
      float acc = 0.f;
      if (row < nrows) {
        for (int c = lane; c < ncols; c += 32) acc += f(row, c);
      }
      scratch[t] = acc;
    });
    blk.each([&](int t) {
      const int row = r0 + t;
      if (t < groups && row < nrows) {
        float acc = 0.f;
        for (int l = 0; l < 32; ++l) acc += scratch[t * 32 + l];
        out(row, acc);
      }
    });
  }
}

// row_sums with as many rows at once as the block holds: L lanes per row (the largest power of two
// <= 32 with L * nrows <= blk.size(), at least 1), lane l summing cols l, l + L, ..., then one
// thread per row adding the L partials in lane order. Two phases for nrows <= blk.size() (PYRA's
// r = 16 rows at 256 threads: 16 lanes each) where row_sums takes two per 8 rows. `scratch` holds
// blk.size() floats.
template <class Blk, class F, class Out>
FPET_HD void row_sums_wide(Blk& blk, int nrows, int ncols, float* scratch, F&& f, Out&& out) {
  const int T = blk.size();
  int L = 32;
  while (L > 1 && L * nrows > T) L /= 2;
  const int per = T / L;  // rows per pass
  for (int r0 = 0; r0 < nrows; r0 += per) {
    blk.each([&](int t) {
      const int row = r0 + t / L, lane = t % L;
      float acc = 0.f;
      if (row < nrows) {
        for (int c = lane; c < ncols; c += L) acc += f(row, c);
      }
      scratch[t] = acc;
    });
    blk.each([&](int t) {
      const int row = r0 + t;
      if (t < per && row < nrows) {
        float acc = 0.f;
        for (int l = 0; l < L; ++l) acc += scratch[t * L + l];
        out(row, acc);
      }
    });
  }
}

}  // namespace simt
}  // namespace fpet
