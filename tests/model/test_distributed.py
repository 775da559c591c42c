"""A patched ViT with PET modules (LoRA) trains on a distributed engine: 2 CPU processes (gloo),
spawned from the test, each on half the batch. After one step the gradients and the updated
parameters equal a single-process run on the concatenated batch (the merges are per image, so
splitting the batch changes nothing). DistributedDataParallel and FSDP2 (``fully_shard``)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytest.importorskip("timm")

WORLD = 2
PER_RANK = 2
METHODS = ("tome", "fpet", "pyra")
LR = 0.5


def build(method):
    """The same model in every process: tiny ViT, token-merging patch, LoRA, no dropout."""
    from fpet_kernels import pet
    from test_patch import patch, tiny_vit

    torch.manual_seed(0)
    model = patch(tiny_vit(), method, None)
    pet.apply(model, "lora", rank=2)
    pet.mark_trainable(model)
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make every LoRA gradient count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g)
    return x, torch.arange(WORLD * PER_RANK) % 5


def step(model, x, y):
    """One SGD step; returns ({name: grad}, {name: parameter after the step}) of the trainable parameters."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    full = (lambda t: t.full_tensor()) if _has_dtensor(model) else (lambda t: t)
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    params = {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, params


def _has_dtensor(model):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _worker(rank, init_file, out_dir, engine):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for method in METHODS:
            model = build(method)
            if engine == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                wrapped = DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                mesh = init_device_mesh("cpu", (WORLD,))
                for blk in model.blocks:
                    fully_shard(blk, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            grads, params = step(wrapped, x[part], y[part])
            if engine == "ddp":  # DDP's parameter names carry the "module." prefix
                grads = {n.removeprefix("module."): g for n, g in grads.items()}
                params = {n.removeprefix("module."): p for n, p in params.items()}
            if rank == 0:
                torch.save((grads, params), os.path.join(out_dir, f"{engine}_{method}.pt"))
    finally:
        dist.destroy_process_group()


def _run(engine, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), engine), nprocs=WORLD, join=True)
    x, y = batch()
    for method in METHODS:
        exp_grads, exp_params = step(build(method), x, y)
        grads, params = torch.load(tmp_path / f"{engine}_{method}.pt")
        assert grads.keys() == exp_grads.keys()
        assert any("lora" in n for n in grads) and (method == "tome" or any(".fk_" in n for n in grads))
        for n in exp_grads:
            torch.testing.assert_close(grads[n], exp_grads[n], atol=1e-6, rtol=1e-4, msg=f"{method} grad {n}")
            torch.testing.assert_close(params[n], exp_params[n], atol=1e-6, rtol=1e-5, msg=f"{method} param {n}")
        if method != "tome":
            assert any(g.abs().sum() > 0 for n, g in exp_grads.items() if ".fk_" in n), f"{method}: merge untrained"


@pytest.mark.slow
def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    _run("ddp", tmp_path)


@pytest.mark.slow
def test_fsdp2_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    _run("fsdp", tmp_path)
