"""The Triton backend's kernel table: the same names and signatures as the extension's
``torch.ops.fpet_C`` (see csrc/README.md for the contracts), so an op calls
``_backend.kernels(backend).<name>(...)`` whichever compiled backend it runs on."""
from .fpet_triton import fpet_merge  # noqa: F401
from .fpet_triton_backward import fpet_merge_backward  # noqa: F401
from .tome_triton import (merge_sum, merge_wavg, merge_wavg_backward, pyra_merge, tome_match,  # noqa: F401
                          tome_merge, unmerge)
from .pyra_triton_backward import pyra_merge_backward  # noqa: F401
