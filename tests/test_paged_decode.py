"""Attention read in place from pool pages (kernels/paged_decode.c) against the torch paths it
replaces on the CPU (batched decode; prefill chunks, with and without cached context), and its
refusals of tables that would make it read astray."""

from __future__ import annotations

import pytest
import torch

from serving.engine import attention, kernels
from serving.engine.attention import AttentionMetadata
from tests.native_support import native_lib

BLOCK = 4


@pytest.fixture(scope="module")
def lib():
    return native_lib(kernels.paged_decode_lib)  # module fixtures set up before autouse ones


def _case(n: int, heads: int, kv_heads: int, head_dim: int, max_ctx: int, seed: int,
          poison_tail: bool = False):
    """A layer's pool whose pages are dealt shuffled; pages nobody holds are NaN, so a read of
    a wrong page poisons its output. Slots past a context are zero, as the pool hands pages
    out (the torch path reads and masks them), or NaN with ``poison_tail``."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_ctx + 1, (n,), generator=g).tolist()
    blocks = [-(-c // BLOCK) for c in ctx]
    perm = torch.randperm(sum(blocks) + 3, generator=g).tolist()
    tables, at = [], 0
    for b in blocks:
        tables.append(perm[at:at + b])
        at += b
    null = perm[at]  # the pool's zero pad page
    kv = torch.full((len(perm), 3, 2, BLOCK, kv_heads, head_dim), torch.nan)
    layer = kv[:, 1]  # a strided slice, as kv_view()[:, layer] is
    for c, table in zip(ctx, tables, strict=True):
        layer[table] = torch.nan if poison_tail else 0
        for p in range(c):
            layer[table[p // BLOCK], :, p % BLOCK] = torch.randn(2, kv_heads, head_dim,
                                                                 generator=g)
    layer[null] = 0
    q = torch.randn(n, heads, head_dim, generator=g)
    meta = AttentionMetadata.build(BLOCK, [], [], [], ctx, tables, pad_page=null)
    return q, layer, meta


def _torch_decode(q, layer, meta, window, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(kernels, "paged_decode_lib", lambda: None)
        return attention._decode(q, layer, meta, 0.3, window)


def _native(lib, q, layer, meta, window):
    """What paged_attention runs on the CPU: every token one query over its own context."""
    return kernels.paged_decode(lib, q, layer, *meta.per_token(), 0.3, window)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 16), (4, 4, 64), (6, 3, 8)])
@pytest.mark.parametrize("window", [None, 5, 100])
def test_matches_the_torch_path(lib, monkeypatch, heads, kv_heads, head_dim, window):
    q, layer, meta = _case(40, heads, kv_heads, head_dim, max_ctx=37, seed=heads + head_dim)
    ours = _native(lib, q, layer, meta, window)
    ref = _torch_decode(q, layer, meta, window, monkeypatch)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_a_mixed_step_in_one_call_matches_the_torch_paths(lib, monkeypatch, window):
    """Prefill chunks (a whole prompt, one with cached context before it, a one-token chunk)
    and decode tokens: paged_attention makes one kernel call per layer, and every token's
    output is what torch's per-sequence SDPA and batched decode give."""
    heads, kv_heads, hd = 6, 2, 16
    g = torch.Generator().manual_seed(7)
    pre_q, pre_ctx = [9, 6, 1], [9, 17, 12]  # new tokens, context after them
    dec_ctx = [5, 1, 23]
    ctxs = pre_ctx + dec_ctx
    blocks = [-(-c // BLOCK) for c in ctxs]
    perm = torch.randperm(sum(blocks) + 2, generator=g).tolist()
    tables = [perm[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(ctxs))]
    null = perm[-1]
    kv = torch.full((len(perm), 2, 2, BLOCK, kv_heads, hd), torch.nan)
    layer = kv[:, 0]
    for c, table in zip(ctxs, tables, strict=True):  # cached context; new tokens overwrite
        layer[table] = 0
        for p in range(c):
            layer[table[p // BLOCK], :, p % BLOCK] = torch.randn(2, kv_heads, hd, generator=g)
    layer[null] = 0
    meta = AttentionMetadata.build(BLOCK, pre_q, pre_ctx, tables[:3], dec_ctx, tables[3:],
                                   pad_page=null)
    t = sum(pre_q) + len(dec_ctx)
    q, k, v = (torch.randn(t, h, hd, generator=g) for h in (heads, kv_heads, kv_heads))
    calls = []
    native = kernels.paged_decode
    monkeypatch.setattr(kernels, "paged_decode", lambda *a: calls.append(1) or native(*a))
    ours = attention.paged_attention(q, k, v, layer.clone(), meta, 0.3, window)
    assert calls == [1]
    with monkeypatch.context() as m:
        m.setattr(kernels, "paged_decode_lib", lambda: None)
        ref = attention.paged_attention(q, k, v, layer.clone(), meta, 0.3, window)
    assert calls == [1] and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_bfloat16_is_the_float32_result_rounded_once(lib, monkeypatch, window):
    """A bf16 pool (a bf16 engine's): the kernel widens q and K/V and computes in float32, so
    its output is the float32 kernel's on the same (bf16-exact) values, rounded once; the
    torch path's bf16 SDPA is within bf16's error of it."""
    q, layer, meta = _case(30, 8, 2, 16, max_ctx=29, seed=11)
    q16, layer16 = q.bfloat16(), layer.bfloat16()
    ours = _native(lib, q16, layer16, meta, window)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    exact = _native(lib, q16.float(), layer16.float(), meta, window)
    torch.testing.assert_close(ours, exact.bfloat16(), atol=0, rtol=2**-8)
    torch.testing.assert_close(ours.float(), _torch_decode(q16, layer16, meta, window,
                                                           monkeypatch).float(),
                               atol=2e-2, rtol=2e-2)


def test_reads_nothing_past_a_context(lib, monkeypatch):
    clean = _case(30, 8, 2, 16, max_ctx=21, seed=5)
    q, layer, meta = _case(30, 8, 2, 16, max_ctx=21, seed=5, poison_tail=True)
    ours = _native(lib, q, layer, meta, None)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, _torch_decode(*clean, None, monkeypatch),
                               atol=1e-5, rtol=1e-5)


def test_peaked_scores_keep_the_softmax_exact(lib, monkeypatch):
    """Scores spread far past float exp's range (e^-87 and under), where the kernel's own exp
    clamps: the weights of the far positions still vanish against the near ones."""
    q, layer, meta = _case(24, 4, 2, 16, max_ctx=40, seed=7)
    q = q * 60
    ours = _native(lib, q, layer, meta, None)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, _torch_decode(q, layer, meta, None, monkeypatch),
                               atol=1e-5, rtol=1e-5)


def test_long_context_and_one_token(lib, monkeypatch):
    q, layer, meta = _case(3, 4, 2, 32, max_ctx=1, seed=1)  # every context one token long
    torch.testing.assert_close(_native(lib, q, layer, meta, None),
                               _torch_decode(q, layer, meta, None, monkeypatch))
    q, layer, meta = _case(2, 4, 2, 32, max_ctx=3000, seed=2)
    torch.testing.assert_close(_native(lib, q, layer, meta, None),
                               _torch_decode(q, layer, meta, None, monkeypatch),
                               atol=1e-5, rtol=1e-5)


def test_tables_that_would_read_astray_are_refused(lib):
    q, layer, meta = _case(4, 4, 2, 8, max_ctx=9, seed=3)
    tables, ctx = meta.decode_block_tables, meta.decode_ctx_lens
    pages = layer.shape[0]
    for bad_tables, bad_ctx, match in (
        (tables.clone().fill_(pages), ctx, "page ids"),
        (tables.clone().fill_(-1), ctx, "page ids"),
        (tables, ctx + tables.shape[1] * BLOCK, "longer than its block table"),
        (tables, ctx * 0, "empty"),
    ):
        with pytest.raises(ValueError, match=match):
            kernels.paged_decode(lib, q, layer, bad_tables, bad_ctx, 0.3, None)
    with pytest.raises(ValueError, match="do not match"):
        kernels.paged_decode(lib, q[:2], layer, tables, ctx, 0.3, None)
    with pytest.raises(ValueError, match="int64"):
        kernels.paged_decode(lib, q, layer, tables.int(), ctx, 0.3, None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.paged_decode(lib, q.double(), layer.double(), tables, ctx, 0.3, None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.paged_decode(lib, q.bfloat16(), layer, tables, ctx, 0.3, None)
    assert kernels.paged_decode(lib, q[:0], layer, tables[:0], ctx[:0], 0.3, None).shape[0] == 0


def test_torch_path_where_the_kernel_cannot_serve(lib, monkeypatch):
    """float64, a pool of another dtype, autograd, or the kernels switched off: torch SDPA."""
    q, layer, _ = _case(2, 4, 2, 8, max_ctx=5, seed=4)
    assert attention._native_attention_lib(q, layer) is lib
    assert attention._native_attention_lib(q.bfloat16(), layer.bfloat16()) is lib
    assert attention._native_attention_lib(q.double(), layer.double()) is None
    assert attention._native_attention_lib(q.bfloat16(), layer) is None
    assert attention._native_attention_lib(q, layer.double()) is None
    assert attention._native_attention_lib(q.requires_grad_(), layer) is None
    monkeypatch.setenv("ADAPTERHUB_NATIVE_KERNELS", "0")
    assert attention._native_attention_lib(q.detach(), layer) is None
