"""The native kernels' tests (LoRA, attention, RMSNorm/RoPE) need a C compiler to build them.

A machine without one serves through the torch operator, whose tests run everywhere, so there
the kernels' tests skip with the reason. Under CI (``CI`` set) they fail instead: CI's machine
has gcc, and a skip there would hide a kernel that stopped building.
"""

from __future__ import annotations

import os

import pytest

from serving.engine import kernels


def native_lib(load):
    """The library ``load()`` returns, once ``require_native`` passes: a compiler that is
    present but cannot build the kernel fails the test."""
    require_native()
    lib = load()
    assert lib is not None, "a C compiler is present but the kernel did not build"
    return lib


def require_native() -> None:
    if kernels.compiler_available():
        return
    reason = "no C compiler: the native kernels cannot be built here"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must build it)")
    pytest.skip(reason)
