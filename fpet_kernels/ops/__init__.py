"""One module per op family: reference -> registered op -> fake kernel -> autograd -> public API."""
from . import fpet, pyra, sparse, tome  # noqa: F401  (importing registers torch.ops.fpet.*)
