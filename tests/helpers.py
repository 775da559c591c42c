"""Shared test data and assertions (imported by the test modules; tests/ is on sys.path)."""
from __future__ import annotations

import os

import pytest
import torch

import fpet_kernels as fk

# CI sets FPET_REQUIRE_EXTENSION=1: a backend of the extension that is not live fails the tests.
REQUIRE_EXTENSION = os.environ.get("FPET_REQUIRE_EXTENSION", "0").strip().lower() in ("1", "true", "yes", "on")


def is_live(name: str) -> bool:
    return bool(fk.backends()["live"].get(name, False))


def missing_message(name: str) -> str:
    info = fk.backends()
    why = info.get("extension_error") or f"the extension loaded but registers no {name!r} kernels"
    return (f"backend {name!r} is not live: the C++ extension fpet_kernels._C did not build or load ({why}). "
            "Build it with `pip install --no-build-isolation --no-deps -e .`")

# (dtype, atol, rtol) for comparing a kernel with the reference computed on the same inputs.
# Both compute in float32 and round once to the output dtype, so half outputs agree within an ulp.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="f32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="f16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16"),
]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
# small absolute slack of the flash-attention criterion (kernel error <= 2 x reference error + atol)
HALF_ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

TOKEN_FLAGS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="cls"),
    pytest.param(True, True, id="cls+dist"),
    pytest.param(False, True, id="dist"),
]


def gen(*shape, dtype=torch.float32, seed=0, low=None, high=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    if low is not None:
        return (low + (high - low) * torch.rand(*shape, generator=g, dtype=base)).to(dtype)
    return torch.randn(*shape, generator=g, dtype=base).to(dtype)


def gen_size(bsz, n, dtype=torch.float32, seed=1):
    """Token sizes as after earlier merges: small positive integers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 5, (bsz, n, 1), generator=g).to(dtype)


def r_value(kind, n, class_token, distill_token):
    """r in {0, 1, 16, the 50% cap, more than the cap} -> (requested r, effective r)."""
    cap = (n - int(class_token) - int(distill_token)) // 2
    req = {"0": 0, "1": 1, "16": 16, "cap": cap, "over": cap + 7}[kind]
    return req, max(0, min(req, cap))


def assert_close(actual, expected, atol, rtol, what=""):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def max_err(a, truth):
    return (a.double() - truth.double()).abs().max().item() if a.numel() else 0.0


def assert_half_criterion(kernel, reference_in_dtype, truth64, dtype, what=""):
    """Flash-attention criterion: the kernel's error against a float64 computation is at most
    twice the error of the reference computed in the same dtype, plus a small atol."""
    ek, er = max_err(kernel, truth64), max_err(reference_in_dtype, truth64)
    assert ek <= 2 * er + HALF_ATOL[dtype], f"{what}: kernel error {ek:.3g} > 2 x reference error {er:.3g} + atol"


def wavg_by_map(x, size, token_map, n_out):
    """Size-weighted average driven by a token map, in float64 (independent of the package):
    ``out[m] = sum_{map[n] = m} x[n] s[n] / sum s[n]``; entries -1 are dropped."""
    bsz, n, c = x.shape
    x = x.double()
    s = torch.ones(bsz, n, 1, dtype=torch.float64) if size is None else size.double()
    num = torch.zeros(bsz, n_out + 1, c, dtype=torch.float64)
    den = torch.zeros(bsz, n_out + 1, 1, dtype=torch.float64)
    idx = torch.where(token_map >= 0, token_map, torch.full_like(token_map, n_out))
    for b in range(bsz):
        num[b].index_add_(0, idx[b], x[b] * s[b])
        den[b].index_add_(0, idx[b], s[b])
    num, den = num[:, :n_out], den[:, :n_out]
    return num / den.clamp_min(1e-300), den


def leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def forward_cases(shapes, r_kinds, flags):
    """(n, c, r_kind, cls, dist, dtype, atol, rtol) cases: float32 over every shape x r x token flags;
    float16/bfloat16 over a subset (half arithmetic is slow on CPU)."""
    cases = []
    for dt in DTYPE_TOLS:
        dtype, atol, rtol = dt.values
        half = dtype != torch.float32
        for shape in shapes:
            n, c = shape.values
            if half and n not in (197, 577, 51):
                continue
            for r_kind in (("16", "cap") if half else r_kinds):
                for fl in flags:
                    cls, dist = fl.values
                    cases.append(pytest.param(n, c, r_kind, cls, dist, dtype, atol, rtol,
                                              id=f"{shape.id}-r{r_kind}-{fl.id}-{dt.id}"))
    return cases


def assert_thread_invariant(run):
    """``run()`` returns tensors; one thread and two or more must give bit-identical results."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(threads, 2))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


class _MapOps:
    """The token-map ops of one backend with the registered ops' signatures: the C++ ops
    (``torch.ops.fpet.*``), their Triton twins, or the reference (with its argument checks)."""

    def __init__(self, backend: str):
        self.backend = backend

    def merge_wavg(self, x, size, token_map, n_out):
        from fpet_kernels.ops import library, tome
        return library.dispatch(tome.MERGE_WAVG, self.backend, x.device, (), x, size, token_map, n_out)

    def merge_sum(self, x, token_map, n_out):
        from fpet_kernels.ops import library, tome
        if self.backend == "reference":
            tome.check_map_range(token_map, n_out)
            return tome.merge_sum_reference(x, token_map, n_out)
        return library.family(self.backend).merge_sum(x, token_map, n_out)

    def unmerge(self, y, token_map):
        from fpet_kernels.ops import library, tome
        if self.backend == "reference":
            tome.check_map_range(token_map, y.shape[1])
            return tome.unmerge_reference(y, token_map)
        return library.family(self.backend).unmerge(y, token_map)


def map_ops(backend: str) -> _MapOps:
    return _MapOps(backend)


def tiny_timm_vit(seed: int = 0, head_std=None):
    """A 3-block timm ViT on 32x32 images (16 patches + class token), seeded, with non-zero biases
    (and a head of std ``head_std`` when given), in training mode."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    for p in model.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.02)
    if head_std is not None:
        torch.nn.init.normal_(model.head.weight, std=head_std)
    return model
