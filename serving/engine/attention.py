"""Paged attention over a flattened batch: chunked prefill sequences first, then decode tokens.

Plain PyTorch (gather pages, then ``scaled_dot_product_attention``) on every device and dtype.
On the CPU in float32 or bfloat16, every token instead goes to the native kernel
(kernels/paged_decode.c) in one call per layer, as a query attending to its sequence's context
up to its own position, read where it lies in the pool. Torch's decode path copied every
sequence's pages, padded to the longest, per layer and step (about half of decode attention's
time on CPU); its prefill path is one SDPA call per sequence, which on CPU takes the unfused
math path for grouped-query heads: the kernel was 1.3-2x faster from 16 to 1024 prompt tokens
(one thread, 8 heads, 4 KV heads of 64). The layer's cache is ``kv[:, layer]`` of the pool view
laid out in layout.py:
``[num_pages, 2, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from ctypes import CDLL
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from serving.engine import kernels


@dataclass
class AttentionMetadata:
    """Where each flattened token writes its K/V and which cached context each query reads.

    Tokens are ordered: all prefill tokens (sequence by sequence), then one token per decoding
    sequence. Block tables are padded with ``pad_page``; padded slots are masked out.

    Attention gathers whole pages and masks by position, so every slot it may read past a
    sequence's context must hold a finite value (0 * NaN would leak through softmax): the pool
    zeroes KV pages when it hands them out and pads with its null page, which stays zero.
    """

    slot_pages: Tensor  # [T] page of each new token's K/V
    slot_offsets: Tensor  # [T] offset inside that page
    prefill_seq_lens: list[int]  # new (query) tokens per prefill sequence
    prefill_ctx_lens: list[int]  # total tokens of the sequence after this chunk
    prefill_block_tables: Tensor  # [n_prefill, max_blocks]
    decode_ctx_lens: Tensor  # [n_decode] total tokens including the one being decoded
    decode_block_tables: Tensor  # [n_decode, max_blocks]
    num_prefill_tokens: int
    positions: Tensor | None = None  # [T] filled by build(); what forward() expects
    # Per token: its sequence's block table (padded to the step's widest) and its context,
    # position + 1. The native kernel's view of the step; made on first use, once per step.
    token_seq: Tensor | None = None  # [T] index into all_block_tables (host)
    all_block_tables: Tensor | None = None  # [n_seqs, max_blocks] (host): prefill, then decode
    _per_token: tuple[Tensor, Tensor] | None = None

    @property
    def num_decode_tokens(self) -> int:
        return self.decode_ctx_lens.shape[0]

    @classmethod
    def build(
        cls,
        block_size: int,
        prefill_seq_lens: Sequence[int],
        prefill_ctx_lens: Sequence[int],
        prefill_block_tables: Sequence[Sequence[int]],
        decode_ctx_lens: Sequence[int],
        decode_block_tables: Sequence[Sequence[int]],
        device: torch.device | str = "cpu",
        pad_page: int = 0,
    ) -> AttentionMetadata:
        """Metadata (and token positions) for one step, from per-sequence host-side lists.

        A block table may be longer than the sequence needs (pages reserved ahead); only the
        pages covering ``ctx_len`` tokens are kept, so decode gathers no more than it must.
        """
        n_prefill = len(prefill_seq_lens)
        q_lens = torch.tensor([*prefill_seq_lens, *[1] * len(decode_ctx_lens)], dtype=torch.long)
        ctx = torch.tensor([*prefill_ctx_lens, *decode_ctx_lens], dtype=torch.long)
        if bool((q_lens <= 0).any()) or bool((q_lens > ctx).any()):
            raise ValueError("need 0 < q_len <= ctx_len for every sequence")
        tables = _pad_tables([*prefill_block_tables, *decode_block_tables], ctx, block_size,
                             pad_page)
        # Token -> sequence index and position, without a Python loop over tokens.
        seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        positions = (ctx - q_lens)[seq] + torch.arange(len(seq)) - starts[seq]
        slot_pages = tables[seq, positions // block_size]
        pw = _width(ctx[:n_prefill], block_size)
        dw = _width(ctx[n_prefill:], block_size)

        def put(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return cls(
            slot_pages=put(slot_pages),
            slot_offsets=put(positions % block_size),
            prefill_seq_lens=list(prefill_seq_lens),
            prefill_ctx_lens=list(prefill_ctx_lens),
            prefill_block_tables=put(tables[:n_prefill, :pw]),
            decode_ctx_lens=put(ctx[n_prefill:]),
            decode_block_tables=put(tables[n_prefill:, :dw]),
            num_prefill_tokens=int(q_lens[:n_prefill].sum()),
            positions=put(positions),
            token_seq=seq,
            all_block_tables=tables,
        )

    def per_token(self) -> tuple[Tensor, Tensor]:
        """(block tables [T, max_blocks], context lengths [T]): every token as one query over
        its sequence's cache up to its own position, on the positions' device."""
        if self._per_token is None:
            device = self.positions.device
            tables = self.all_block_tables.index_select(0, self.token_seq)
            self._per_token = tables.to(device), self.positions + 1
        return self._per_token


def _width(ctx: Tensor, block_size: int) -> int:
    return int((ctx.max() + block_size - 1) // block_size) if len(ctx) else 0


def _pad_tables(tables: Sequence[Sequence[int]], ctx: Tensor, block_size: int,
                pad_page: int) -> Tensor:
    need = ((ctx + block_size - 1) // block_size).tolist()
    out = torch.full((len(tables), max(need, default=0)), pad_page, dtype=torch.long)
    for i, (table, n) in enumerate(zip(tables, need, strict=True)):  # per sequence, not token
        if len(table) < n:
            raise ValueError(f"sequence {i}: block table has {len(table)} pages, needs {n}")
        out[i, :n] = torch.as_tensor(list(table[:n]), dtype=torch.long)
    return out


def write_kv(kv_layer: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' K/V [T, kv_heads, head_dim] in their slots (one index_put)."""
    # Advanced indices split by a slice put the token dim first: the target is [T, 2, kvh, hd].
    kv_layer[meta.slot_pages, :, meta.slot_offsets] = torch.stack((k, v), 1).to(kv_layer.dtype)


def _gather(kv_layer: Tensor, tables: Tensor) -> tuple[Tensor, Tensor]:
    """K and V [n, blocks * block_size, kvh, hd] of the pages in ``tables`` (one index_select).

    Slots past each sequence's context are read as they are, finite by the pool's contract
    (see AttentionMetadata), and left to the attention mask.
    """
    n, blocks = tables.shape
    pages = kv_layer.index_select(0, tables.reshape(-1))  # [n * blocks, 2, bs, kvh, hd]
    pages = pages.view(n, blocks, *pages.shape[1:])
    bs = pages.shape[3]
    k = pages[:, :, 0].reshape(n, blocks * bs, *pages.shape[-2:])
    v = pages[:, :, 1].reshape(n, blocks * bs, *pages.shape[-2:])
    return k, v


def _grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Masked GQA attention without repeating K/V: each kv head's query group is folded into
    the query-length axis, so a single SDPA call serves all heads.

    q [B, Lq, H, D], k/v [B, S, kvh, D], mask [B, Lq, S] (True = attend) -> [B, Lq, H, D].
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the pool's dtype differs from the model's
    g = h // kvh
    # HF's repeat_kv maps query head i to kv head i // g, hence the (kvh, g) split.
    q = q.view(b, lq, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * lq, d)
    if lq == 1:
        mask = mask[:, None]  # [B, 1, 1, S] broadcasts over heads and the group
    else:
        mask = mask[:, None, None].expand(b, 1, g, lq, mask.shape[-1]).reshape(b, 1, g * lq, -1)
    # SDPA kernels (flash, mem-efficient, CPU flash, and the math path for half types)
    # accumulate the softmax in fp32, so no explicit upcast is needed for bf16/fp16.
    out = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.view(b, kvh, g, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def _window_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    # Causal, plus HF's sliding-window overlay (kv_idx > q_idx - window) when the layer has one.
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _prefill_one(
    q: Tensor, k: Tensor, v: Tensor, kv_layer: Tensor, table: Tensor, ctx: int,
    scale: float, window: int | None,
) -> Tensor:
    """Attention of one sequence's q_len new tokens to its ctx_len-token context."""
    q_len, h, _ = q.shape
    if ctx == q_len:
        # No cached context: attend to the fresh K/V directly (lets CUDA pick flash attention).
        if window is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=h != k.shape[1],
            )
            return out.transpose(0, 1)
        kc, vc = k[None], v[None]
    else:
        nb = -(-ctx // kv_layer.shape[2])
        kc, vc = _gather(kv_layer, table[None, :nb])
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
    mask = _window_mask(q_pos, torch.arange(kc.shape[1], device=q.device), window)
    return _grouped_sdpa(q[None], kc, vc, mask[None], scale)[0]


def _decode(
    q: Tensor, kv_layer: Tensor, meta: AttentionMetadata, scale: float, window: int | None
) -> Tensor:
    """One batched attention for all decode tokens, q [n, H, D]; no host sync, graph-safe."""
    tables = meta.decode_block_tables
    k_pos = torch.arange(tables.shape[1] * kv_layer.shape[2], device=q.device)
    k, v = _gather(kv_layer, tables)
    mask = _window_mask(meta.decode_ctx_lens - 1, k_pos, window)
    return _grouped_sdpa(q[:, None], k, v, mask[:, None], scale)[:, 0]


def _native_attention_lib(q: Tensor, kv_layer: Tensor) -> CDLL | None:
    """The attention kernel's library where it serves these tensors, else None (torch path)."""
    if not kernels.cpu_inference(q, kv_layer):
        return None
    return kernels.paged_decode_lib()


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_layer: Tensor, meta: AttentionMetadata,
    scale: float, window: int | None = None,
) -> Tensor:
    """Write the new K/V into the cache, then attend. q [T, H, D], k/v [T, kvh, D] -> [T, H, D].

    ``window`` is the layer's sliding window (None for full attention).
    """
    write_kv(kv_layer, k, v, meta)
    lib = _native_attention_lib(q, kv_layer)
    if lib is not None:
        tables, ctx = meta.per_token()
        return kernels.paged_decode(lib, q, kv_layer, tables, ctx, scale, window)
    out = torch.empty_like(q)
    # Few sequences prefill per step (chunked prefill), so a loop over them is cheap; it avoids
    # padding every chunk to the longest one.
    start = 0
    lens = zip(meta.prefill_seq_lens, meta.prefill_ctx_lens, strict=True)
    for i, (q_len, ctx) in enumerate(lens):
        end = start + q_len
        out[start:end] = _prefill_one(
            q[start:end], k[start:end], v[start:end], kv_layer,
            meta.prefill_block_tables[i], ctx, scale, window,
        )
        start = end
    if meta.num_decode_tokens:
        out[meta.num_prefill_tokens:] = _decode(
            q[meta.num_prefill_tokens:], kv_layer, meta, scale, window
        )
    return out
