"""A tour of the fpet_kernels API on random ViT-B/16-shaped tokens (runs on CPU in seconds).

    python python/quickstart.py
"""
import torch

import fpet_kernels as fk


def main():
    torch.manual_seed(0)
    print("backends:", fk.backends())
    B, N, C, D = 4, 197, 768, 64  # ViT-B/16 at 224: class token + 14 x 14 patches
    x = torch.randn(B, N, C)

    # ToMe: a 12-layer schedule, fused match + size-weighted merge per layer, compact source map.
    schedule = fk.parse_r(12, 16)
    size, token_map = None, None
    for r in schedule:
        metric = x[..., :D]  # in a ViT: the attention keys averaged over heads
        x, size, matching = fk.tome_merge(x, metric, r, size, class_token=True)
        token_map = fk.compose_token_map(token_map, matching)
    print(f"ToMe  r={schedule[0]} x12: {N} -> {x.shape[1]} tokens; sizes sum to {size.sum(1).flatten().tolist()}")
    full = fk.unmerge(x, token_map)  # back to the 197 original positions (dense prediction, visualisation)
    print(f"      unmerged to {tuple(full.shape)}; class token stayed alone: {bool((size[:, 0] == 1).all())}")

    # FPET: one checkerboard merge, straight-through gradient into the metric.
    x = torch.randn(B, N, C, requires_grad=True)
    metric = torch.randn(B, N, D, requires_grad=True)
    y, size = fk.fpet_merge(x, metric, class_token=True)
    y.square().mean().backward()
    print(f"FPET  {N} -> {y.shape[1]} tokens; |d loss / d metric| = {metric.grad.norm():.3e} (straight-through)")

    # PYRA: learned modulation of the tokens being merged (b = 0 is plain ToMe).
    a, b = torch.randn(16, 1), torch.zeros(1, C)
    w, bias = torch.ones(C), torch.zeros(C)
    y, size = fk.pyra_merge(x.detach(), metric.detach(), 16, a, b, w, bias, class_token=True)
    y0, _, _ = fk.tome_merge(x.detach(), metric.detach(), 16, class_token=True)
    print(f"PYRA  {N} -> {y.shape[1]} tokens; equals ToMe at b=0: {torch.allclose(y, y0, atol=1e-5)}")

    # ToMe's closure API, drop-in.
    merge, unmerge = fk.bipartite_soft_matching(metric.detach(), 16, class_token=True)
    y, size = fk.merge_wavg(merge, x.detach())
    source = fk.merge_source(merge, x.detach())
    print(f"closures: merged {tuple(y.shape)}, source {tuple(source.shape)}, unmerge -> {tuple(unmerge(y).shape)}")


if __name__ == "__main__":
    main()
