"""The native kernels' tests (LoRA, decode attention) need a C compiler to build them.

A machine without one serves through the torch operator, whose tests run everywhere, so there
the kernels' tests skip with the reason. Under CI (``CI`` set) they fail instead: CI's machine
has gcc, and a skip there would hide a kernel that stopped building.
"""

from __future__ import annotations

import os

import pytest

from serving.engine import kernels


def require_native() -> None:
    if kernels.compiler_available():
        return
    reason = "no C compiler: the native kernels cannot be built here"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must build it)")
    pytest.skip(reason)
