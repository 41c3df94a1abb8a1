"""The batched LoRA operator against a per-token reference loop (kept in this test only)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from serving.engine import lora_meta, lora_op
from serving.engine.lora_op import (
    LoraBatchMeta,
    LoraContext,
    LoraWeights,
    apply_lora,
    lora_delta,
    pack_lora_weights,
)

RANKS = (64, 32, 16, 8, 1)
D_IN, D_OUT = 32, 48


def _adapters(ranks, d_in=D_IN, d_out=D_OUT, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        if r == 0:
            out.append(None)  # the adapter does not target this module
            continue
        A = torch.randn(r, d_in, generator=g, dtype=dtype) / d_in**0.5
        B = torch.randn(d_out, r, generator=g, dtype=dtype) / max(r, 1) ** 0.5
        b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
        out.append((A, B, b))
    return out


def _reference(x, slots, adapters, d_out=D_OUT):
    x = x.double()
    ref = torch.zeros(x.shape[0], d_out, dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0 and adapters[s] is not None:
            A, B, b = adapters[s]
            ref[t] = B.double() @ (A.double() @ x[t])
            if b is not None:
                ref[t] += b.double()
    return ref


def _slots(k, rng, shuffle, n_seg=3, n_decode=12):
    """Prefill segments (contiguous, one slot each) then decode singletons; -1 mixed in."""
    choices = list(range(k)) + [-1]
    slots = []
    for _ in range(n_seg):
        slots += [rng.choice(choices)] * rng.randint(1, 20)
    slots += [rng.choice(choices) for _ in range(n_decode)]
    if shuffle:
        rng.shuffle(slots)
    return torch.tensor(slots, dtype=torch.long)


@pytest.fixture(params=["auto", "dense", "grouped_mm", "bmm", "loop"])
def path(request, monkeypatch):
    """dense: one masked GEMM pair over the live span; grouped_mm: the CUDA path, one grouped
    GEMM pair per rank group; bmm: a batched GEMM pair per rank group over its slots, tokens
    padded to a common width (launches cost the earth); loop: a GEMM pair per adapter with
    tokens (launches cost nothing)."""
    if request.param != "auto":
        limit = 10**9 if request.param == "dense" else -1
        monkeypatch.setattr(lora_meta, "DENSE_MAX_SUM_RANK", limit)
        monkeypatch.setattr(lora_meta, "DENSE_MAX_WASTE", limit)
    if request.param == "grouped_mm":
        monkeypatch.setattr(lora_op, "FORCE_GROUPED_MM", True)
    launch = {"bmm": 10**15, "loop": 0}
    if request.param in launch:
        monkeypatch.setattr(lora_meta, "LAUNCH_MACS", launch[request.param])
    return request.param


@pytest.mark.parametrize("k", [1, 3, 8, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_matches_reference(path, k, bias, shuffle):
    rng = random.Random(k * 7 + bias + 2 * shuffle)
    ranks = [rng.choice(RANKS) for _ in range(k)]
    # Some adapters skip this module: rank 0 here, full rank in the batch meta.
    module_ranks = [0 if k >= 3 and rng.random() < 0.25 else r for r in ranks]
    adapters = _adapters(module_ranks, bias=bias, seed=k)
    if all(a is None for a in adapters):
        module_ranks[0] = ranks[0]
        adapters = _adapters(module_ranks, bias=bias, seed=k)
    w = pack_lora_weights(adapters)
    assert w.ranks == tuple(module_ranks)
    slots = _slots(k, rng, shuffle, n_decode=max(12, k))
    x = torch.randn(len(slots), D_IN)
    meta = LoraBatchMeta.build(slots, ranks, "cpu")
    ref = _reference(x, slots, adapters)

    delta = lora_delta(x, w, meta)
    torch.testing.assert_close(delta.double(), ref, atol=1e-5, rtol=1e-5)
    y0 = torch.randn(len(slots), D_OUT)
    y = apply_lora(y0.clone(), x, w, meta)
    torch.testing.assert_close(y.double(), y0.double() + ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank_ordered", [False, True])
def test_rank_groups_are_views_when_slots_follow_rank(path, rank_ordered):
    ranks = [64, 64, 0, 64, 32, 32, 8, 8, 8, 1] if rank_ordered else [8, 64, 32, 8, 64, 1, 32]
    adapters = _adapters(ranks, bias=True)
    w = pack_lora_weights(adapters)
    # Slot 0 idle inside its group: it still joins the view as an empty group.
    slots = torch.tensor([s for s in range(1, len(ranks)) for _ in range(s % 3 + 1)] + [-1, 3])
    meta = LoraBatchMeta.build(slots, [r or 16 for r in ranks])
    plan = meta.plan(w.ranks)
    assert all(isinstance(g.rows, slice) for g in plan.groups) == rank_ordered
    x = torch.randn(len(slots), D_IN)
    torch.testing.assert_close(lora_delta(x, w, meta).double(), _reference(x, slots, adapters),
                               atol=1e-5, rtol=1e-5)


def _spy(monkeypatch):
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(lora_op.F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_dispatch_with_grouped_mm(monkeypatch):
    monkeypatch.setattr(lora_op, "FORCE_GROUPED_MM", True)  # as on CUDA bf16 sm90+
    calls = _spy(monkeypatch)
    slots = torch.tensor([0, 1, 1, -1, 2])
    small = pack_lora_weights(_adapters([8, 8, 8]))  # one rank group, sum_r 24: dense
    one = pack_lora_weights(_adapters([0, 64, 0]))  # one adapter, 2 of 5 tokens: waste 2.5x
    big = pack_lora_weights(_adapters([64, 32, 64]))  # sum_r 160: grouped, two rank groups
    meta = LoraBatchMeta.build(slots, [64, 32, 64])
    x = torch.randn(5, D_IN)
    lora_delta(x, small, meta)
    assert not calls
    lora_delta(x, one, meta)  # a group of one adapter: two plain GEMMs on its tokens
    assert not calls
    lora_delta(x, big, meta)  # rank 64 (two adapters): grouped; rank 32 (one): plain
    assert len(calls) == 2
    meta = LoraBatchMeta.build(torch.tensor([1, 1, 1, 1, 1, 1, 1, -1]), [64, 32, 64])
    lora_delta(torch.randn(8, D_IN), one, meta)  # waste 8/7: dense
    assert len(calls) == 2


def test_cpu_batches_decode_and_gives_long_segments_their_own_gemms(monkeypatch):
    """A token or two per adapter: one batched GEMM pair over the group's slots (per-adapter
    GEMMs would be all launch overhead); a long prefill segment beside them overflows into a
    GEMM pair of its own rather than padding every adapter to its length. Neither calls
    grouped_mm, a loop of GEMMs over every slot on CPU."""
    calls = _spy(monkeypatch)
    ranks = [16] * 12
    w = pack_lora_weights(_adapters(ranks))
    decode = torch.arange(12).repeat(2)
    uneven = torch.cat([decode, torch.full((10,), 5)])  # adapter 5: 12 tokens
    prefill = torch.cat([torch.full((200,), 3), torch.arange(12)])
    for slots, width, overflow in ((decode, 2, []), (uneven, 2, [5]), (prefill, 1, [3])):
        meta = LoraBatchMeta.build(slots, ranks)
        plan = meta.segments(meta.plan(tuple(ranks)))
        assert not plan.dense and len(plan.groups) == 1
        g = plan.groups[0]
        assert g.width == width and [j for j, _, _ in g.overflow] == overflow
        assert g.num_positions == len(slots) and plan.pad_rows is None
        x = torch.randn(len(slots), D_IN)
        torch.testing.assert_close(lora_delta(x, w, meta).double(),
                                   _reference(x, slots, _adapters(ranks)), atol=1e-5, rtol=1e-5)
    assert not calls


def test_short_adapters_are_padded_to_the_batched_width():
    ranks = [8] * 6
    adapters = _adapters(ranks, bias=True)
    slots = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5, -1])  # widths 1 and 2: pad the 1s
    meta = LoraBatchMeta.build(slots, ranks)
    plan = meta.segments(meta.plan(tuple(ranks)))
    g = plan.groups[0]
    assert g.width == 2 and not g.overflow and plan.pad_rows is not None
    x = torch.randn(len(slots), D_IN)
    y0 = torch.randn(len(slots), D_OUT)
    y = apply_lora(y0.clone(), x, pack_lora_weights(adapters), meta)
    torch.testing.assert_close(y.double(), y0.double() + _reference(x, slots, adapters),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_in,dtype", [(30, torch.float32), (D_IN, torch.float64)])
def test_avoids_grouped_mm_where_it_cannot_run(monkeypatch, d_in, dtype):
    monkeypatch.setattr(lora_meta, "DENSE_MAX_SUM_RANK", -1)
    monkeypatch.setattr(lora_meta, "DENSE_MAX_WASTE", -1)
    monkeypatch.setattr(lora_op, "FORCE_GROUPED_MM", True)
    calls = _spy(monkeypatch)
    adapters = _adapters([64, 32, 8], d_in=d_in, bias=True, dtype=dtype)
    slots = torch.tensor([2, 0, 0, -1, 1, 2, 0])
    x = torch.randn(len(slots), d_in, dtype=dtype)
    meta = LoraBatchMeta.build(slots, [64, 32, 8])
    out = lora_delta(x, pack_lora_weights(adapters), meta)
    assert out.dtype == dtype and not calls
    torch.testing.assert_close(out.double(), _reference(x, slots, adapters), atol=1e-5, rtol=1e-5)


def test_bf16(path):
    adapters = _adapters([64, 32, 16, 8], bias=True, dtype=torch.bfloat16)
    slots = torch.tensor([3] * 9 + [0, 1, -1, 2, 0])
    x = torch.randn(len(slots), D_IN, dtype=torch.bfloat16)
    meta = LoraBatchMeta.build(slots, [64, 32, 16, 8])
    out = lora_delta(x, pack_lora_weights(adapters), meta)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(x, slots, adapters), atol=5e-2, rtol=5e-2)


def test_single_adapter_sorted_tokens_take_the_no_gather_path(path):
    adapters = _adapters([16])
    slots = torch.zeros(7, dtype=torch.long)
    meta = LoraBatchMeta.build(slots, [16])
    assert meta.plan([16]).identity
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(lora_delta(x, pack_lora_weights(adapters), meta).double(),
                               _reference(x, slots, adapters), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots,ranks", [([], [8, 16]), ([-1, -1, -1], [8, 16]), ([], []),
                                         ([-1, -1], [])])
def test_edge_cases(path, slots, ranks):
    slots = torch.tensor(slots, dtype=torch.long)
    if ranks:
        w = pack_lora_weights(_adapters(ranks, bias=True))
    else:  # k = 0: nothing to pack, the engine builds the empty weights directly
        w = LoraWeights(torch.empty(0, D_IN), torch.empty(D_OUT, 0), None, ())
    meta = LoraBatchMeta.build(slots, ranks)
    x = torch.randn(len(slots), D_IN)
    delta = lora_delta(x, w, meta)
    assert delta.shape == (len(slots), D_OUT) and not delta.any()
    y = torch.randn(len(slots), D_OUT)
    assert torch.equal(apply_lora(y.clone(), x, w, meta), y)


def test_context_passes_untargeted_modules_through():
    ranks = [16, 8, 32]
    q = _adapters([16, 0, 32], seed=1)  # adapter 1 does not target q_proj
    v = _adapters([16, 8, 32], d_out=16, seed=2)
    weights = {(0, "q_proj"): pack_lora_weights(q), (0, "v_proj"): pack_lora_weights(v)}
    slots = torch.tensor([1, 1, 0, 2, -1, 0])
    ctx = LoraContext(LoraBatchMeta.build(slots, ranks), weights)
    x = torch.randn(6, D_IN)
    y = torch.randn(6, D_OUT)
    assert ctx.apply(0, "k_proj", x, y) is y
    assert ctx.apply(1, "q_proj", x, y) is y
    torch.testing.assert_close(ctx.apply(0, "q_proj", x, y.clone()).double(),
                               y.double() + _reference(x, slots, q), atol=1e-5, rtol=1e-5)
    yv = torch.zeros(6, 16)
    torch.testing.assert_close(ctx.apply(0, "v_proj", x, yv).double(),
                               _reference(x, slots, v, d_out=16), atol=1e-5, rtol=1e-5)


def test_validation():
    with pytest.raises(ValueError):
        pack_lora_weights([None, None])
    with pytest.raises(ValueError):
        pack_lora_weights([(torch.randn(4, 8), torch.randn(6, 3), None)])
    with pytest.raises(ValueError):
        LoraBatchMeta.build(torch.tensor([0, 2]), [8, 8])
    meta = LoraBatchMeta.build(torch.tensor([0, 1]), [8, 8])
    with pytest.raises(ValueError):
        meta.plan([8])


def test_packed_b_is_column_major_without_changing_values():
    adapters = _adapters([8, 4])
    w = pack_lora_weights(adapters)
    assert w.B.shape == (D_OUT, 12) and w.B.T.is_contiguous()
    torch.testing.assert_close(w.B, torch.cat([adapters[0][1], adapters[1][1]], dim=1))
    direct = LoraWeights(w.A, w.B.contiguous(), None, (8, 4))  # row-major input is re-laid
    assert direct.B.T.is_contiguous() and torch.equal(direct.B, w.B)


def test_bare_tokens_after_an_in_order_layout_get_nothing():
    """Adapter tokens already in layout order, bare tokens after them: the layout covers fewer
    rows than x, so it still needs its gather and scatter (nothing may land on bare rows)."""
    adapters = _adapters([64, 64])
    slots = torch.tensor([0, 1, -1, -1])
    meta = LoraBatchMeta.build(slots, [64, 64])
    plan = meta.segments(meta.plan((64, 64)))
    assert not plan.dense and plan.gather is not None
    x = torch.randn(len(slots), D_IN)
    delta = lora_delta(x, pack_lora_weights(adapters), meta)
    assert bool((delta[2:] == 0).all())
    torch.testing.assert_close(delta.double(), _reference(x, slots, adapters), atol=1e-5, rtol=1e-5)
