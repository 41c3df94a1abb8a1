"""Which pool shards build which rank vector: MoS's fixed, seeded index sets.

Pool layout (per projection type, per pool): rows ``[0, n_pub)`` are the public shards,
``n_pub = (e - p) * L * l``; then layer ``i`` owns rows ``n_pub + i*p*l ... n_pub + (i+1)*p*l``.
A layer's index vector has ``r * l`` entries: shards of rank vector ``k`` are entries
``k*l ... (k+1)*l``; the first ``r - p`` vectors are public draws, the last ``p`` private.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def pool_rows(num_layers: int, pool_vectors_per_layer: int, shards_per_vector: int) -> int:
    """Shards in one pool: ``e * L * l``."""
    return pool_vectors_per_layer * num_layers * shards_per_vector


def type_generator(seed: int, projection: str) -> torch.Generator:
    """A generator per projection type; crc32, not hash(), so indices survive restarts."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 1_000_003 + zlib.crc32(projection.encode()))
    return gen


def _public_draws(num_layers: int, count: int, n_pub: int, gen: torch.Generator) -> Tensor:
    """``[L, count]`` public shard ids, distinct within a layer while the public pool allows.

    When a layer needs more shards than the public pool holds, successive independent
    permutations are concatenated, so each shard repeats as evenly as possible.
    """
    if count == 0:
        return torch.empty(num_layers, 0, dtype=torch.long)
    reps = -(-count // n_pub)
    keys = torch.rand(num_layers, reps, n_pub, generator=gen)
    return keys.argsort(dim=-1).reshape(num_layers, reps * n_pub)[:, :count]


def build_indices(
    num_layers: int,
    rank: int,
    private_rank: int,
    pool_vectors_per_layer: int,
    shards_per_vector: int,
    gen: torch.Generator,
) -> Tensor:
    """``[L, r * l]`` int64 shard ids into one pool; call once for A and once for B."""
    per_vector, p = shards_per_vector, private_rank
    n_pub = (pool_vectors_per_layer - p) * num_layers * per_vector
    public = _public_draws(num_layers, (rank - p) * per_vector, n_pub, gen)
    n_priv = p * per_vector
    private = n_pub + torch.arange(num_layers * n_priv).reshape(num_layers, n_priv)
    return torch.cat([public, private], dim=1)
