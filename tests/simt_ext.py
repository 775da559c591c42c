"""The test-only extension ``fpet_simt``: the CUDA kernels' source (csrc/cuda/*_kernels.cuh) compiled
for the host by g++ and run one thread at a time (csrc/emu/), as ``torch.ops.fpet_simt.*`` with the
schemas of ``torch.ops.fpet.*``. It is not part of the package: the tests build it on first use
(ninja, cached under build/simt; about a minute on two cores) and CI builds it that way."""
from __future__ import annotations

import glob
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "simt")
_STATE: dict = {}


def load() -> str | None:
    """Build (once) and load the emulator; returns None, or why it is not available."""
    if "error" in _STATE:
        return _STATE["error"]
    err = None
    try:
        from torch.utils import cpp_extension
        os.makedirs(BUILD_DIR, exist_ok=True)
        cpp_extension.load(
            name="fpet_simt", sources=sorted(glob.glob(os.path.join(ROOT, "csrc", "emu", "*.cpp"))),
            extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2", "-std=c++20"],
            build_directory=BUILD_DIR, is_python_module=False, verbose=False)
    except Exception as exc:  # a missing compiler or a build error: reported by the fixture
        err = f"the host build of the CUDA kernels (tests/simt_ext.py) failed: {type(exc).__name__}: {exc}"
    _STATE["error"] = err
    return err


def live() -> bool:
    return load() is None and bool(torch._C._dispatch_has_kernel_for_dispatch_key("fpet_simt::tome_merge", "CPU"))
