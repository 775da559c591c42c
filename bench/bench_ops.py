"""pytest-benchmark microbenchmarks: reference vs fused kernels, ViT-B/16 shapes.

    python -m pytest bench/bench_ops.py --benchmark-only            # all
    python -m pytest bench/bench_ops.py --benchmark-only -k "tome and 64"

For the summary table with speed-ups and the anchors, run ``python bench/run_table.py``.
"""
import pytest
import torch

from common import BATCHES, MODES, OPS, make_call, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", providers(DEVICE))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, provider, mode, batch):
    call = make_call(op, provider, mode, batch, DEVICE)
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, batch=batch, device=DEVICE)
    if DEVICE == "cuda":
        def run():
            call()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(call)
