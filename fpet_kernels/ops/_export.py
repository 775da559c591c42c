"""Is ``torch.onnx.export(..., dynamo=True)`` tracing the model right now? A leaf: it imports only ``sys``.

While it is, the public op functions run the export-friendly formulation of their op (its record's
``formulation()``: standard aten ops, no stable sort; ``library.dispatch`` makes the switch) instead of
the registered custom ops, so the ONNX export of a patched model needs nothing extra. Plain ``torch.export`` and
``torch.compile`` are unaffected: they keep the fused custom ops.

The check runs on every eager call of those functions, so it is a couple of attribute reads and never
imports ``torch.onnx`` (a heavy import): it reads the flag that the dynamo exporter's entry point
sets (``torch.onnx._internal.exporter._flags._is_onnx_exporting``, set by the decorator
``set_onnx_exporting_flag`` on ``_core.export`` since torch 2.7, part of what
``torch.onnx.is_in_onnx_export()`` reads) from that module once ``torch.onnx`` has loaded it.
The TorchScript exporter (``dynamo=False``, deprecated) is not covered: it sees the custom ops.
"""
import sys

_FLAGS_MODULE = "torch.onnx._internal.exporter._flags"
_flags = None  # that module, once loaded (by ``import torch.onnx``)


def exporting() -> bool:
    """``True`` while ``torch.onnx.export(..., dynamo=True)`` runs; no ``torch.onnx`` import."""
    global _flags
    if _flags is None:
        _flags = sys.modules.get(_FLAGS_MODULE)
        if _flags is None:
            return False
    return _flags._is_onnx_exporting

