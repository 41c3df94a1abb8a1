"""Build the native kernels ahead of time: ``python -m serving.engine.kernels``.

Prints the library's path; exits 1 with the compiler's message when the build fails (the
engine would then fall back to its torch operator at run time).
"""

from __future__ import annotations

import sys

from serving.engine.kernels import KernelBuildError, NativeLib


def main() -> int:
    try:
        print(NativeLib().build())
    except KernelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
