"""The LoRA deltas on a second core, overlapped with the base GEMM (kernels/lora_worker.c).

In a decode step of many adapters every token reads its own adapter's rows from memory: with 32
tokens of rank-32 adapters on the benchmark's model, more bytes than the base weights. On one
thread the BGMV kernel can only run after oneDNN's GEMM of the same module, so those reads add
to the step. Here, per module, the engine's thread posts the deltas' work (``submit``) before
the base GEMM, a worker thread computes them into a float32 buffer while the GEMM runs, and
``join`` adds them into the GEMM's output, computing whatever the worker had not taken: the
engine's thread never waits for a worker that did not start (a busy or descheduled core costs
only the overlap).

Used on the CPU pool path where the process has a core to spare: its CPU affinity exceeds
torch's intra-op threads (a worker beside a GEMM thread on one core slows both).
``EngineConfig.lora_worker`` forces it on or off. Results equal the kernel's up to float32
summation order (the deltas are summed apart from y, then added; bf16 y is rounded once).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from itertools import accumulate

import torch
from torch import Tensor

from serving.engine import kernels

MAX_MODULES = 4  # modules per job (lora_worker.c)


def spare_core() -> bool:
    """Whether this process may run on more cores than torch's intra-op threads use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


class LoraWorker:
    """One worker thread for deltas of ``dtype`` (float32 or bfloat16) rows.

    Per group of modules reading the same x (q, k, v; gate, up): ``submit(x, wheres,
    d_outs)`` before the first one's base GEMM, then ``join(i, y)`` after module i's. One job
    is outstanding at a time; ``finish()`` ends one whatever was joined (a failed forward).
    """

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        if dtype not in kernels.NATIVE_DTYPES:
            raise ValueError(f"the LoRA worker takes float32 or bfloat16, not {dtype}")
        handle = lib.lora_worker_open(int(dtype == torch.bfloat16))
        if not handle:
            raise OSError("could not start the LoRA worker thread")
        self.lib, self.handle, self.dtype = lib, handle, dtype
        self._delta = torch.empty(0)  # float32 scratch, grown to the largest job
        # The posted job's tensors (kept alive until it ends) and the modules not yet joined.
        self._job: tuple[Tensor, list[Tensor], list[int]] | None = None
        self._left: set[int] = set()
        self._close = weakref.finalize(self, lib.lora_worker_close, handle)

    @classmethod
    def maybe(cls, enabled: bool | None, dtype: torch.dtype) -> LoraWorker | None:
        """A worker where ``enabled`` (None: where a core is spare) and the library loads; else
        None, and the engine's thread runs the kernel itself."""
        if enabled is False or (enabled is None and not spare_core()):
            return None
        lib = kernels.lora_worker_lib()
        if lib is None:
            return None
        try:
            return cls(lib, dtype)
        except OSError:
            return None

    @property
    def pending(self) -> bool:
        return self._job is not None

    def submit(self, x: Tensor, wheres: list[Tensor], d_outs: list[int]) -> None:
        """Post delta_i[t] = B_t^T (A_t x[t]) + bias_t for every token of each ``wheres[i]``
        (the BGMV kernel's [4, T] table of module i, output width d_outs[i]); returns at
        once."""
        if self._job is not None:
            raise RuntimeError("a LoRA job is already outstanding: join it first")
        T = x.shape[0]
        if x.dim() != 2 or x.stride(1) != 1 or x.dtype != self.dtype or x.device.type != "cpu" \
                or not 1 <= len(wheres) <= MAX_MODULES or len(d_outs) != len(wheres) \
                or any(w.shape != (4, T) or w.dtype != torch.int64 or not w.is_contiguous()
                       for w in wheres):
            raise ValueError(f"LoRA worker: x {tuple(x.shape)} {x.dtype} and "
                             f"{len(wheres)} tables do not match")
        if self._delta.numel() < T * sum(d_outs):
            self._delta = torch.empty(T * sum(d_outs), dtype=torch.float32)
        # ctypes arrays, not tensors: a submit per module group per layer is on the hot path.
        Addrs = ctypes.c_int64 * len(wheres)
        base, size = self._delta.data_ptr(), self._delta.element_size()
        starts = [0, *accumulate(T * d for d in d_outs[:-1])]  # each module's delta rows
        if self.lib.lora_submit(self.handle, T, x.data_ptr(), x.stride(0), x.shape[1],
                                len(wheres), Addrs(*(w.data_ptr() for w in wheres)),
                                Addrs(*d_outs), Addrs(*(base + s * size for s in starts))) != 0:
            raise MemoryError("LoRA worker: no memory for the scratch rows")
        self._job = (x, list(wheres), list(d_outs))
        self._left = set(range(len(wheres)))

    def join(self, i: int, y: Tensor) -> Tensor:
        """Finish module i of the posted job and add its deltas into y [T, d_outs[i]] in place
        (bf16 rounded once). The job ends when its last module is joined."""
        if self._job is None or i not in self._left:
            raise RuntimeError(f"no LoRA job module {i} to join")
        x, _, d_outs = self._job
        if y.shape != (x.shape[0], d_outs[i]) or y.stride(1) != 1 or y.dtype != self.dtype \
                or y.device.type != "cpu":
            self.finish()
            raise ValueError(f"LoRA worker: y {tuple(y.shape)} {y.dtype} does not match "
                             f"[{x.shape[0]}, {d_outs[i]}] {self.dtype}")
        self.lib.lora_join(self.handle, i, y.data_ptr(), y.stride(0))
        self._left.discard(i)
        if not self._left:
            self._job = None
        return y

    def finish(self) -> None:
        """End the posted job, if any, dropping the deltas not joined."""
        if self._job is not None:
            self.lib.lora_join(self.handle, 0, None, 0)
            self._job, self._left = None, set()

    def stats(self) -> dict[str, int]:
        """Chunks of tokens computed by the worker thread and by the engine's thread."""
        out = (ctypes.c_int64 * 2)()
        if self._close.alive:
            self.lib.lora_worker_stats(self.handle, out)
        return {"worker_chunks": out[0], "caller_chunks": out[1]}

    def close(self) -> None:
        """Stop and join the thread (ending any outstanding job first). Idempotent."""
        if self._close.alive:
            self.finish()
        self._close()
