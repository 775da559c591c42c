"""AdaptFormer: a parallel bottleneck adapter beside each block's MLP, ``pet.apply(model, "adaptformer")``.

Each block gets ``blk.fk_adapter = AdaptFormerAdapter(dim, ...)`` and becomes the patched timm block
(``fpet_kernels.patch.ensure_block``), whose forward adds the adapter beside the MLP. ``binary=True``
makes ``down`` / ``up`` 1-bit (FPET's ``BinaryLinear``).
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..layers import Bottleneck, check_real
from ..patch import ensure_block
from .lora import text_layers, vit_blocks
from .registry import Method, register

__all__ = ["AdaptFormerAdapter", "apply_adaptformer"]


class AdaptFormerAdapter(Bottleneck):
    """AdaptFormer's parallel bottleneck adapter: ``scale * up(dropout(relu(down(x))))``.

    The block adds it beside the MLP, ``x + mlp(norm2(x)) + adapter(x)``; ``forward`` returns only the
    adapter branch. ``up`` is zero-initialised (weight and bias), so a fresh adapter outputs zeros and
    the model starts unchanged. ``binary=True`` makes ``down``/``up`` BinaryLinear (FPET 1-bit)."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0,
                 binary: bool = False):
        super().__init__(dim, bottleneck, dropout, binary, "bottleneck")
        self.bottleneck = bottleneck
        self.scale = check_real("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) * self.scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={self.scale}, binary={self.binary}"


def apply_adaptformer(model: nn.Module, **kw) -> nn.Module:
    """``pet.apply(model, "adaptformer", ...)``: every block gets ``blk.fk_adapter = AdaptFormerAdapter(dim,
    ...)`` (kw: bottleneck=64, scale=0.1, binary=False, dropout=0.0) and is patched by
    ``fpet_kernels.patch.ensure_block`` to add it beside the MLP. A BERT-family encoder (``lora.text_layers``):
    every layer gets ``layer.fk_adapter = AdaptFormerAdapter(hidden, ...)`` beside its feed-forward, inside
    the residual: ``output.LayerNorm(ffn(a) + a + adapter(a))`` with ``a`` the attention output."""
    layers = text_layers(model)
    if layers and getattr(model, "blocks", None) is None:
        if any(hasattr(layer, "fk_adapter") for layer in layers):
            raise ValueError("model already has adapters (layer.fk_adapter); method='adaptformer' was applied twice")
        ref = layers[0].output.dense.weight
        new = [AdaptFormerAdapter(layer.output.dense.out_features, **kw).to(device=ref.device, dtype=ref.dtype)
               for layer in layers]
        for layer, ad in zip(layers, new):
            ensure_block(layer)  # checks the class first: nothing set on an unsupported layer
            layer.fk_adapter = ad
        return model
    blocks = vit_blocks(model)
    if any(hasattr(blk, "fk_adapter") for blk in blocks):
        raise ValueError("model already has adapters (blk.fk_adapter); method='adaptformer' was applied twice")
    ref = blocks[0].attn.qkv.weight
    new = [AdaptFormerAdapter(blk.attn.qkv.in_features, **kw).to(device=ref.device, dtype=ref.dtype)
           for blk in blocks]
    for blk, ad in zip(blocks, new):
        blk.fk_adapter = ad
        ensure_block(blk)
    return model


register(Method("adaptformer", apply_adaptformer, frozenset({"bottleneck", "scale", "binary", "dropout"}),
                module_types=(AdaptFormerAdapter,)))
