"""The host adapter store: every registered adapter in one normalized low-rank form.

LoRA, MoS and Hydra all reduce to per-module (A [r, d_in], B [d_out, r] with the scaling
folded in, optional bias [d_out]). Each adapter is kept as one flat tensor plus a layout,
which is exactly what gets copied into pool pages when it becomes resident. B is stored
transposed (B^T [r, d_out] contiguous), the orientation the operator's slot buffers keep, so
loading an adapter into a slot is a plain copy of rows.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from serving.engine.layout import ModelShape

ModuleKey = tuple[int, str]  # (layer index, module name)


@dataclass(frozen=True)
class Slice:
    offset: int
    rank: int
    d_in: int
    d_out: int
    has_bias: bool

    @property
    def numel(self) -> int:
        return self.rank * (self.d_in + self.d_out) + (self.d_out if self.has_bias else 0)


@dataclass
class HostAdapter:
    name: str
    flat: torch.Tensor
    layout: dict[ModuleKey, Slice]
    method: str = "lora"
    source: str = ""

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    @property
    def max_rank(self) -> int:
        return max((s.rank for s in self.layout.values()), default=0)


def unpack(flat: torch.Tensor, s: Slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Views (A, B, bias) of one module inside a flat adapter buffer."""
    a_end = s.offset + s.rank * s.d_in
    b_end = a_end + s.d_out * s.rank
    A = flat[s.offset:a_end].view(s.rank, s.d_in)
    B = flat[a_end:b_end].view(s.rank, s.d_out).T  # stored as B^T
    bias = flat[b_end:b_end + s.d_out] if s.has_bias else None
    return A, B, bias


def build_host_adapter(
    name: str,
    weights: Mapping[ModuleKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    shape: ModelShape,
    dtype: torch.dtype = torch.float32,
    method: str = "lora",
    source: str = "",
) -> HostAdapter:
    """Validate shapes against the base and finiteness, then pack into one flat tensor."""
    if not weights:
        raise AdapterError(f"adapter {name!r} has no weights")
    dims = shape.module_dims()
    layout: dict[ModuleKey, Slice] = {}
    parts: list[torch.Tensor] = []
    offset = 0
    for (layer, module), (A, B, bias) in sorted(weights.items()):
        if module not in dims or not 0 <= layer < shape.num_layers:
            raise IncompatibleAdapterError(
                f"adapter {name!r} targets layers.{layer}.{module}, which the base model lacks"
            )
        d_in, d_out = dims[module]
        r = A.shape[0]
        if A.shape != (r, d_in) or B.shape != (d_out, r) or (
            bias is not None and bias.shape != (d_out,)
        ):
            raise IncompatibleAdapterError(
                f"adapter {name!r}: layers.{layer}.{module} has A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}; the base needs A (r, {d_in}) and B ({d_out}, r)"
            )
        tensors = [A, B.T] + ([bias] if bias is not None else [])
        for t in tensors:
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise AdapterError(f"adapter {name!r}: layers.{layer}.{module} has "
                                   "non-finite or non-float values")
        s = Slice(offset, r, d_in, d_out, bias is not None)
        layout[(layer, module)] = s
        parts.extend(t.detach().reshape(-1).to(dtype) for t in tensors)
        offset += s.numel
    flat = torch.cat(parts).contiguous()
    if torch.cuda.is_available():
        flat = flat.pin_memory()  # faster, asynchronous host-to-device copies
    return HostAdapter(name, flat, layout, method, source)


class AdapterStore:
    """Thread-safe name -> HostAdapter map (thousands of adapters fit in host memory)."""

    def __init__(self) -> None:
        self._adapters: dict[str, HostAdapter] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change so caches keyed by name can notice

    def put(self, adapter: HostAdapter) -> None:
        with self._lock:
            self._adapters[adapter.name] = adapter
            self.version += 1

    def get(self, name: str) -> HostAdapter | None:
        return self._adapters.get(name)

    def remove(self, name: str) -> HostAdapter | None:
        with self._lock:
            self.version += 1
            return self._adapters.pop(name, None)

    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())
