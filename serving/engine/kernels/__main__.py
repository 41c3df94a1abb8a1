"""Build the native kernels ahead of time: ``python -m serving.engine.kernels``.

Prints the library's path; exits 1 with the reason (the compiler's message, an unusable cache
directory) when the build fails: the engine would then fall back to its torch operator.
"""

from __future__ import annotations

import sys

from serving.engine.kernels import KernelBuildError, NativeLib


def main() -> int:
    try:
        print(NativeLib().build())
    except (KernelBuildError, OSError) as exc:  # OSError: the cache directory is unusable
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
