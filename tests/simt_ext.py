"""The test-only extension ``fpet_simt``: the CUDA kernels' source (csrc/cuda/*.cuh) compiled
for the host by g++ and run one thread at a time (csrc/emu/), as ``torch.ops.fpet_simt.*`` with the
schemas of ``torch.ops.fpet.*``. It is not part of the package: the tests build it on first use
(ninja, cached under build/simt; about a minute on two cores) and CI builds it that way.

The library registers implementations only: :func:`define_schemas` defines the schema of every op
with CUDA kernels from its record (``fpet_kernels.ops.library.OPS``) before the library is loaded,
so the op list and the schemas are written once, in Python."""
from __future__ import annotations

import glob
import os

import torch

from fpet_kernels.ops import library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "simt")
_STATE: dict = {}


NAMESPACE = "fpet_simt"
OWN_OPS = ("configure", "phase_count", "trust_maps")  # the emulator's own ops (csrc/emu/emulate.cpp)


def emulated_ops() -> list:
    """The records of the ops the emulator runs: every op with CUDA kernels (``Op.cuda``)."""
    return [op for op in library.OPS.values() if op.cpp and op.cuda]


def define_schemas() -> None:
    """Define ``fpet_simt::<name>`` with the record's schema for every op of :func:`emulated_ops`
    (once per process; the library loaded afterwards registers their implementations)."""
    if _STATE.get("schemas"):
        return
    for op in emulated_ops():
        torch.library.define(f"{NAMESPACE}::{op.name}", op.schema)
    _STATE["schemas"] = True


def implemented_ops() -> list:
    """The names of the ops the loaded emulator implements (a CPU kernel in ``fpet_simt``), its own
    ops excluded."""
    prefix = NAMESPACE + "::"
    regs = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    return sorted(name[len(prefix):] for name in regs
                  if name.startswith(prefix) and name[len(prefix):] not in OWN_OPS)


def load() -> str | None:
    """Build (once) and load the emulator; returns None, or why it is not available."""
    if "error" in _STATE:
        return _STATE["error"]
    err = None
    try:
        from torch.utils import cpp_extension
        define_schemas()
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
