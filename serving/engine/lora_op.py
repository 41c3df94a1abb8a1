"""Heterogeneous batched LoRA: one pass adds the deltas of many adapters of mixed ranks.

Tokens of k adapters (and bare tokens, slot -1) share one forward, as in S-LoRA / Punica SGMV.
Weights are packed without padding (A rows, then B columns, slot after slot; lora_slots.py keeps
them in persistent rank bins), never padded to the largest rank. Tokens are sorted by (rank,
slot) once per step (lora_meta.py), so each distinct rank is a group of adapters whose rows are
one view. Per module and step, on the host, with no device sync:

- whole-plan dense: h = x @ A_span^T over the rows of all live slots, zero the rows of other
  slots, y += h @ B_span^T. Two plain GEMMs, no gather or scatter; taken when the rows are few
  (sum_r <= 32) or nearly all used (T * sum_r <= 1.25 * sum_t r_t: in practice one adapter).
- otherwise per rank group (the only Python loop is over distinct ranks, plus over adapters in
  ``loop``), by cost (``_group_path``): ``grouped_mm`` where it is one native kernel (CUDA bf16,
  sm90+); ``dense`` (the same masked pair over the group's rows) where each adapter has a token
  or two and a GEMM per adapter would be launch overhead; ``loop``, a GEMM pair per adapter with
  tokens on views of its rows, for long segments. On CPU torch's grouped_mm is itself a loop of
  GEMMs over every slot (idle ones too), so it is never the cheaper choice there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from serving.engine.lora_meta import LoraBatchMeta, Plan, RankGroup

__all__ = ["LoraBatchMeta", "LoraContext", "LoraWeights", "apply_lora", "lora_delta",
           "pack_lora_weights"]


@dataclass
class LoraWeights:
    """One (layer, module) for the step's adapters, packed without padding.

    ``B`` is [d_out, sum_r] but stored column-major (a transposed view of a contiguous
    [sum_r, d_out]) so that each adapter's B^T is a contiguous block of rows: that is what the
    grouped GEMM reads. Scaling is already folded into B.
    """

    A: Tensor  # [sum_r, d_in]: rows of slot 0, then slot 1, ...
    B: Tensor  # [d_out, sum_r]
    bias: Tensor | None  # [k, d_out]
    ranks: tuple[int, ...]  # per slot; 0 = the adapter does not target this module
    # Slots whose rows are kept (zero) but whose adapter does not target this module: the
    # persistent slot buffers (lora_slots.py) fix the row layout, so rank cannot say it.
    skip: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        sum_r = sum(self.ranks)
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != sum_r \
                or self.B.shape[1] != sum_r:
            raise ValueError(f"A {tuple(self.A.shape)} / B {tuple(self.B.shape)} do not match "
                             f"ranks {self.ranks}")
        if self.bias is not None and self.bias.shape != (len(self.ranks), self.B.shape[0]):
            raise ValueError(f"bias must be [k, d_out], got {tuple(self.bias.shape)}")
        self.A = self.A.contiguous()
        if not self.B.T.is_contiguous():
            self.B = self.B.T.contiguous().T

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]


def pack_lora_weights(per_adapter: Sequence[tuple[Tensor, Tensor, Tensor | None] | None]
                      ) -> LoraWeights:
    """Concatenate (A [r, d_in], B [d_out, r], bias [d_out] | None) of each slot.

    ``None`` (or r = 0) marks a slot whose adapter does not target this module. At least one
    slot must carry weights, since they define d_in and d_out.
    """
    present = [w for w in per_adapter if w is not None]
    if not present:
        raise ValueError("no slot has weights for this module: leave it out of LoraContext")
    A0, B0, _ = present[0]
    d_in, d_out = A0.shape[1], B0.shape[0]
    empty = (A0.new_empty(0, d_in), B0.new_empty(d_out, 0), None)
    entries = [w if w is not None else empty for w in per_adapter]
    for A, B, bias in entries:
        if A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1] or (
                bias is not None and bias.shape != (d_out,)):
            raise ValueError(f"inconsistent adapter shapes: A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)} for d_in={d_in}, d_out={d_out}")
    bias = None
    if any(b is not None for _, _, b in entries):
        bias = torch.stack([b if b is not None else B0.new_zeros(d_out) for _, _, b in entries])
    return LoraWeights(A=torch.cat([A for A, _, _ in entries]),
                       B=torch.cat([B.T for _, B, _ in entries]).T,
                       bias=bias, ranks=tuple(A.shape[0] for A, _, _ in entries))


# What one extra GEMM launch costs, in multiply-adds of useful work (CPU, one thread: ~5 us of
# dispatch at ~30 GMAC/s). Only the ratio between the two costs matters.
LAUNCH_MACS = 150_000
# Tests set this to run the grouped_mm path (the CUDA one) on CPU too.
FORCE_GROUPED_MM = False


@functools.cache
def _cuda_grouped_ok(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


@functools.cache
def _cuda_native_grouped(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _grouped_ok(x: Tensor, w: LoraWeights) -> bool:
    # grouped_mm's layout rule: every non-unit stride a multiple of 16 bytes.
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.A.dtype != x.dtype:
        return False
    if (w.d_in * x.element_size()) % 16 or (w.d_out * x.element_size()) % 16:
        return False
    return x.device.type != "cuda" or _cuda_grouped_ok(x.device)


def _group_path(x: Tensor, w: LoraWeights, g: RankGroup) -> str:
    """How one rank group is applied: ``grouped_mm``, ``dense`` or ``loop``.

    Where grouped_mm has a native kernel (CUDA bf16, sm90+) it is one launch for the group,
    idle slots included. Elsewhere torch runs it as a GEMM per slot (idle ones too), so it
    loses to the two alternatives, chosen by cost: ``dense`` multiplies every token of the group
    by every slot's rows and zeroes the foreign ones (two GEMMs; wins in decode, a token or two
    per adapter, where per-adapter GEMMs are all launch overhead); ``loop`` runs a GEMM pair
    per adapter with tokens, on views of its rows (wins for long prefill segments).
    """
    native = x.is_cuda and x.dtype == torch.bfloat16 and _cuda_native_grouped(x.device)
    if (FORCE_GROUPED_MM or native) and _grouped_ok(x, w):
        return "grouped_mm"
    d = w.d_in + w.d_out
    dense = g.num_tokens * g.num_adapters * g.rank * d
    loop = g.num_tokens * g.rank * d + 2 * len(g.live) * LAUNCH_MACS
    return "dense" if dense <= loop else "loop"


def _grouped(y: Tensor, x: Tensor, w: LoraWeights, plan: Plan) -> None:
    xs = x.contiguous() if plan.identity else x.index_select(0, plan.order)
    bt = w.B.T  # [sum_r, d_out], contiguous by construction
    for g in plan.groups:
        if isinstance(g.rows, slice):
            a, b = w.A[g.rows], bt[g.rows]
        else:
            a, b = w.A.index_select(0, g.rows), bt.index_select(0, g.rows)
        xg, r = xs[g.tokens], g.rank
        live = g.live
        path = "one" if len(live) == 1 else _group_path(x, w, g)
        if path == "one":  # one adapter with tokens: two plain GEMMs on its rows
            j = live[0][0]
            out = (xg @ a[j * r:(j + 1) * r].T) @ b[j * r:(j + 1) * r]
        elif path == "dense":
            h = xg @ a.T  # [n, slots * r]
            h.masked_fill_(g.dense_mask(), 0)
            out = h @ b
        elif path == "loop":
            out = xg.new_empty(g.num_tokens, w.d_out)
            for j, lo, hi in live:
                torch.mm(xg[lo:hi] @ a[j * r:(j + 1) * r].T, b[j * r:(j + 1) * r],
                         out=out[lo:hi])
        else:
            a = a.view(g.num_adapters, r, w.d_in).transpose(1, 2)
            b = b.view(g.num_adapters, r, w.d_out)
            h = F.grouped_mm(xg, a, offs=g.offs)  # [n, r]
            out = F.grouped_mm(h, b, offs=g.offs)  # [n, d_out]
        if plan.identity:
            y[g.tokens] += out
        else:
            y.index_add_(0, plan.order[g.tokens], out)


def _dense(y: Tensor, x: Tensor, w: LoraWeights, meta: LoraBatchMeta, plan: Plan) -> None:
    h = x @ w.A[plan.rows].T  # [T, span rows]
    mask = meta.zero_mask(plan)
    if mask is not None:
        h.masked_fill_(mask, 0)
    y.addmm_(h, w.B.T[plan.rows])


def apply_lora(y: Tensor, x: Tensor, w: LoraWeights, meta: LoraBatchMeta) -> Tensor:
    """y += B_a A_a x (+ bias_a) for each token's slot a, in place; tokens of slot -1 unchanged.

    x: [T, d_in], y: [T, d_out], in the original token order.
    """
    plan = meta.plan(w.ranks, w.skip)
    if plan.num_active:
        if plan.dense:
            _dense(y, x, w, meta, plan)
        else:
            _grouped(y, x, w, plan)
    if w.bias is not None and meta.valid_idx.numel():
        if meta.all_valid:
            y += w.bias.index_select(0, meta.slots)
        else:
            y.index_add_(0, meta.valid_idx, w.bias.index_select(0, meta.valid_slots))
    return y


def lora_delta(x: Tensor, w: LoraWeights, meta: LoraBatchMeta) -> Tensor:
    """The adapters' contribution alone: [T, d_out], zeros for tokens of slot -1."""
    return apply_lora(x.new_zeros(x.shape[0], w.d_out), x, w, meta)


class LoraContext:
    """What the model sees for one step: ``y = lora.apply(layer, module, x, y)``."""

    def __init__(self, meta: LoraBatchMeta, weights: dict[tuple[int, str], LoraWeights]):
        self.meta = meta
        self.weights = weights
        for w in weights.values():  # plan every ranks tuple now, so the forward is device work
            plan = meta.plan(w.ranks, w.skip)
            if plan.dense:
                meta.zero_mask(plan)

    def apply(self, layer: int, module: str, x: Tensor, y: Tensor) -> Tensor:
        w = self.weights.get((layer, module))
        return y if w is None else apply_lora(y, x, w, self.meta)
