// The library `fpet_simt`: the CUDA kernels of csrc/cuda/ compiled for the host and run one
// thread at a time (host_exec.h) on CPU tensors, with the schemas of `fpet`. Used by
// tests/test_simt_*.py to check the CUDA kernels' source on machines without a GPU.
//
// This file registers implementations only (and the emulator's own three ops): the schemas of the
// kernel ops are defined from Python before it is loaded (tests/simt_ext.py), from the op records
// (`fpet_kernels.ops.library.OPS`) that define `torch.ops.fpet.*`.
#include <torch/library.h>

#include "../cuda/fpet_merge.cuh"
#include "../cuda/merge_wavg.cuh"
#include "../cuda/pyra_merge.cuh"
#include "../cuda/pyra_merge_backward.cuh"
#include "../cuda/pyra_merge_rows.cuh"
#include "../cuda/tome_match_rows.cuh"
#include "../cuda/tome_merge.cuh"
#include "host_exec.h"

namespace fpet {
namespace kernels {
namespace {

// Thread order (0 forward, 1 reverse), threads per block (a multiple of 32), multiprocessors seen
// by the grid sizing, shared memory per block in bytes. Returns nothing; the settings hold for the
// process.
void configure(int64_t order, int64_t threads, int64_t sms, int64_t smem) {
  TORCH_CHECK(order == 0 || order == 1, "configure: order must be 0 or 1, got ", order);
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0,
              "configure: threads must be a multiple of 32 in [32, 1024], got ", threads);
  TORCH_CHECK(sms >= 1, "configure: sms must be >= 1, got ", sms);
  TORCH_CHECK(smem >= 1024, "configure: smem must be >= 1024 bytes, got ", smem);
  host_config() = HostConfig{static_cast<int>(order), static_cast<int>(threads), static_cast<int>(sms), smem};
}

// [most phases (block-wide barriers) of one block, blocks] of the last kernel launch.
std::vector<int64_t> phase_count() {
  const PhaseCount& c = last_phase_count();
  return {c.max_per_block, c.blocks};
}

// The trusted-maps state of this thread (csrc/trusted_maps.h; the package sets it with
// fpet_kernels._C._trust_maps inside a backward): set it, return the previous one.
bool trust_maps(bool on) {
  const bool prev = trusted_maps();
  trusted_maps() = on;
  return prev;
}

}  // namespace
}  // namespace kernels
}  // namespace fpet

TORCH_LIBRARY(fpet_simt, m) {
  m.def("configure(int order, int threads, int sms, int smem=232448) -> ()", &fpet::kernels::configure);
  m.def("phase_count() -> int[]", &fpet::kernels::phase_count);
  m.def("trust_maps(bool on) -> bool", &fpet::kernels::trust_maps);
}

TORCH_LIBRARY_IMPL(fpet_simt, CPU, m) {
  fpet::kernels::register_tome<fpet::kernels::HostExec>(m);
  fpet::kernels::register_tome_match_rows<fpet::kernels::HostExec>(m);
  fpet::kernels::register_merges<fpet::kernels::HostExec>(m);
  fpet::kernels::register_pyra<fpet::kernels::HostExec>(m);
  fpet::kernels::register_pyra_backward<fpet::kernels::HostExec>(m);
  fpet::kernels::register_pyra_rows<fpet::kernels::HostExec>(m);
  fpet::kernels::register_fpet<fpet::kernels::HostExec>(m);
}
