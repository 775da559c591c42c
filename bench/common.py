"""Shapes, inputs and providers shared by the microbenchmarks (bench_ops.py) and the table (run_table.py).

A provider is a zero-argument callable made for one (op, mode, B): "reference" runs the project's
pure-PyTorch reference (the published methods' cost model), "cpu"/"cuda"/"triton" the fused ops.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fpet_kernels as fk  # noqa: E402

# ViT-B/16 at 224: 196 patches + class token, C = 768, metric = keys averaged over heads (D = 64).
N, C, D, R = 197, 768, 64, 16
BATCHES = (1, 8, 64)
OPS = ("tome_merge", "fpet_merge")
MODES = ("forward", "forward+backward")

# ../shared/anchors.md, CPU (2 cores, float32, torch 2.14.1): the published reference implementations.
CPU_ANCHORS_MS = {
    ("tome_merge", "forward"): {1: 0.27, 8: 8.9, 64: 63.8},
    ("fpet_merge", "forward"): {1: 0.46, 8: 4.8, 64: 42.3},
}


def make_inputs(batch: int, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, C, generator=g).to(device, dtype).requires_grad_(requires_grad)
    metric = torch.randn(batch, N, D, generator=g).to(device, dtype).requires_grad_(requires_grad)
    return x, metric


def providers(device: str = "cpu") -> list:
    live = fk.backends()["live"]
    names = ["reference"] + [b for b in ("cpu", "cuda", "triton") if live[b] and (b == "cpu") == (device == "cpu")]
    return names


def make_call(op: str, provider: str, mode: str, batch: int, device="cpu", dtype=torch.float32):
    """A closure running one op once (and its backward for mode "forward+backward")."""
    backward = mode == "forward+backward"
    x, metric = make_inputs(batch, device, dtype, requires_grad=backward)
    if op == "tome_merge":
        if provider == "reference":
            fwd = lambda: fk.reference.tome_merge(x, metric, R, class_token=True)[0]  # noqa: E731
        else:
            fwd = lambda: fk.tome_merge(x, metric, R, class_token=True, backend=provider)[0]  # noqa: E731
        inputs = [x]
    elif op == "fpet_merge":
        if provider == "reference":
            fwd = lambda: fk.reference.fpet_merge(x, metric, class_token=True)[0]  # noqa: E731
        else:
            fwd = lambda: fk.fpet_merge(x, metric, class_token=True, backend=provider)[0]  # noqa: E731
        inputs = [x, metric]
    else:
        raise ValueError(f"unknown op {op!r}")
    if not backward:
        def call():
            with torch.no_grad():
                return fwd()
        return call
    grad = torch.randn_like(fwd().detach())

    def call_bwd():
        return torch.autograd.grad(fwd(), inputs, grad)
    return call_bwd


def bytes_moved(op: str, batch: int, dtype=torch.float32) -> int:
    """The HBM/DRAM floor of one forward: read x and metric, write the merged tokens and sizes."""
    e = torch.finfo(dtype).bits // 8
    n_out = N - R if op == "tome_merge" else 99
    return batch * (N * C * e + N * D * e + n_out * C * e + n_out * 4)
