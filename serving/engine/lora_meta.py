"""Per-step token bookkeeping for the batched LoRA operator (see lora_op.py).

Built once per step from each token's adapter slot, before the forward; every layer and module
reuses it. All planning runs on the host on small integer tensors, so the forward issues only
device work. A module's plan depends on its ranks tuple (an adapter that skips a module has rank
0 there, or is listed in the module's ``skip`` set when its rows are kept but zero), so plans are
cached per distinct (ranks, skip); a step sees a handful of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Dense path ("shrink all rows, then mask") costs T * sum_r MACs per d where the grouped path
# costs sum over tokens of r_token, but it is two plain GEMMs with no gather, scatter or per-rank
# launches. Take it, for a single rank group, when its waste is nil (one adapter: ratio ~1,
# bare tokens aside) or the whole thing is tiny. Measured with bench/lora_op.py shapes on CPU:
# dense wins for k = 1 and sum_r <= 32, loses from about 3x waste upward.
DENSE_MAX_SUM_RANK = 32
DENSE_MAX_WASTE = 1.25
# Cost model of the per-group paths (lora_op.py), in multiply-adds: one extra kernel launch
# (CPU, one thread: ~5 us of dispatch at ~30 GMAC/s), and reading one weight from memory (a
# small-M GEMM streams its weights at ~20 GB/s against ~30 GMAC/s of compute: ~6 MACs a float).
LAUNCH_MACS = 150_000
READ_MACS = 6
# The (d_in + d_out) the per-plan path choice assumes when the caller gives none.
DEFAULT_COST_DIM = 512


@dataclass
class RankGroup:
    """The adapters of one rank (with idle slots between them) and their sorted tokens."""

    rank: int
    rows: slice | Tensor  # packed rows of its adapters: a slice (zero-copy view) or an index
    num_adapters: int
    tokens: slice  # its tokens' range in the sorted order
    offs: Tensor  # int32 [num_adapters]: end of each adapter's tokens within `tokens`
    counts: list[int]  # tokens of each adapter (host copy of offs' differences)
    # Segment layout (lora_op._segmented), from ``lay_out``: the first ``width`` tokens of every
    # member go to one batched GEMM pair over the group's slots, laid out [num_adapters, width]
    # (short members padded with zero rows); a member's tokens past ``width`` take a GEMM pair
    # of their own, at ``overflow`` (member, first, end position within ``pos``). ``pos`` is
    # the group's range of rows in the plan's layout.
    width: int = 0
    overflow: list[tuple[int, int, int]] = field(default_factory=list)
    pos: slice = field(default_factory=lambda: slice(0, 0))

    @property
    def num_tokens(self) -> int:
        return self.tokens.stop - self.tokens.start

    @functools.cached_property  # read per module per step: derive once per plan
    def live(self) -> list[tuple[int, int, int]]:
        """(member, first token, end token) of each member with tokens, within ``tokens``."""
        out, lo = [], 0
        for j, c in enumerate(self.counts):
            if c:
                out.append((j, lo, lo + c))
            lo += c
        return out

    def lay_out(self, cost_dim: int) -> Tensor:
        """Choose ``width`` by cost (LAUNCH_MACS, READ_MACS) and lay the tokens out for it.

        The batched pair multiplies every member's weights by ``width`` rows, padding included,
        in two launches; each overflowing member costs its extra tokens and two launches.
        Decode (a token or two per adapter) wants width 1 or 2; a long prefill segment beside
        decode tokens overflows rather than padding every member to its length; width 0 is a
        GEMM pair per member. Returns, for each layout position, the index into the group's
        sorted tokens (-1 for padding).
        """
        weights = self.rank * cost_dim  # per member

        def cost(w: int) -> int:
            over = [c - w for c in self.counts if c > w]
            batched = (w + READ_MACS) * self.num_adapters * weights + 2 * LAUNCH_MACS if w else 0
            return batched + (sum(over) + READ_MACS * len(over)) * weights \
                + 2 * len(over) * LAUNCH_MACS

        self.width = w = min(sorted({0, *self.counts}), key=cost)
        k, n = self.num_adapters, self.num_tokens
        counts = torch.tensor(self.counts)
        member = torch.repeat_interleave(torch.arange(k), counts)  # of each sorted token
        i = torch.arange(n) - (counts.cumsum(0) - counts)[member]  # its index in its member
        over = (counts - w).clamp(min=0)
        over_start = k * w + over.cumsum(0) - over
        where = torch.where(i < w, member * w + i, over_start[member] + i - w)
        self.overflow = [(j, int(over_start[j]), int(over_start[j] + over[j]))
                         for j in over.nonzero().squeeze(1).tolist()]
        source = torch.full((k * w + int(over.sum()),), -1, dtype=torch.long)
        source[where] = torch.arange(n)
        return source

    @property
    def num_positions(self) -> int:
        return self.num_adapters * self.width + sum(hi - lo for _, lo, hi in self.overflow)


@dataclass
class Plan:
    """How one ranks tuple is applied to this step's tokens."""

    ranks: tuple[int, ...]
    sum_rank: int  # rows of the live span (the rows the dense path multiplies)
    rows: slice  # the live span: from the first live slot's rows to the last one's
    num_active: int  # tokens with a slot >= 0 whose adapter has rank > 0 here
    dense: bool
    order: Tensor  # [num_active] token indices sorted by (rank group, slot)
    identity: bool  # order is 0..T-1: skip the gather and the scatter
    groups: list[RankGroup]
    skip: frozenset[int] = frozenset()
    # Segment layout of the per-group paths (cpu): row p of the layout is token gather[p] of
    # x and adds into that row of y; padding rows (``pad_rows``) gather token 0 and are zeroed,
    # so they add exact zeros to row 0. gather is None when the layout is the token order.
    gather: Tensor | None = None
    pad_rows: Tensor | None = None
    _sorted: Tensor | None = None  # host copy of ``order``, for the layout
    _segments_built: bool = False
    # Dense path: True where span row j is another slot's and must be zeroed for token t
    # ([T, span rows]); None when every token owns every row (one adapter, no bare tokens).
    _zero_mask: Tensor | None = None
    _mask_built: bool = False


@dataclass
class LoraBatchMeta:
    """Token slots of one step (prefill segments, then decode tokens) and the plans over them.

    ``ranks`` are the adapters' ranks; a module's weights may carry 0 for some slots.
    """

    slots: Tensor  # [T] long on device, -1 = no adapter
    ranks: tuple[int, ...]
    device: torch.device
    counts: list[int]  # tokens per slot
    valid_idx: Tensor  # tokens with an adapter (for the bias)
    valid_slots: Tensor
    all_valid: bool
    _slots_host: Tensor = field(repr=False)
    cost_dim: int = DEFAULT_COST_DIM  # typical d_in + d_out of a module, for path choice
    _plans: dict[tuple[int, ...], Plan] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self._slots_host.numel()

    @classmethod
    def build(cls, token_slots: Tensor | Sequence[int], ranks: Sequence[int],
              device: torch.device | str | None = None,
              cost_dim: int = DEFAULT_COST_DIM) -> LoraBatchMeta:
        # One host copy per step; the scheduler has the slots on the host anyway.
        host = torch.as_tensor(token_slots, dtype=torch.long).detach().to("cpu").reshape(-1)
        ranks = tuple(int(r) for r in ranks)
        k = len(ranks)
        if host.numel() and (int(host.min()) < -1 or int(host.max()) >= k):
            raise ValueError(f"token slots must lie in -1..{k - 1}")
        if any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be >= 0, got {ranks}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        counts = torch.bincount(host + 1, minlength=k + 1)[1:].tolist()
        valid = (host >= 0).nonzero().squeeze(1)
        return cls(
            slots=host.to(device), ranks=ranks, device=device, counts=counts,
            valid_idx=valid.to(device), valid_slots=host[valid].to(device),
            all_valid=valid.numel() == host.numel(), _slots_host=host, cost_dim=cost_dim,
        )

    def plan(self, ranks: Sequence[int], skip: frozenset[int] = frozenset()) -> Plan:
        """``skip``: slots whose rows exist but are zero for this module (tokens pass bare)."""
        ranks = tuple(ranks)
        cached = self._plans.get((ranks, skip))
        if cached is None:
            if len(ranks) != len(self.ranks):
                raise ValueError(f"weights have {len(ranks)} slots, the batch {len(self.ranks)}")
            cached = self._plans[(ranks, skip)] = self._make_plan(ranks, skip)
        return cached

    def _make_plan(self, ranks: tuple[int, ...], skip: frozenset[int]) -> Plan:
        k = len(ranks)
        counts = [0 if s in skip else c for s, c in enumerate(self.counts)]
        row_start = [0] * (k + 1)
        for s, r in enumerate(ranks):
            row_start[s + 1] = row_start[s] + r
        live = [s for s in range(k) if ranks[s] > 0 and counts[s] > 0]
        # Sort position of each slot: rank groups (largest rank first), slots ascending inside,
        # so a group's adapters follow the packed row order; bare tokens sort last.
        key_of_slot = torch.full((k + 1,), k, dtype=torch.long)  # index k = slot -1
        groups, pos, tok = [], 0, 0
        for r in sorted({ranks[s] for s in live}, reverse=True):
            members = [s for s in live if ranks[s] == r]
            # Rank-0 slots own no rows, so only a different nonzero rank breaks the run; idle
            # slots inside the run join as empty groups to keep the weights a view.
            span = [s for s in range(members[0], members[-1] + 1) if ranks[s]]
            if all(ranks[s] == r for s in span):
                members = span
                rows: slice | Tensor = slice(row_start[span[0]], row_start[span[-1]] + r)
            else:  # slots not numbered in rank order: the group's weights are gathered per call
                rows = torch.cat([torch.arange(row_start[s], row_start[s] + r) for s in members])
                rows = rows.to(self.device)
            key_of_slot[torch.tensor(members)] = torch.arange(pos, pos + len(members))
            member_counts = [counts[s] for s in members]
            offs = torch.tensor(member_counts).cumsum(0).to(torch.int32)
            n = int(offs[-1])
            groups.append(RankGroup(r, rows, len(members), slice(tok, tok + n),
                                    offs.to(self.device), member_counts))
            pos, tok = pos + len(members), tok + n
        if skip:  # a skipping slot inside a group's span must not pull its tokens in
            key_of_slot[torch.tensor(sorted(skip))] = k
        host = self._slots_host
        keys = key_of_slot[torch.where(host >= 0, host, k)]
        order = torch.argsort(keys, stable=True)[:tok]
        identity = tok == host.numel() and bool((order == torch.arange(tok)).all())
        # Persistent slot buffers hold idle slots too: the dense path multiplies only the rows
        # from the first live slot to the last.
        rows = slice(row_start[live[0]], row_start[live[-1] + 1]) if live else slice(0, 0)
        sum_r, exact = rows.stop - rows.start, sum(counts[s] * ranks[s] for s in live)
        # One rank group only: the span then lies between live slots of one bin, whose rows are
        # all written (lora_slots.py leaves a bin's capacity past its last used slot untouched).
        dense = len(groups) <= 1 and (
            sum_r <= DENSE_MAX_SUM_RANK or host.numel() * sum_r <= DENSE_MAX_WASTE * exact)
        return Plan(ranks=ranks, sum_rank=sum_r, rows=rows, num_active=tok, dense=dense,
                    order=order.to(self.device), identity=identity, groups=groups, skip=skip,
                    _sorted=order)

    def segments(self, plan: Plan) -> Plan:
        """Lay every group's tokens out for the segmented path (Plan.gather, pad_rows, each
        group's width and overflow), once per plan; the grouped_mm path never needs it."""
        if plan._segments_built:
            return plan
        gather, pads, pos = [], [], 0
        for g in plan.groups:
            source = g.lay_out(self.cost_dim)
            pads.append((source < 0).nonzero().squeeze(1) + pos)
            gather.append(torch.where(source >= 0, plan._sorted[g.tokens][source.clamp(min=0)],
                                      0))
            g.pos = slice(pos, pos + g.num_positions)
            pos += g.num_positions
        if gather:
            src, pad_rows = torch.cat(gather), torch.cat(pads)
            if pos != self.num_tokens or not bool((src == torch.arange(pos)).all()):
                plan.gather = src.to(self.device)
            if pad_rows.numel():
                plan.pad_rows = pad_rows.to(self.device)
        plan._segments_built = True
        return plan

    def zero_mask(self, plan: Plan) -> Tensor | None:
        """Dense path mask: True where a token's span row of x @ A^T belongs to another slot."""
        if not plan._mask_built:
            one = len(plan.groups) == 1 and plan.groups[0].num_adapters == 1
            if not (one and plan.identity and plan.sum_rank == plan.groups[0].rank):
                owner = torch.repeat_interleave(torch.arange(len(plan.ranks)),
                                                torch.tensor(plan.ranks, dtype=torch.long))
                owner = owner[plan.rows]
                slots = self._slots_host
                if plan.skip:  # a skipping slot's tokens own no rows here
                    skipped = torch.tensor(sorted(plan.skip), dtype=torch.long)
                    slots = torch.where(torch.isin(slots, skipped), -1, slots)
                plan._zero_mask = (slots[:, None] != owner[None, :]).to(self.device)
            plan._mask_built = True
        return plan._zero_mask
