// Index tensors an op's forward produced (or checked, when the user gave them) are trusted by its
// backward: the autograd formulas of the registered ops (fpet_kernels/ops/library.py) switch this
// state of the calling thread on around the backward's kernel calls, through
// `fpet_kernels._C._trust_maps(bool) -> previous` (csrc/ops.cpp). The CUDA launchers then skip the
// data checks of token maps and of PYRA's matching (csrc/cuda/launch.h `check_map_range`,
// `check_pyra_matching`), which cost a device-to-host sync each: a training step queues its work
// without waiting on the GPU. Never an argument: a direct call of `torch.ops.fpet.*` is checked.
#pragma once

namespace fpet {

inline bool& trusted_maps() {
  static thread_local bool on = false;
  return on;
}

}  // namespace fpet
