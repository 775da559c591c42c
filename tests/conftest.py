"""Backend parametrization for the whole suite.

Tests take the ``backend`` fixture (every backend that runs on CPU tensors: "reference" and the
C++ "cpu" kernels) or the ``kernel_backend`` fixture (compiled backends only, for comparisons
against the reference). A backend that is not live in this install is skipped, unless
``FPET_REQUIRE_EXTENSION=1`` (CI): then every test that needs it FAILS, saying the extension did
not build.

The tests live in folders by layer (tests/README.md); this file, at the root of tests/, puts tests/ on
sys.path, so the shared modules beside it (helpers.py, spec_oracle.py, simt_ext.py) import as
``import helpers`` from every folder. The folders have no ``__init__.py``: pytest's default import mode
(prepend) imports each test file by its basename, with its own folder on sys.path (a test imports a
sibling of its folder as ``from test_patch import ...``), so basenames must stay unique across folders.
"""
from __future__ import annotations

import importlib.util
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when the
# kernels are defined, so it must be set before fpet_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fpet_kernels as fk  # noqa: E402

import simt_ext  # noqa: E402
from helpers import REQUIRE_EXTENSION, is_live, missing_message  # noqa: E402

# The backends that run on CPU tensors, from the package's own list of backends: "reference", the
# C++ "cpu" kernels, and "triton" in Triton's interpreter (TRITON_INTERPRET=1, set above when there
# is no GPU). GPU tensors are tested in kernels/test_gpu.py. FPET_TEST_BACKENDS=a,b restricts the list.
_ON_CPU = ("reference", "cpu") + (("triton",) if importlib.util.find_spec("triton") is not None
                                   and os.environ.get("TRITON_INTERPRET") == "1" else ())
_ONLY = [b.strip() for b in os.environ.get("FPET_TEST_BACKENDS", "").split(",") if b.strip()]
CPU_BACKENDS = tuple(k for k in fk.backends()["live"] if k in _ON_CPU and (not _ONLY or k in _ONLY or k == "reference"))
KERNEL_BACKENDS = tuple(k for k in CPU_BACKENDS if k != "reference")

_MISSING_KEY = pytest.StashKey[str]()


def _use_backend(request, name: str) -> str:
    if not is_live(name):
        if REQUIRE_EXTENSION:
            # Fail in the call phase (a FAILED test, not a setup error), see pytest_runtest_call.
            request.node.stash[_MISSING_KEY] = missing_message(name)
        else:
            pytest.skip(missing_message(name))
    return name


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    """Every backend that computes on CPU tensors ("reference" always)."""
    return _use_backend(request, request.param)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    """Compiled backends only: their results are compared against the reference."""
    return _use_backend(request, request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    msg = item.stash.get(_MISSING_KEY, None)
    if msg is not None:
        pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; an FPET_BACKEND from the shell must not leak in."""
    monkeypatch.delenv("FPET_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CUDA kernels' source compiled for the host (csrc/emu/, torch.ops.fpet_simt): run one thread at
# a time in forward and in reverse order within every phase (a race shows as a different result),
# with 256 threads per block (the GPU's) and with 64 (every thread-strided loop wraps), seeing 4
# multiprocessors (small batches split their channels over several blocks, as on a GPU) or 1.
# (order, threads, sms)
SIMT_CONFIGS = [pytest.param((0, 256, 4), id="fwd-256-sm4"), pytest.param((1, 256, 4), id="rev-256-sm4"),
                pytest.param((0, 64, 1), id="fwd-64-sm1"), pytest.param((1, 64, 4), id="rev-64-sm4")]


@pytest.fixture
def simt_ops():
    """``torch.ops.fpet_simt`` (tests/simt_ext.py builds it on first use; skipped when it cannot be
    built, failing under FPET_REQUIRE_EXTENSION=1); its configuration is reset to the default
    (0, 256, 4) afterwards."""
    if not simt_ext.live():
        msg = simt_ext.load() or "torch.ops.fpet_simt has no kernels"
        if REQUIRE_EXTENSION:
            pytest.fail(f"FPET_REQUIRE_EXTENSION=1: {msg}", pytrace=False)
        pytest.skip(msg)
    yield torch.ops.fpet_simt
    torch.ops.fpet_simt.configure(0, 256, 4)


@pytest.fixture(params=SIMT_CONFIGS)
def simt(request, simt_ops):
    """``torch.ops.fpet_simt`` configured for one thread order, block size and multiprocessor count."""
    simt_ops.configure(*request.param)
    return simt_ops
