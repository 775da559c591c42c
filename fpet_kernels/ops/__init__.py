"""One module per op family: reference -> op records (schema, fake kernel, autograd) -> public API.

Importing the families registers their ops (``library.OPS``, ``torch.ops.fpet.*``), in the order the
backend tables list them (``fk.backends()``): ToMe, FPET, PYRA, X-PEFT, PaFi's sparse gradient,
attention. The C++ extension, which registers the CPU and CUDA kernels of those ops, is loaded after
them (ops/library.py)."""
from . import _backend
from . import tome, fpet, pyra, xpeft, sparse, attention  # noqa: F401  (importing registers torch.ops.fpet.*)

_backend.load_extension()
