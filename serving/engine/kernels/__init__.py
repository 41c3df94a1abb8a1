"""Native CPU kernels of the engine, built from C on first use and called through ctypes.

- ``bgmv.c``: the batched LoRA operator. Its torch path spends most of a multi-adapter decode
  step launching small ops (a gather, a GEMM pair per rank group, a scatter): about 200 us a
  module on CPU for work that reads a few hundred KiB; the kernel does the same in one call of
  about 10 us.
- ``paged_decode.c``: attention reading K/V in place from the pool's pages, every token of a
  step (decode and prefill) as one query over its context, one call per layer. The torch path
  gathers every sequence's pages into a padded copy and masks it, per layer and step.
- ``pointwise.c``: RMSNorm and RoPE, one pass each where torch makes five or six.
- ``lora_worker.c``: the kernel's work on a second thread, while the engine's thread runs the
  base GEMM (lora_worker.py).

Each takes float32 or bfloat16 (``NATIVE_DTYPES``); in bf16 the sums run in float32 and each
output is rounded once (RMSNorm and RoPE round where HF's bf16 ops do), so bf16 reads half the
bytes at float32's accuracy of the sums.

Each is plain C with no torch headers (only ``elements.h`` and ``lora_rows.h``), so it builds
in under a second with the system compiler (a torch extension would take a minute), and one
build serves every x86-64 CPU (target_clones). Each is its own library, so one that fails to
build leaves the others.

Where no compiler is found, the build fails, or ``ADAPTERHUB_NATIVE_KERNELS=0``, ``bgmv_lib()``
and ``paged_decode_lib()`` return None once with a warning and the engine keeps its torch
paths, which give the same results. Builds are cached by a hash of the source, compiler and
flags in ``ADAPTERHUB_KERNELS_DIR`` (default ``~/.cache/adapterhub/kernels``); ``python -m
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BGMV", "KERNELS", "LORA_WORKER", "NATIVE_DTYPES", "PAGED_DECODE", "POINTWISE",
           "KernelBuildError", "KernelSpec", "NativeLib", "bgmv", "bgmv_lib", "bgmv_usable",
           "compiler_available", "cpu_inference", "env_flag", "lora_worker_lib", "paged_decode",
           "paged_decode_lib", "pointwise_lib", "pointwise_lib_for", "pointwise_usable",
           "rmsnorm", "rope"]

log = logging.getLogger(__name__)

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


@dataclass(frozen=True)
class KernelSpec:
    """One C source built into its own library: the ABI version this loader calls (the
    library's ``<stem>_abi()``) and the functions it declares."""

    source: Path
    abi: int
    functions: dict  # name -> (restype, argtypes)
    what: str  # for the fallback warning

    @property
    def stem(self) -> str:
        return self.source.stem


_HERE = Path(__file__).parent
_BGMV_ARGS = [_i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _ptr]
BGMV = KernelSpec(_HERE / "bgmv.c", 3,
                  {"bgmv_f32": (None, _BGMV_ARGS), "bgmv_bf16": (ctypes.c_int, _BGMV_ARGS)},
                  "LoRA kernel unavailable, using the torch operator")
_PAGED_DECODE_ARGS = [_i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64,
                      _ptr, _f32]
PAGED_DECODE = KernelSpec(
    _HERE / "paged_decode.c", 2,
    {"paged_decode_f32": (ctypes.c_int, _PAGED_DECODE_ARGS),
     "paged_decode_bf16": (ctypes.c_int, _PAGED_DECODE_ARGS)},
    "paged attention kernel unavailable, using torch attention")
_RMSNORM_ARGS = [_i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _f32]
_ROPE_ARGS = [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr]
POINTWISE = KernelSpec(
    _HERE / "pointwise.c", 2,
    {"rmsnorm_f32": (None, _RMSNORM_ARGS), "rope_f32": (None, _ROPE_ARGS),
     "rmsnorm_bf16": (None, _RMSNORM_ARGS), "rope_bf16": (None, _ROPE_ARGS)},
    "RMSNorm/RoPE kernel unavailable, using torch ops")
LORA_WORKER = KernelSpec(
    _HERE / "lora_worker.c", 1,
    {"lora_worker_open": (_ptr, [ctypes.c_int]),
     "lora_submit": (ctypes.c_int, [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr]),
     "lora_join": (None, [_ptr, _i64, _ptr, _i64]),
     "lora_worker_stats": (None, [_ptr, _ptr]), "lora_worker_close": (None, [_ptr])},
    "LoRA worker thread unavailable, the engine's thread computes every delta")
KERNELS = (BGMV, PAGED_DECODE, POINTWISE, LORA_WORKER)
FLAGS = ("-O3", "-std=gnu11", "-fopenmp-simd", "-shared", "-fPIC")
# Without target_clones (a libc without ifunc, a compiler without the attribute): one build
# for the compiler's default ISA, slower but the same results.
FALLBACK_FLAGS = ("-DBGMV_NO_CLONES",)
# After the source, so the linker keeps them (floorf in paged_decode.c's baseline clone; the
# LoRA worker's thread).
LIBS = ("-lm", "-pthread")
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
    """One shared library built from ``spec``'s source (or ``source``, a stand-in for tests)
    into ``directory``, loaded once."""

    def __init__(self, directory: Path | None = None, compiler: list[str] | None = None,
                 source: Path | None = None, spec: KernelSpec = BGMV):
        self.directory = Path(directory) if directory is not None else default_dir()
        self.compiler = compiler
        self.spec = spec
        self.source = source or spec.source
        self._lock = threading.Lock()
        self._loaded: ctypes.CDLL | None = None
        self._failed: str | None = None

    def _source_hash(self) -> str:
        """Of the source and the headers beside it (elements.h), which it may include."""
        digest = hashlib.sha256(self.source.read_bytes())
        for header in sorted(self.source.parent.glob("*.h")):
            digest.update(header.read_bytes())
        return digest.hexdigest()[:12]

    def _keys(self, cmd: list[str]) -> list[tuple[tuple[str, ...], str]]:
        """(flags, cache key) of each build to try; the key covers source, compiler, flags and
        libraries."""
        try:
            version = subprocess.run([*cmd, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"C compiler {cmd[0]!r} does not run: {exc}") from exc
        source = self._source_hash()
        keys = []
        for flags in (FLAGS, FLAGS + FALLBACK_FLAGS):
            build = " ".join([*cmd, *flags, *LIBS, version])
            keys.append((flags, f"{source}-{hashlib.sha256(build.encode()).hexdigest()[:12]}"))
        return keys

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
                done = subprocess.run([*cmd, *flags, str(self.source), "-o", tmp, *LIBS],
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
                    log.warning("native %s: %s", self.spec.what, exc)
        return self._loaded

    def _open(self, path: Path) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(path))
        try:
            abi = getattr(lib, f"{self.spec.stem}_abi")()
            if abi != self.spec.abi:
                raise OSError(f"{path} has ABI {abi}, this loader needs {self.spec.abi}")
            for name, (restype, argtypes) in self.spec.functions.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except AttributeError as exc:  # a symbol missing: not this kernel's library
            raise OSError(f"{path}: {exc}") from exc
        return lib


_default = NativeLib()
_paged_decode = NativeLib(spec=PAGED_DECODE)
_pointwise = NativeLib(spec=POINTWISE)
_lora_worker = NativeLib(spec=LORA_WORKER)


def env_flag(name: str) -> bool:
    """An on-by-default switch: off when the variable says 0, false, no or off."""
    return os.environ.get(name, "1").strip().lower() not in _OFF


def enabled() -> bool:
    return env_flag("ADAPTERHUB_NATIVE_KERNELS")


# The dtypes every native kernel and the packed weights take: float32, and bfloat16 (the serving
# dtype; computed in float32, stored and read at half the bytes).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def cpu_inference(*tensors: Tensor) -> bool:
    """Every tensor on the CPU in one of ``NATIVE_DTYPES`` (all the same), and none feeding
    autograd (the kernels record no graph): what each native path and the packed weights
    require."""
    if not tensors or tensors[0].dtype not in NATIVE_DTYPES:
        return False
    if any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def bgmv_lib() -> ctypes.CDLL | None:
    """The process's kernel library, or None when disabled or unavailable."""
    return _default.load() if enabled() else None


def paged_decode_lib() -> ctypes.CDLL | None:
    """The process's paged decode attention library, or None when disabled or unavailable."""
    return _paged_decode.load() if enabled() else None


def pointwise_lib() -> ctypes.CDLL | None:
    """The process's RMSNorm/RoPE library, or None when disabled or unavailable."""
    return _pointwise.load() if enabled() else None


def lora_worker_lib() -> ctypes.CDLL | None:
    """The process's LoRA worker library, or None when disabled or unavailable."""
    return _lora_worker.load() if enabled() else None


def pointwise_usable(*tensors: Tensor) -> bool:
    """Whether the pointwise kernels take these tensors: all float32 or all bfloat16 on the CPU,
    unit stride along the last dimension, and no autograd to feed."""
    return all(t.stride(-1) == 1 for t in tensors) and cpu_inference(*tensors)


def pointwise_lib_for(*tensors: Tensor) -> ctypes.CDLL | None:
    """The RMSNorm/RoPE library where it serves these tensors (``pointwise_usable``), else None
    (the torch ops)."""
    return pointwise_lib() if pointwise_usable(*tensors) else None


def rmsnorm(lib: ctypes.CDLL, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension of x [rows, dim] (rows may be
    strided), as HF's LlamaRMSNorm (in bf16 with its casts). Tensors must pass
    ``pointwise_usable``."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or not weight.is_contiguous() \
            or weight.dtype != x.dtype or x.dtype not in NATIVE_DTYPES:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} {x.dtype} and weight "
                         f"{tuple(weight.shape)} {weight.dtype} do not match")
    out = torch.empty(x.shape, dtype=x.dtype)
    if x.shape[0]:
        fn = lib.rmsnorm_bf16 if x.dtype == torch.bfloat16 else lib.rmsnorm_f32
        fn(x.shape[0], x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(),
           out.stride(0), x.shape[1], eps)
    return out


def rope(lib: ctypes.CDLL, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotate-half RoPE of x [rows, heads, head_dim] by cos/sin [rows, head_dim]; a new
    tensor. Tensors must pass ``pointwise_usable``."""
    rows, heads, head_dim = x.shape
    if cos.shape != (rows, head_dim) or sin.shape != cos.shape or head_dim % 2 \
            or not x.dtype == cos.dtype == sin.dtype or x.dtype not in NATIVE_DTYPES:
        raise ValueError(f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)} and sin "
                         f"{tuple(sin.shape)} do not match")
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if rows:
        fn = lib.rope_bf16 if x.dtype == torch.bfloat16 else lib.rope_f32
        fn(rows, heads, head_dim, x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr())
    return out


def bgmv_usable(*tensors: Tensor) -> bool:
    """Whether ``bgmv`` takes these tensors (x, y and the weights): all float32 or all bfloat16
    on the CPU, 2-D with unit stride along features, and no autograd to feed (the kernel records
    no graph)."""
    if any(t.dim() != 2 or t.stride(1) != 1 for t in tensors):
        return False
    return cpu_inference(*tensors) and bgmv_lib() is not None


def bgmv(lib: ctypes.CDLL, y: Tensor, x: Tensor, where: Tensor) -> Tensor:
    """y[t] += B_t^T (A_t x[t]) + bias_t in place, for every token t with a rank.

    ``where`` is int64 [4, T]: per token the address of its adapter's A [r, d_in] and B^T
    [r, d_out] (contiguous rows of x's dtype), of its bias [d_out] (0: none), and r (0: no
    delta). x [T, d_in] and y [T, d_out] must pass ``bgmv_usable``. The kernel dereferences the
    addresses unchecked: they must point into live tensors of x's dtype the caller keeps alive.
    """
    T = x.shape[0]
    if y.shape[0] != T or where.shape != (4, T) or where.dtype != torch.int64 \
            or not where.is_contiguous():
        raise ValueError(f"bgmv: x {tuple(x.shape)}, y {tuple(y.shape)} and where "
                         f"{tuple(where.shape)} {where.dtype} do not match")
    if x.dtype != y.dtype:
        raise ValueError(f"bgmv: x is {x.dtype} but y is {y.dtype}")
    if T:
        args = (T, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[1], y.shape[1],
                where.data_ptr())
        if x.dtype == torch.bfloat16:
            if lib.bgmv_bf16(*args) != 0:
                raise MemoryError("bgmv: no memory for the scratch rows")
        else:
            lib.bgmv_f32(*args)
    return y


def paged_decode(lib: ctypes.CDLL, q: Tensor, kv_layer: Tensor, tables: Tensor, ctx_lens: Tensor,
                 scale: float, window: int | None) -> Tensor:
    """Attention of each query token to the first ``ctx_lens[i]`` positions of its sequence's
    cache, read in place.

    q [n, heads, head_dim] (float32 or bfloat16, CPU, contiguous); ``kv_layer`` one layer of the
    pool view in q's dtype,
    [pages, 2, block_size, kv_heads, head_dim] (each page's block contiguous); ``tables``
    int64 [n, blocks] the pages of each query's sequence; ``ctx_lens`` int64 [n] the positions
    it sees, its own included (a decode token: the whole context; a prefill token: its
    position + 1), whose K/V must already be written. A ``window`` keeps the last ``window``
    positions (HF's sliding window). Returns [n, heads, head_dim].

    The kernel dereferences page ids unchecked, so this checks that every id in ``tables`` is
    a page of ``kv_layer`` and every context fits its table.
    """
    n, heads, head_dim = q.shape
    pages, two, block, kv_heads, hd = kv_layer.shape
    if two != 2 or hd != head_dim or heads % kv_heads or tables.dim() != 2 \
            or tables.shape[0] != n or ctx_lens.shape != (n,):
        raise ValueError(f"paged_decode: q {tuple(q.shape)}, kv {tuple(kv_layer.shape)}, tables "
                         f"{tuple(tables.shape)} and ctx_lens {tuple(ctx_lens.shape)} do not match")
    if kv_layer[0].stride() != (block * kv_heads * hd, kv_heads * hd, hd, 1):
        raise ValueError("paged_decode: each page of kv_layer must be contiguous")
    if not (q.dtype == kv_layer.dtype and q.dtype in NATIVE_DTYPES and q.device.type == "cpu"
            == kv_layer.device.type and tables.dtype == ctx_lens.dtype == torch.int64):
        raise ValueError("paged_decode: q and kv_layer must be float32 or bfloat16 (the same) on "
                         "the CPU, tables and ctx_lens int64")
    q = q.contiguous()
    tables, ctx_lens = tables.contiguous(), ctx_lens.contiguous()
    out = torch.empty_like(q)
    if not n:
        return out
    lo, hi = torch.aminmax(ctx_lens)
    if int(lo) < 1 or int(hi) > tables.shape[1] * block:
        raise ValueError("paged_decode: a context is empty or longer than its block table")
    lo, hi = torch.aminmax(tables)
    if int(lo) < 0 or int(hi) >= pages:
        raise ValueError(f"paged_decode: page ids must lie in 0..{pages - 1}")
    fn = lib.paged_decode_bf16 if q.dtype == torch.bfloat16 else lib.paged_decode_f32
    rc = fn(n, q.data_ptr(), out.data_ptr(), kv_layer.data_ptr(), kv_layer.stride(0), block,
            kv_heads, heads, head_dim, window or 0, tables.data_ptr(), tables.stride(0),
            ctx_lens.data_ptr(), scale)
    if rc != 0:
        raise MemoryError("paged_decode: no memory for the score buffer")
    return out
