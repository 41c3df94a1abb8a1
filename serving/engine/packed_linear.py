"""Base projection weights reordered once for oneDNN's CPU matmul (float32 or bfloat16,
inference only).

``F.linear`` on CPU is MKL's sgemm, which lays the weight out for its kernel on every call. A
serving step multiplies every weight by a few dozen rows, so that per-call work is a large share
of the step. oneDNN's matmul on a weight reordered once into its blocked layout does not redo
it. Measured here on the serving bench's model (8 layers, 512 -> 1408 and back, one thread,
AMD Zen 4), a whole-model pass of projections: 1.5x faster at 24-32 rows (a decode step), 1.7x
at 8, 1.1x at 256 (a prefill chunk); in bfloat16 (oneDNN's bf16 matmul, which F.linear also
calls) 1.5x at 8 rows, 1.15x at 32, about even from 64. Results agree with F.linear to float32
rounding (the sums run in another order); in bfloat16 they matched it exactly.

The packed copy costs the weights' bytes again; the plain weight stays, since the training
path (autograd through the base, the co-serving skeleton) and checkpoints use it.
``ADAPTERHUB_PACKED_WEIGHTS=0`` (or ``EngineConfig.packed_weights=False``) turns it off.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from serving.engine.kernels import NATIVE_DTYPES, cpu_inference, env_flag

__all__ = ["PackedWeight", "packing_enabled", "pack_weight"]

log = logging.getLogger(__name__)


def packing_enabled() -> bool:
    """oneDNN is built in and the environment does not turn packing off."""
    return env_flag("ADAPTERHUB_PACKED_WEIGHTS") and torch.backends.mkldnn.is_available()


class PackedWeight:
    """A [d_out, d_in] weight in oneDNN's layout, tied to the tensor it was made from.

    Before each use it checks that tensor is unchanged (same storage, no in-place write since
    packing) and packs again if not: a reload of the base weights is never served from a stale
    copy, and a move to shared memory (co-serving's worker process) costs one repack.
    """

    def __init__(self, weight: Tensor) -> None:
        self.source = weight
        self.packs = 0
        self._pack()

    def _pack(self) -> None:
        w = self.source
        self.version, self.data_ptr = w._version, w.data_ptr()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        self.packs += 1

    def fresh(self) -> bool:
        w = self.source
        return w._version == self.version and w.data_ptr() == self.data_ptr

    def usable(self, x: Tensor) -> bool:
        """Whether ``linear(x)`` may stand in for ``F.linear(x, weight)``: a 2-D CPU input of the
        weight's dtype outside autograd (the packed op has no backward)."""
        return x.dim() == 2 and x.dtype == self.source.dtype and cpu_inference(x)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if not self.fresh():
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack_weight(weight: Tensor) -> PackedWeight | None:
    """The packed copy of ``weight``, or None where packing does not apply (not a float32 or
    bfloat16 CPU tensor, oneDNN missing or turned off, or the reorder failing, which is logged
    once)."""
    if weight.dtype not in NATIVE_DTYPES or weight.device.type != "cpu" or weight.dim() != 2 \
            or not packing_enabled():
        return None
    try:
        return PackedWeight(weight)
    except RuntimeError as exc:  # a torch build whose oneDNN lacks the op
        if not getattr(pack_weight, "_warned", False):
            log.warning("weight packing unavailable (%s); using F.linear", exc)
            pack_weight._warned = True
        return None
