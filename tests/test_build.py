"""The build: when the extension was compiled with CUDA, fpet_kernels/_C*.so carries device code (SASS)
for sm_80, 86, 89 and 90 and PTX (what newer GPUs JIT-compile); no GPU is needed. Under FPET_REQUIRE_EXTENSION=1 (CI)
with a CUDA toolkit visible and a CUDA build of torch, CUDA kernels missing from the extension FAIL.

The device code is listed with the ``cuobjdump`` that ships with Triton
(``<triton>/backends/nvidia/bin/cuobjdump``) or the toolkit's; without either, the ``.nv_fatbin``
section of the shared object is parsed directly (the fatbin container and entry headers).
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest
import torch

import fpet_kernels as fk

from helpers import REQUIRE_EXTENSION

# The architectures a default build (TORCH_CUDA_ARCH_LIST unset, no GPU visible) must carry as cubins:
# setup.py's DEFAULT_ARCHS "8.0;8.6;8.9;9.0+PTX" (A100, A10/RTX 30xx, L4/RTX 40xx, H100/H200), + PTX.
SMS = (80, 86, 89, 90)


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extension_path():
    if not fk.backends()["extension"]:
        return None
    import fpet_kernels._C as ext
    return ext.__file__


def _cuda_in_extension() -> bool:
    return bool(fk.backends()["extension"]) and bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("fpet::tome_merge", "CUDA"))


def _nvcc():
    """The nvcc setup.py would use (CUDA_HOME, else PATH), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuobjdump():
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    nvcc = _nvcc()
    cand = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump") if nvcc else None
    return cand if cand and os.access(cand, os.X_OK) else shutil.which("cuobjdump")


def _list_with_cuobjdump(tool, so):
    """({sm of each cubin}, {sm of each PTX}) from ``cuobjdump --list-elf / --list-ptx``."""
    out = {}
    for kind in ("elf", "ptx"):
        res = subprocess.run([tool, f"--list-{kind}", so], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{tool} --list-{kind} failed: {res.stderr.strip()}"
        out[kind] = {int(m) for m in re.findall(r"\.sm_(\d+)[a-z]?\.(?:cubin|ptx)", res.stdout)}
    return out["elf"], out["ptx"]


def _fatbin_section(so) -> bytes:
    """The bytes of the ELF64 section ``.nv_fatbin`` (b"" when absent)."""
    with open(so, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = sections[shstrndx][4]
    for name_off, _, _, _, off, size in sections:
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end] == b".nv_fatbin":
            return data[off:off + size]
    return b""


def _list_with_elf_parser(so):
    """({sm of each cubin}, {sm of each PTX}) from the fatbin containers in ``.nv_fatbin``:
    container header (magic 0xBA55ED50, u16 version, u16 header size, u64 payload size), then entries
    (u16 kind 1 = PTX / 2 = ELF, u16, u32 header size, u64 payload size, ..., u32 sm at offset 28)."""
    blob = _fatbin_section(so)
    elf, ptx = set(), set()
    pos = 0
    while pos + 16 <= len(blob):
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        entry, end = pos + hsize, pos + hsize + fsize
        while entry + 32 <= end:
            kind, _, ehsize, esize = struct.unpack_from("<HHIQ", blob, entry)
            sm, = struct.unpack_from("<I", blob, entry + 28)
            (ptx if kind == 1 else elf if kind == 2 else set()).add(sm)
            if ehsize == 0:
                break
            entry += ehsize + esize
        pos = end
    return elf, ptx


def test_cuda_kernels_compiled_when_required():
    """CI builds from a clean clone with nvcc on PATH and a CUDA build of torch: the CUDA kernels must
    be in _C (a GPU is not needed to compile them)."""
    if not REQUIRE_EXTENSION:
        pytest.skip("FPET_REQUIRE_EXTENSION is not set")
    if _flag("FPET_NO_CUDA") or _flag("FPET_NO_EXTENSION"):
        pytest.skip("FPET_NO_CUDA / FPET_NO_EXTENSION is set: a CUDA-less build was asked for")
    if _nvcc() is None or torch.version.cuda is None:
        pytest.skip(f"no CUDA toolkit (nvcc: {_nvcc()}) or a CPU-only torch (torch.version.cuda: "
                    f"{torch.version.cuda}): setup.py builds no CUDA sources")
    assert fk.backends()["extension"], f"the extension did not load: {fk.backends().get('extension_error')}"
    assert _cuda_in_extension(), (
        f"nvcc is visible ({_nvcc()}) and torch is a CUDA build ({torch.version.cuda}), but fpet_kernels._C "
        "registers no CUDA kernel for fpet::tome_merge: the CUDA sources were not compiled in")


@pytest.fixture(scope="module")
def device_code():
    if not _cuda_in_extension():
        pytest.skip("the extension has no CUDA kernels (built without nvcc, with FPET_NO_CUDA=1, or not built): "
                    "no device code to check")
    so = _extension_path()
    tool = _cuobjdump()
    elf, ptx = _list_with_cuobjdump(tool, so) if tool else _list_with_elf_parser(so)
    return so, tool, elf, ptx


def test_extension_carries_code_for_every_default_arch_and_ptx(device_code):
    so, tool, elf, ptx = device_code
    how = tool or "the .nv_fatbin parser"
    wanted = SMS if not os.environ.get("TORCH_CUDA_ARCH_LIST") else ()
    for sm in wanted:
        assert sm in elf, f"{os.path.basename(so)} has no sm_{sm} cubin (cubins: {sorted(elf)}, via {how})"
    # PTX is what a GPU newer than every cubin JIT-compiles: it must exist, at the newest cubin's level or below
    assert ptx, f"{os.path.basename(so)} carries no PTX (cubins: {sorted(elf)}, via {how}); build with '+PTX'"
    assert min(ptx) <= max(elf), f"PTX {sorted(ptx)} is newer than every cubin {sorted(elf)}"


def test_fatbin_parser_agrees_with_cuobjdump(device_code):
    so, tool, elf, ptx = device_code
    if tool is None:
        pytest.skip("no cuobjdump to compare with")
    assert _list_with_elf_parser(so) == (elf, ptx)


def test_cuda_kernels_listed_by_backends():
    info = fk.backends()
    assert info["extension_cuda"] == _cuda_in_extension()
    if _cuda_in_extension():
        assert {"tome_match", "tome_merge"} <= set(info["cuda_kernels"])
