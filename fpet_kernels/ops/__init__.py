"""One module per op family: reference -> registered ops (schema, fake kernel, autograd) -> public API.

Importing the families defines the ops ``torch.ops.fpet.*``; the C++ extension, which registers the
CPU and CUDA kernels of those ops, is loaded after them (ops/library.py)."""
from . import _backend
from . import fpet, pyra, sparse, tome, xpeft  # noqa: F401  (importing defines torch.ops.fpet.*)

_backend.load_extension()
