"""Build the native kernels ahead of time: ``python -m serving.engine.kernels``.

Prints each library's path; exits 1 with the reason (the compiler's message, an unusable cache
directory) when a build fails: the engine would then fall back to its torch path for it.
"""

from __future__ import annotations

import sys

from serving.engine.kernels import KERNELS, KernelBuildError, NativeLib


def main() -> int:
    status = 0
    for spec in KERNELS:
        try:
            print(NativeLib(spec=spec).build())
        except (KernelBuildError, OSError) as exc:  # OSError: the cache directory is unusable
            print(f"error: {spec.source.name}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
