"""End to end: parameter-efficient fine-tuning of a timm ViT with FPET token merging.

    python python/finetune_fpet.py                       # tiny ViT, synthetic data, CPU, ~30 s
    python python/finetune_fpet.py --model vit_base_patch16_224 --steps 50 --device cuda --dtype bfloat16

What it shows: patch (FPET merge at one block, 1-bit refinement adapter on the metric), add PET
modules (binary LoRA on q/v, or AdaptFormer), freeze the backbone, train the PET modules + head
through the straight-through merge, fold LoRA into the weights, and compare speed with the model as
shipped. Data: a synthetic task (random images whose class is set by a colour bias), so it runs
offline; swap in a real DataLoader for real use.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fpet_kernels as fk  # noqa: E402
from fpet_kernels import pet  # noqa: E402


def synthetic_batch(bsz, img, num_classes, device, dtype, gen):
    labels = torch.randint(0, num_classes, (bsz,), generator=gen)
    x = torch.randn(bsz, 3, img, img, generator=gen) * 0.5
    x[:, 0] += (labels.float() / max(num_classes - 1, 1) - 0.5)[:, None, None] * 2  # the class is in the red channel
    return x.to(device, dtype), labels.to(device)


def throughput(model, bsz, img, device, dtype, iters=5):
    x = torch.randn(bsz, 3, img, img, device=device, dtype=dtype)
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return bsz * iters / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (a 4-block ViT at 64 px) or a timm model name")
    ap.add_argument("--pet", default="lora", choices=["lora", "adaptformer"])
    ap.add_argument("--merge-layer", type=int, default=None, help="FPET merge block (default: the middle one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    import timm
    num_classes = 4
    if args.model == "tiny":
        from timm.models.vision_transformer import VisionTransformer
        model, img = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3,
                                       num_classes=num_classes), 64
    else:
        model = timm.create_model(args.model, pretrained=False, num_classes=num_classes)
        img = model.patch_embed.img_size[0]
    model = model.to(device, dtype)
    shipped = throughput(model.eval(), args.batch, img, device, dtype)

    merge_layer = len(model.blocks) // 2 if args.merge_layer is None else args.merge_layer
    fk.patch.timm(model, method="fpet", merge_layer=merge_layer)      # + 1-bit refinement adapter
    pet.apply(model, args.pet, binary=True)                            # 1-bit LoRA / AdaptFormer
    pet.mark_trainable(model)
    model.to(device, dtype)
    print(pet.format_report(pet.parameter_report(model)))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(args.steps):
        x, y = synthetic_batch(args.batch, img, num_classes, device, dtype, gen)
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    model.eval()
    if args.pet == "lora":
        pet.merge_lora(model)  # latency-free: LoRA folded into the qkv weights
    x, y = synthetic_batch(256, img, num_classes, device, dtype, gen)
    with torch.inference_mode():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    tokens = fk.patch.merge_state(model, x[:1])["size"].shape[1]  # an explicit call: the model keeps no state
    merged = throughput(model, args.batch, img, device, dtype)
    print(f"accuracy on fresh synthetic data: {acc:.3f} (chance {1 / num_classes:.2f})")
    print(f"tokens after block {merge_layer}: {tokens}; throughput {merged:.1f} img/s vs {shipped:.1f} img/s as "
          f"shipped ({merged / shipped:.2f}x, B={args.batch}, {device.type}, {args.dtype})")


if __name__ == "__main__":
    main()
