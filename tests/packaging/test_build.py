"""The build: which kernels setup.py compiles (the CPU kernels always; the CUDA kernels when a GPU is visible,
or when asked with FORCE_CUDA=1: a machine without a GPU builds the CPU kernels only by default), and, when the
extension was compiled with CUDA, that fpet_kernels/_C*.so carries device code (SASS) for sm_80, 86, 89 and 90
and PTX (what newer GPUs JIT-compile); no GPU is needed. Under FPET_REQUIRE_EXTENSION=1 (CI) with the CUDA
kernels asked for (FORCE_CUDA=1, as CI sets it, or a GPU visible), CUDA kernels missing from the extension FAIL.

The device code is listed with the ``cuobjdump`` that ships with Triton
(``<triton>/backends/nvidia/bin/cuobjdump``) or the toolkit's; without either, the ``.nv_fatbin``
section of the shared object is parsed directly (the fatbin container and entry headers).
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import types

import pytest
import torch

import fpet_kernels as fk
from fpet_kernels import _version

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


def _cuda_asked() -> str | None:
    """Why the extension here must hold CUDA kernels (as setup.py decides it), or None."""
    if _flag("FORCE_CUDA"):
        return "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return "a GPU is visible"
    return None


def test_cuda_kernels_compiled_when_required():
    """CI builds from a clean clone with FORCE_CUDA=1 (no GPU there): the CUDA kernels must be in _C (a GPU
    is not needed to compile them)."""
    if not REQUIRE_EXTENSION:
        pytest.skip("FPET_REQUIRE_EXTENSION is not set")
    if _flag("FPET_NO_CUDA") or _flag("FPET_NO_EXTENSION"):
        pytest.skip("FPET_NO_CUDA / FPET_NO_EXTENSION is set: a CUDA-less build was asked for")
    asked = _cuda_asked()
    if asked is None:
        pytest.skip("neither FORCE_CUDA=1 nor a GPU: setup.py compiles the CPU kernels only (CI sets FORCE_CUDA=1)")
    assert fk.backends()["extension"], f"the extension did not load: {fk.backends().get('extension_error')}"
    info = _version.build_info() or {}
    assert _cuda_in_extension(), (
        f"the CUDA kernels were asked for ({asked}; nvcc: {_nvcc()}, torch CUDA: {torch.version.cuda}), but "
        f"fpet_kernels._C registers no CUDA kernel for fpet::tome_merge (the build recorded: "
        f"{info.get('cuda_why', 'nothing')}): the CUDA sources were not compiled in")


def test_build_record_matches_the_extension():
    """_build_info.py (written by setup.py) says whether CUDA kernels were compiled, and why (not)."""
    info = _version.build_info()
    if not fk.backends()["extension"] or info is None or "cuda_why" not in info:
        pytest.skip("no extension built here by a setup.py that records why it did or did not compile CUDA")
    assert info["with_cuda"] == _cuda_in_extension(), info
    assert isinstance(info["cuda_why"], str) and info["cuda_why"], info


def _setup_function(name: str):
    """A function of setup.py, compiled on its own (importing setup.py would run setup())."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "setup.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    ns = {"os": os, "shutil": shutil}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in (name, "_flag"):
            exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("env, gpu, toolkit, torch_cuda, want, why", [
    ({}, False, True, "13.0", False, "no GPU visible"),            # the default on a GPU-less machine: CPU only
    ({"FORCE_CUDA": "1"}, False, True, "13.0", True, "FORCE_CUDA=1"),  # CI asks for them
    ({"FORCE_CUDA": "1"}, False, False, None, True, "FORCE_CUDA=1"),
    ({}, True, True, "13.0", True, "GPU visible"),
    ({}, True, False, "13.0", False, "no CUDA toolkit"),
    ({}, True, True, None, False, "CPU-only build"),
    ({"FPET_NO_CUDA": "1", "FORCE_CUDA": "1"}, True, True, "13.0", False, "FPET_NO_CUDA=1"),
])
def test_setup_cuda_choice(monkeypatch, env, gpu, toolkit, torch_cuda, want, why):
    for k in ("FORCE_CUDA", "FPET_NO_CUDA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    choice = _setup_function("_cuda_choice")
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda=torch_cuda), cuda=types.SimpleNamespace(
        is_available=lambda: gpu, get_device_name=lambda i: "GPU 0"))
    fake_ce = types.SimpleNamespace(CUDA_HOME="/usr/local/cuda" if toolkit else None)
    got, got_why = choice(fake_torch, fake_ce, ["csrc/cuda/tome_merge.cu"])
    assert got is want and why in got_why, (got, got_why)


def test_setup_names_a_missing_compiler(monkeypatch):
    missing = _setup_function("_missing_compiler")
    monkeypatch.setenv("CXX", "no-such-compiler-fpet")
    msg = missing()
    assert "no C++ compiler" in msg and "no-such-compiler-fpet" in msg and "apt-get install g++" in msg
    monkeypatch.setenv("CXX", "sh")  # on PATH everywhere
    assert missing() is None


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
    # setup.py's default architectures apply when FORCE_CUDA=1 compiles without a GPU and without a list
    wanted = SMS if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available() else ()
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
