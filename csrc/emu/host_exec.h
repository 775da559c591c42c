// HostExec: runs the CUDA kernel bodies of csrc/cuda/*_kernels.cuh on the host, one thread at a
// time (simt.cuh), on CPU tensors. It exists to test the CUDA kernels' own source on machines
// without a GPU (tests/test_cuda_emulated.py): indexing, phases, tiling, dtype handling and the
// block-level algorithms. It does not test what only hardware shows (timing, real concurrency
// inside a phase, the device's math library); those are the GPU tests' job.
//
// Knobs (set through torch.ops.fpet_simt.configure): the order of the threads within a phase and
// of the blocks within the grid (forward or reverse: a result that changes with the order is a
// race), the threads per block, and the multiprocessor count the grid sizing sees. Shared memory
// starts filled with 0xFF bytes (NaN floats, -1 ints) so that reads of unwritten memory show.
#pragma once

#include <vector>

#include "../cuda/launch.h"

namespace fpet {
namespace kernels {

struct HostConfig {
  int order = 0;       // 0: threads and blocks in forward order, 1: in reverse order
  int threads = simt::kThreads;
  int sms = 4;         // the multiprocessor count that grid sizing sees
};

inline HostConfig& host_config() {
  static HostConfig cfg;
  return cfg;
}

struct HostExec {
  static constexpr const char* kDevice = "CPU";
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
  static int num_sms(const at::Tensor&) { return host_config().sms; }
  template <class Body>
  static void launch(const Body& body, int gx, int gy, size_t smem) {
    const HostConfig cfg = host_config();
    std::vector<char> buf(smem + 16);
    char* base = buf.data() + ((16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16);
    simt::HostBlock blk{cfg.threads, cfg.order};
    const int64_t blocks = int64_t(gx) * gy;
    for (int64_t e = 0; e < blocks; ++e) {
      const int64_t id = cfg.order == 0 ? e : blocks - 1 - e;
      std::fill(buf.begin(), buf.end(), static_cast<char>(0xFF));
      body(blk, base, static_cast<int>(id % gx), static_cast<int>(id / gx));
    }
  }
};

}  // namespace kernels
}  // namespace fpet
