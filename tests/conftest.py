"""Backend parametrization for the whole suite.

Tests take the ``backend`` fixture (every backend that runs on CPU tensors: "reference" and the
C++ "cpu" kernels) or the ``kernel_backend`` fixture (compiled backends only, for comparisons
against the reference). A backend that is not live in this install is skipped, unless
``FPET_REQUIRE_EXTENSION=1`` (CI): then every test that needs it FAILS, saying the extension did
not build.
"""
from __future__ import annotations

import pytest
import torch

import fpet_kernels as fk

from helpers import REQUIRE_EXTENSION, is_live, missing_message

# The backends that run on CPU tensors, from the package's own list of backends. "triton" runs on
# CPU tensors only under TRITON_INTERPRET=1, and "cuda" needs a GPU: neither is exercised here.
CPU_BACKENDS = tuple(k for k in fk.backends()["live"] if k in ("reference", "cpu"))
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
