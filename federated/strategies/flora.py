"""FLoRA: exact aggregation by stacking the clients' factors (Wang et al., 2024).

``A = [A_1; …; A_K]`` and ``B = [w_1 B_1, …, w_K B_K]`` give ``B @ A = Σ w_k B_k A_k`` exactly;
the global rank is the sum of the client ranks. How the run continues (see server_app): the
server keeps the stack of every round, clients merge ``B @ A`` into their base weights and
train a fresh adapter each round, and the final adapter is the whole stack as one LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from federated.strategies.base import Arrays, Pairs, normalize_weights, pair_keys


def flora(updates: Sequence[Pairs], weights: Sequence[float]) -> Pairs:
    """Per module, the stacked ``(A [Σr_k, d_in], B [d_out, Σr_k])`` with weights folded into B."""
    w = normalize_weights(weights)
    out: Pairs = {}
    for name in updates[0]:
        dtype = updates[0][name][1].dtype
        A = np.concatenate([u[name][0] for u in updates], axis=0)
        B = np.concatenate(
            [(wk * u[name][1].astype(np.float64)).astype(dtype) for wk, u in zip(w, updates,
                                                                                  strict=True)],
            axis=1,
        )
        out[name] = (A, B)
    return out


def stack_rounds(previous: Pairs | None, new: Pairs) -> Pairs:
    """Append this round's stack to the run's: the global delta is the sum of every round's."""
    if not previous:
        return dict(new)
    return {
        name: (
            np.concatenate([previous[name][0], A], axis=0),
            np.concatenate([previous[name][1], B], axis=1),
        )
        for name, (A, B) in new.items()
    }


def stack_flat(previous: Arrays, new: Arrays) -> Arrays:
    """``stack_rounds`` over flat ``{key: array}`` dicts (A keys by rows, B keys by columns)."""
    if not previous:
        return dict(new)
    out: Arrays = {}
    for a_key, b_key in pair_keys(list(new)).values():
        out[a_key] = np.concatenate([previous[a_key], new[a_key]], axis=0)
        out[b_key] = np.concatenate([previous[b_key], new[b_key]], axis=1)
    return out
