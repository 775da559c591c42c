"""Compile every Triton kernel ahead of time for an H100 (sm_90), without a GPU.

Run as a script, WITHOUT TRITON_INTERPRET (kernels must be real JITFunctions):
    python tests/aot_compile.py [--arch 90]
Prints registers / stack (spill) bytes / shared memory per kernel, read from the cubin with the
cuobjdump that ships with Triton; exits non-zero if a kernel fails to compile.
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def all_specs():
    from fpet_kernels.ops import attention_triton, fpet_triton, fpet_triton_backward, pyra_triton_backward, tome_triton
    return (tome_triton.aot_specs() + fpet_triton.aot_specs() + fpet_triton_backward.aot_specs()
            + attention_triton.aot_specs() + pyra_triton_backward.aot_specs())


def resources(cubin: bytes) -> str:
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in out.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    failed = 0
    for spec in all_specs():
        fn, sig, const, num_warps = spec
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", str(fn))
        sig = dict(sig, **{k: "constexpr" for k in const})
        desc = ",".join(f"{k}={v}" for k, v in const.items()) + f" {sig.get(next(iter(sig)))}"
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                               target=GPUTarget("cuda", args.arch, 32), options={"num_warps": num_warps})
            print(f"ok   {name:28s} warps={num_warps} shared={c.metadata.shared:6d} {resources(c.asm['cubin'])} [{desc}]")
        except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name:28s} [{desc}]: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
