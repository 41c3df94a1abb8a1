"""Heterogeneous batched LoRA: one pass adds the deltas of many adapters of mixed ranks.

Tokens of k adapters (and bare tokens, slot -1) share one forward, as in S-LoRA / Punica SGMV.
Weights are packed without padding (A rows, then B columns, slot after slot; lora_slots.py keeps
them in persistent rank bins), never padded to the largest rank. Tokens are sorted by (rank,
slot) once per step (lora_meta.py), so each distinct rank is a group of adapters whose rows are
one view. Per module and step, on the host, with no device sync:

- whole-plan dense: h = x @ A_span^T over the rows of all live slots, zero the rows of other
  slots, y += h @ B_span^T. Two plain GEMMs, no gather or scatter; taken for one rank group
  when its rows are few (sum_r <= 32) or nearly all used (T * sum_r <= 1.25 * sum_t r_t: in
  practice one adapter).
- otherwise per rank group (the only Python loop is over distinct ranks, plus over adapters
  with overflowing tokens): ``grouped_mm`` where it is one native kernel (CUDA bf16, sm90+).
  Elsewhere (``_segmented``) one gather lays the tokens out by group (lora_meta.RankGroup.
  lay_out): the first ``width`` tokens of every adapter of the group go to one batched GEMM pair
  over its slots, short adapters padded with zero rows (decode: a token or two per adapter, so
  per-adapter GEMMs would be all launch overhead, and every slot's weights are read once); an
  adapter's tokens past the width (a prefill segment) take a GEMM pair of their own, on views
  of its rows. The width minimises a cost model; width 0 is a GEMM pair per adapter. The groups
  write one output buffer, added into y by one scatter. On CPU torch's grouped_mm is itself a
  loop of GEMMs over every slot (idle ones too), so it is never the cheaper choice there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # Batched views of row ranges (lora_op._batched_rows); the buffers are written in place.
    views: dict = field(default_factory=dict, repr=False, compare=False)

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


def _use_grouped_mm(x: Tensor, w: LoraWeights) -> bool:
    """grouped_mm where it is one native kernel (CUDA bf16, sm90+). Elsewhere torch runs it as
    a GEMM per slot, idle ones too, so the segmented paths cost less."""
    native = x.is_cuda and x.dtype == torch.bfloat16 and _cuda_native_grouped(x.device)
    return (FORCE_GROUPED_MM or native) and _grouped_ok(x, w)


def _group_rows(w: LoraWeights, g: RankGroup) -> tuple[Tensor, Tensor]:
    """The group's A rows [num_adapters * rank, d_in] and B^T rows [.., d_out]."""
    bt = w.B.T  # [sum_r, d_out], contiguous by construction
    if isinstance(g.rows, slice):
        return w.A[g.rows], bt[g.rows]
    return w.A.index_select(0, g.rows), bt.index_select(0, g.rows)


def _batched_rows(w: LoraWeights, g: RankGroup) -> tuple[Tensor, Tensor]:
    """The group's A^T [k, d_in, r] and B^T [k, r, d_out] as batches over its slots, cached on
    the weights: slot buffers persist across steps, and a step's groups mostly span the same
    slots as the last one's, so the views are built once rather than per module per step."""
    key = (g.rows.start, g.rows.stop, g.rank) if isinstance(g.rows, slice) else None
    hit = w.views.get(key) if key is not None else None
    if hit is None:
        a, b = _group_rows(w, g)
        k, r = g.num_adapters, g.rank
        hit = a.view(k, r, w.d_in).transpose(1, 2), b.view(k, r, w.d_out)
        if key is not None:
            if len(w.views) >= 64:  # spans drift as batches churn: keep the recent ones
                w.views.clear()
            w.views[key] = hit
    return hit


def _grouped_mm(y: Tensor, x: Tensor, w: LoraWeights, plan: Plan) -> None:
    """Tokens in sorted order; one grouped GEMM pair per rank group (two plain GEMMs for a
    group with one live adapter)."""
    xs = x.contiguous() if plan.identity else x.index_select(0, plan.order)
    for g in plan.groups:
        a, b = _group_rows(w, g)
        xg, r = xs[g.tokens], g.rank
        if len(g.live) == 1:
            j = g.live[0][0]
            out = (xg @ a[j * r:(j + 1) * r].T) @ b[j * r:(j + 1) * r]
        else:
            a = a.view(g.num_adapters, r, w.d_in).transpose(1, 2)
            b = b.view(g.num_adapters, r, w.d_out)
            h = F.grouped_mm(xg, a, offs=g.offs)  # [n, r]
            out = F.grouped_mm(h, b, offs=g.offs)  # [n, d_out]
        if plan.identity:
            y[g.tokens] += out
        else:
            y.index_add_(0, plan.order[g.tokens], out)


def _segmented(y: Tensor, x: Tensor, w: LoraWeights, meta: LoraBatchMeta, plan: Plan) -> None:
    """One gather of x into the plan's segment layout, each group's GEMMs writing its rows of
    one output buffer, one scatter-add into y: three ops besides the GEMMs, whatever the
    number of groups."""
    meta.segments(plan)
    if plan.gather is None:
        xs = x.contiguous()
    else:
        xs = x.index_select(0, plan.gather)
        if plan.pad_rows is not None:
            xs.index_fill_(0, plan.pad_rows, 0)
    outs = x.new_empty(xs.shape[0], w.d_out)
    for g in plan.groups:
        r, xg, og = g.rank, xs[g.pos], outs[g.pos]
        if g.width:
            k, m, n = g.num_adapters, g.width, g.num_adapters * g.width
            a_t, b = _batched_rows(w, g)
            h = torch.bmm(xg[:n].view(k, m, w.d_in), a_t)
            torch.bmm(h, b, out=og[:n].view(k, m, w.d_out))
        if g.overflow:
            a, b = _group_rows(w, g)
            for j, lo, hi in g.overflow:
                torch.mm(xg[lo:hi] @ a[j * r:(j + 1) * r].T, b[j * r:(j + 1) * r],
                         out=og[lo:hi])
    if plan.gather is None:
        y += outs
    else:
        y.index_add_(0, plan.gather, outs)


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
        elif _use_grouped_mm(x, w):
            _grouped_mm(y, x, w, plan)
        else:
            _segmented(y, x, w, meta, plan)
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
            elif not _use_grouped_mm(w.A, w):  # the weights' device and dtype are x's
                meta.segments(plan)

    def begin(self, layer: int, module: str, x: Tensor) -> None:
        """Nothing to start before the base GEMM: the torch operator runs after it."""

    def apply(self, layer: int, module: str, x: Tensor, y: Tensor) -> Tensor:
        w = self.weights.get((layer, module))
        return y if w is None else apply_lora(y, x, w, self.meta)
