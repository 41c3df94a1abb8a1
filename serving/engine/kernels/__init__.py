"""Native CPU kernels of the engine, built from C on first use and called through ctypes.

The batched LoRA operator's torch path spends most of a multi-adapter decode step launching
small ops (a gather, a GEMM pair per rank group, a scatter): about 200 us a module on CPU for
work that reads a few hundred KiB. ``bgmv.c`` does the same in one call of about 10 us. It is
plain C with no torch headers, so it builds in under a second with the system compiler (a
torch extension would take a minute), and one build serves every x86-64 CPU (target_clones).

Where no compiler is found, the build fails, or ``ADAPTERHUB_NATIVE_KERNELS=0``, ``bgmv_lib()``
returns None once with a warning and the operator keeps its torch paths, which give the same
results. Builds are cached by a hash of the source, compiler and flags in
``ADAPTERHUB_KERNELS_DIR`` (default ``~/.cache/adapterhub/kernels``); ``python -m
serving.engine.kernels`` builds ahead of time (setup and the container image do). Where no
compiler is found, a library built earlier from the same source is used (the image's).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KernelBuildError", "NativeLib", "bgmv", "bgmv_lib", "bgmv_usable",
           "compiler_available"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bgmv.c")
ABI = 2  # bgmv_abi() of the source this loader calls
FLAGS = ("-O3", "-std=gnu11", "-fopenmp-simd", "-shared", "-fPIC")
# Without target_clones (a libc without ifunc, a compiler without the attribute): one build
# for the compiler's default ISA, slower but the same results.
FALLBACK_FLAGS = ("-DBGMV_NO_CLONES",)
_OFF = {"0", "false", "no", "off"}


class KernelBuildError(RuntimeError):
    """The C compiler is missing or refused the source; the message carries its output."""


def default_dir() -> Path:
    env = os.environ.get("ADAPTERHUB_KERNELS_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapterhub" / "kernels"


def default_compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    cmd = shlex.split(cc)
    if cmd and shutil.which(cmd[0]):
        return cmd
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if found is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    return [found]


def compiler_available() -> bool:
    try:
        default_compiler()
    except KernelBuildError:
        return False
    return True


class NativeLib:
    """One shared library built from ``source`` into ``directory``, loaded once."""

    def __init__(self, directory: Path | None = None, compiler: list[str] | None = None,
                 source: Path = SOURCE):
        self.directory = Path(directory) if directory is not None else default_dir()
        self.compiler = compiler
        self.source = source
        self._lock = threading.Lock()
        self._loaded: ctypes.CDLL | None = None
        self._failed: str | None = None

    def _source_hash(self) -> str:
        return hashlib.sha256(self.source.read_bytes()).hexdigest()[:12]

    def _keys(self, cmd: list[str]) -> list[tuple[tuple[str, ...], str]]:
        """(flags, cache key) of each build to try; the key covers source, compiler, flags."""
        try:
            version = subprocess.run([*cmd, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"C compiler {cmd[0]!r} does not run: {exc}") from exc
        source = self._source_hash()
        return [(flags, f"{source}-"
                 + hashlib.sha256(" ".join([*cmd, *flags, version]).encode()).hexdigest()[:12])
                for flags in (FLAGS, FLAGS + FALLBACK_FLAGS)]

    def prebuilt(self) -> Path | None:
        """A library built earlier from this very source, by whatever compiler: what a
        container image ships, where the runtime has no compiler."""
        found = sorted(self.directory.glob(f"{self.source.stem}-{self._source_hash()}-*.so"))
        return found[0] if found else None

    def build(self) -> Path:
        """Compile (or find the cached build) and return the library's path."""
        try:
            cmd = self.compiler or default_compiler()
            keys = self._keys(cmd)
        except KernelBuildError:
            if self.compiler is None and (found := self.prebuilt()) is not None:
                return found
            raise
        errors = []
        for flags, key in keys:
            path = self.directory / f"{self.source.stem}-{key}.so"
            if path.exists():
                return path
            self.directory.mkdir(parents=True, exist_ok=True)
            # Compile beside the target and rename: a concurrent build or a reader never sees
            # a half-written library.
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.directory)
            os.close(fd)
            try:
                done = subprocess.run([*cmd, *flags, str(self.source), "-o", tmp],
                                      capture_output=True, text=True, timeout=120)
                if done.returncode == 0:
                    os.replace(tmp, path)
                    return path
                errors.append(done.stderr.strip() or f"exit status {done.returncode}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        raise KernelBuildError(f"building {self.source.name} with {cmd[0]} failed:\n"
                               + "\n".join(errors)[-2000:])

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or None (with one warning) when it cannot be had."""
        if self._loaded is not None or self._failed is not None:
            return self._loaded
        with self._lock:
            if self._loaded is None and self._failed is None:
                try:
                    self._loaded = self._open(self.build())
                except (KernelBuildError, OSError) as exc:
                    self._failed = str(exc)
                    log.warning("native LoRA kernel unavailable, using the torch operator: %s",
                                exc)
        return self._loaded

    @staticmethod
    def _open(path: Path) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(path))
        if lib.bgmv_abi() != ABI:
            raise OSError(f"{path} has ABI {lib.bgmv_abi()}, this loader needs {ABI}")
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.bgmv_f32.restype = None
        lib.bgmv_f32.argtypes = [i64, ptr, i64, ptr, i64, i64, i64, ptr]
        return lib


_default = NativeLib()


def enabled() -> bool:
    return os.environ.get("ADAPTERHUB_NATIVE_KERNELS", "1").strip().lower() not in _OFF


def bgmv_lib() -> ctypes.CDLL | None:
    """The process's kernel library, or None when disabled or unavailable."""
    return _default.load() if enabled() else None


def bgmv_usable(*tensors: Tensor) -> bool:
    """Whether ``bgmv`` takes these tensors (x, y and the weights): float32 on the CPU, 2-D
    with unit stride along features, and no autograd to feed (the kernel records no graph)."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2
           or t.stride(1) != 1 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return bgmv_lib() is not None


def bgmv(lib: ctypes.CDLL, y: Tensor, x: Tensor, where: Tensor) -> Tensor:
    """y[t] += B_t^T (A_t x[t]) + bias_t in place, for every token t with a rank.

    ``where`` is int64 [4, T]: per token the address of its adapter's A [r, d_in] and B^T
    [r, d_out] (contiguous float32 rows), of its bias [d_out] (0: none), and r (0: no delta).
    x [T, d_in] and y [T, d_out] must pass ``bgmv_usable``. The kernel dereferences the
    addresses unchecked: they must point into live tensors the caller keeps alive.
    """
    T = x.shape[0]
    if y.shape[0] != T or where.shape != (4, T) or where.dtype != torch.int64 \
            or not where.is_contiguous():
        raise ValueError(f"bgmv: x {tuple(x.shape)}, y {tuple(y.shape)} and where "
                         f"{tuple(where.shape)} {where.dtype} do not match")
    if T:
        lib.bgmv_f32(T, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[1],
                     y.shape[1], where.data_ptr())
    return y
