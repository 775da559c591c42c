"""pytest-benchmark microbenchmarks: reference vs fused kernels, ViT-B/16 shapes.

    python -m pytest bench/bench_ops.py --benchmark-only            # all
    python -m pytest bench/bench_ops.py --benchmark-only -k "tome and 64"
    python -m pytest bench/bench_ops.py --benchmark-only -k cuda    # the GPU providers only

CPU: reference and the C++ kernels, float32, B in {1, 8, 64}. With CUDA also the GPU providers
(reference, reference under torch.compile, triton, cuda) for every op of ``common.ALL_OPS`` (the
merges, X-PEFT's adapter, PaFi's masked weight gradient), float16, B in {1, 64, 256}; without
CUDA (or when a backend is not live, e.g. "cuda" for the two PET ops, which have no CUDA C++
kernel) those cases are skipped. For the summary table with
speed-ups, GB/s and the targets, run ``python bench/run_table.py``.
"""
import pytest
import torch

from common import (ALL_OPS, BATCHES, FORWARD_ONLY, GPU_BACKENDS, GPU_BATCHES, MODES, OPS, is_live, make_call,
                    providers)

HAS_CUDA = torch.cuda.is_available()


def _cases():
    for provider in providers("cpu"):
        for op in OPS:
            yield pytest.param("cpu", provider, op, torch.float32, BATCHES, id=f"cpu-{provider}-{op}")
    for provider in ("reference", "reference+compile") + GPU_BACKENDS:
        for op in ALL_OPS:
            why = "no CUDA device" if not HAS_CUDA else (
                None if is_live(provider, "cuda", op) else f"{provider} not live for {op}")
            marks = [pytest.mark.skip(reason=why)] if why else []
            yield pytest.param("cuda", provider, op, torch.float16, GPU_BATCHES, id=f"cuda-{provider}-{op}",
                               marks=marks)


def _expand():
    for case in _cases():
        device, provider, op, dtype, batches = case.values
        for mode in MODES:
            if op in FORWARD_ONLY and mode != "forward":  # no gradient, or one never taken (common.py)
                continue
            for batch in batches:
                yield pytest.param(device, provider, op, dtype, mode, batch, marks=case.marks,
                                   id=f"{case.id}-{mode}-{batch}")


@pytest.mark.parametrize("device,provider,op,dtype,mode,batch", list(_expand()))
def test_op(benchmark, device, provider, op, dtype, mode, batch):
    call = make_call(op, provider, mode, batch, device, dtype)
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, batch=batch, device=device,
                                dtype=str(dtype).replace("torch.", ""), min_bytes=call.min_bytes, note=call.note)
    if device == "cuda":
        def run():
            call()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(call)
