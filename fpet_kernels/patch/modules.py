"""The learned merge modules that the FPET and PYRA patches own (``blocks[i].fk_refine``,
``blocks[i].fk_pyra``; ``layers[i].…`` in a Hugging Face model):

- :class:`RefinementAdapter`: FPET's refinement of the merge metric (a 1-bit bottleneck by default);
- :class:`PyraModulation`: PYRA's modulation parameters; its ``forward`` is PYRA's merge.

They are PET parameters too (``pet.mark_trainable`` trains them, ``pet.save`` stores them), which is why
``fpet_kernels.pet`` re-exports both; they live here because the patches create and call them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..layers import Bottleneck, check_pos_int, check_real
from ..ops.pyra import pyra_merge

__all__ = ["RefinementAdapter", "PyraModulation"]


class RefinementAdapter(Bottleneck):
    """FPET's refinement of the token-similarity metric at a merging layer: ``m + f(m)`` with
    ``m = metric.detach()`` (no gradient flows back into the backbone through the metric) and
    ``f = up(dropout(relu(down(m))))``, ``dim -> hidden -> dim``, 1-bit by default. ``up`` starts at
    zero, so the refined metric starts equal to the metric."""

    def __init__(self, dim: int = 64, hidden: int = 32, dropout: float = 0.1, binary: bool = True):
        super().__init__(dim, hidden, dropout, binary, "hidden")
        self.hidden = hidden

    def forward(self, metric: Tensor) -> Tensor:
        if not isinstance(metric, Tensor) or metric.dim() < 1 or metric.shape[-1] != self.dim:
            got = tuple(metric.shape) if isinstance(metric, Tensor) else type(metric).__name__
            raise ValueError(f"metric must be a tensor of shape [..., {self.dim}], got {got}")
        m = metric.detach()
        return m + self.branch(m)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, binary={self.binary}"


class PyraModulation(nn.Module):
    """PYRA's learned parameters for one merging layer: ``a`` ``[r, 1]`` (kaiming-uniform with
    ``a=sqrt(5)``, i.e. U(-1, 1) for fan-in 1), ``b`` ``[1, dim]`` (zeros) and ``norm`` =
    ``LayerNorm(dim)`` (``ln_weight``/``ln_bias``). ``forward`` runs ``fpet_kernels.pyra_merge`` with them:
    the merge step of a PYRA block (``patch/core.merge_step``, the Hugging Face patch) calls it."""

    def __init__(self, r: int, dim: int, eps: float = 1e-5):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        self.r, self.dim = r, check_pos_int("dim", dim)
        self.a = nn.Parameter(torch.empty(r, 1))
        self.b = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim, eps=check_real("eps", eps))
        if r:
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    @property
    def ln_weight(self) -> Tensor:
        return self.norm.weight

    @property
    def ln_bias(self) -> Tensor:
        return self.norm.bias

    def forward(self, x: Tensor, metric: Tensor, size: Optional[Tensor] = None, class_token: bool = False,
                distill_token: bool = False, backend: Optional[str] = None, return_matching: bool = False,
                padded: bool = False, threshold: Optional[float] = None):
        return pyra_merge(x, metric, self.r, self.a, self.b, self.norm.weight, self.norm.bias, size=size,
                          class_token=class_token, distill_token=distill_token, eps=self.norm.eps,
                          backend=backend, return_matching=return_matching, padded=padded, threshold=threshold)

    def extra_repr(self) -> str:
        return f"r={self.r}, dim={self.dim}"
