"""ONNX export of patched models: ``torch.onnx.export(model, (x,), dynamo=True)``, nothing else.

    import fpet_kernels as fk
    fk.patch.timm(model, "tome", r=8)
    program = torch.onnx.export(model.eval(), (x,), dynamo=True)

No import of this module is needed. Mechanism: while ``torch.onnx.export`` traces the model (its
flag ``torch.onnx.is_in_onnx_export()`` is set), the public op functions (``tome_match``,
``tome_merge``, ``merge_wavg``, ``unmerge``, ``fpet_merge``, ``pyra_merge``, ``attention_inputs``)
run their export-friendly formulation (each op record's ``formulation()``: ``library.Op.export``, else
its reference) instead of the registered custom ops: the references without in-place writes, with ToMe's ranking through
``topk`` (ONNX ``TopK`` puts the lower index first among equal values: the spec's tie rule), so the
graph holds standard aten ops that onnxscript's torchlib translates. The check is in
``fpet_kernels/ops/_export.py`` (it reads the exporter's flags without importing ``torch.onnx``).

Scope: only the ONNX exporter sees the formulation; ``torch.export``, ``torch.compile`` and
AOTInductor keep the fused custom ops, and torch's global decomposition table is untouched. It works
on every backend (compiled kernels or the pure-PyTorch reference). Cost: the ONNX graph computes
the merges with the reference formulation (dense ops; onnxruntime runs them on any device), not the
fused kernels; it computes the same matchings as eager.

This module adds ``export(model, args, path)``, a thin convenience wrapper that also takes an
``ExportedProgram`` (already traced, so it holds the custom ops: they are decomposed with
``decompositions()``, a table local to that call).
"""
from __future__ import annotations

import torch

from ..ops import library


def decompositions() -> dict:
    """``{op overload: formulation}`` for every registered op of the package that has one (its record's
    ``formulation()``, ``library.OPS``) and its ``*_triton`` twin
    (``ExportedProgram.run_decompositions(decompositions())``); torch's global table is not touched."""
    table = {}
    for name, op in library.OPS.items():
        fn = op.formulation()
        if fn is None:
            continue
        for op_name in (name, f"{name}_triton"):
            packet = getattr(torch.ops.fpet, op_name, None)
            if packet is not None:
                table[packet.default] = fn
    return table


def export(model, args: tuple, path=None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True, **kwargs)``: returns the ``ONNXProgram``.
    ``model`` may be an ``nn.Module`` or a ``torch.export.ExportedProgram`` (whose custom ops are
    decomposed here first)."""
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of the model's inputs, got {type(args).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.run_decompositions(decompositions())
    elif not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
    return torch.onnx.export(model, args, path, dynamo=True, **kwargs)
