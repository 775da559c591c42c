// HostExec: runs the CUDA kernel bodies of csrc/cuda/*.cuh on the host, one thread at a
// time (simt.cuh), on CPU tensors. It exists to test the CUDA kernels' own source on machines
// without a GPU (tests/test_cuda_emulated.py): indexing, phases, tiling, dtype handling and the
// block-level algorithms. It does not test what only hardware shows (timing, real concurrency
// inside a phase, the device's math library); those are the GPU tests' job.
//
// Knobs (set through torch.ops.fpet_simt.configure): the order of the threads within a phase and
// of the blocks within the grid (forward or reverse: a result that changes with the order is a
// race), the threads per block, the multiprocessor count the grid sizing sees, and the shared
// memory per block the launchers may plan for (an H100's 227 KiB by default; less makes the
// matching stage its rows in panels). Shared memory starts filled with 0xFF bytes (NaN floats, -1
// ints) so that reads of unwritten memory show.
//
// Phase count: every launch records the phases (block-wide barriers, blk.each) of each block;
// torch.ops.fpet_simt.phase_count() returns [most phases of one block, blocks] of the last launch.
#pragma once

#include <algorithm>
#include <vector>

#include "../cuda/launch.h"

namespace fpet {
namespace kernels {

struct HostConfig {
  int order = 0;       // 0: threads and blocks in forward order, 1: in reverse order
  int threads = simt::kThreads;
  int sms = 4;         // the multiprocessor count that grid sizing sees
  int64_t smem = kHopperSmem;  // shared memory per block (bytes) the launchers plan for
  static constexpr int64_t kHopperSmem = 227 * 1024;
};

inline HostConfig& host_config() {
  static HostConfig cfg;
  return cfg;
}

// Phases of the last launch: the most of one block, and the blocks.
struct PhaseCount {
  int64_t max_per_block = 0;
  int64_t blocks = 0;
};

inline PhaseCount& last_phase_count() {
  static PhaseCount count;
  return count;
}

struct HostExec {
  static constexpr const char* kDevice = "CPU";
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
  static int num_sms(const at::Tensor&) { return host_config().sms; }
  static size_t smem_limit(const at::Tensor&) { return static_cast<size_t>(host_config().smem); }
  template <class Body>
  static void launch(const Body& body, int gx, int gy, size_t smem) {
    const HostConfig cfg = host_config();
    TORCH_CHECK(smem <= static_cast<size_t>(cfg.smem), "fpet_kernels: this shape needs ", smem,
                " bytes of shared memory per block, more than the emulated ", cfg.smem);
    std::vector<char> buf(smem + 16);
    char* base = buf.data() + ((16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16);
    int64_t phases = 0;
    simt::HostBlock blk{cfg.threads, cfg.order, &phases};
    const int64_t blocks = int64_t(gx) * gy;
    PhaseCount count{0, blocks};
    for (int64_t e = 0; e < blocks; ++e) {
      const int64_t id = cfg.order == 0 ? e : blocks - 1 - e;
      std::fill(buf.begin(), buf.end(), static_cast<char>(0xFF));
      phases = 0;
      body(blk, base, static_cast<int>(id % gx), static_cast<int>(id / gx));
      count.max_per_block = std::max(count.max_per_block, phases);
    }
    last_phase_count() = count;
  }
};

}  // namespace kernels
}  // namespace fpet
