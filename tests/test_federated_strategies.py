"""Aggregation rules and update validation of the federated package (pure numpy, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from federated.strategies import (
    STRATEGIES,
    aggregate,
    check_supported,
    fedit,
    ffa_lora,
    flora,
    lora_fair,
    stack_rounds,
)
from federated.strategies.base import b_key_of, ideal_delta, pair_keys
from federated.validation import UpdateRejected, validate_update

D_IN, D_OUT, R = 12, 10, 3
WEIGHTS = [3.0, 1.0, 2.0]


def _pairs(seed: int, modules=("q", "v"), rank: int = R) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: (rng.normal(size=(rank, D_IN)).astype(np.float32),
            rng.normal(size=(D_OUT, rank)).astype(np.float32))
        for m in modules
    }


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("rule", [fedit, flora, lora_fair])
def test_one_client_is_the_identity(rule):
    update = _pairs(0)
    out = rule([update], [5.0])
    for name, (A, B) in update.items():
        np.testing.assert_allclose(out[name][1] @ out[name][0], B @ A, rtol=1e-4, atol=1e-4)
    if rule is not lora_fair:  # LoRA-FAIR may re-balance B, but with one client B' = B.
        for name, (A, _) in update.items():
            np.testing.assert_array_equal(out[name][0], A)


def test_lora_fair_one_client_keeps_b():
    update = _pairs(0)
    out = lora_fair([update], [1.0])
    for name, (A, B) in update.items():
        np.testing.assert_allclose(out[name][0], A, rtol=1e-6)
        np.testing.assert_allclose(out[name][1], B, rtol=1e-3, atol=1e-4)


def test_ffa_one_client_is_the_identity():
    b = {"x.lora_B.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    out = ffa_lora([b], [2.0])
    np.testing.assert_array_equal(out["x.lora_B.weight"], b["x.lora_B.weight"])


def test_flora_reproduces_the_weighted_sum_exactly():
    updates = [_pairs(s) for s in range(3)]
    out = flora(updates, WEIGHTS)
    for name in updates[0]:
        A, B = out[name]
        assert A.shape == (3 * R, D_IN) and B.shape == (D_OUT, 3 * R)
        np.testing.assert_allclose(B @ A, ideal_delta(updates, WEIGHTS, name), rtol=1e-5,
                                   atol=1e-5)


def test_flora_rounds_accumulate():
    first, second = flora([_pairs(0)], [1.0]), flora([_pairs(1), _pairs(2)], [1.0, 1.0])
    total = stack_rounds(stack_rounds(None, first), second)
    for name in first:
        want = first[name][1] @ first[name][0] + second[name][1] @ second[name][0]
        np.testing.assert_allclose(total[name][1] @ total[name][0], want, rtol=1e-5, atol=1e-5)


def test_ffa_reproduces_the_weighted_sum_exactly():
    shared_A = _pairs(99)["q"][0]
    clients = [_pairs(s)["q"][1] for s in range(3)]
    out = ffa_lora([{"q.lora_B.weight": b} for b in clients], WEIGHTS)
    ideal = ideal_delta([{"q": (shared_A, b)} for b in clients], WEIGHTS, "q")
    np.testing.assert_allclose(out["q.lora_B.weight"] @ shared_A, ideal, rtol=1e-5, atol=1e-5)


def test_lora_fair_is_closer_to_the_ideal_than_fedit():
    updates = [_pairs(s) for s in range(3)]
    fair, avg = lora_fair(updates, WEIGHTS), fedit(updates, WEIGHTS)
    for name in updates[0]:
        ideal = ideal_delta(updates, WEIGHTS, name)
        cos_fair = _cos(fair[name][1] @ fair[name][0], ideal)
        cos_avg = _cos(avg[name][1] @ avg[name][0], ideal)
        assert cos_fair > cos_avg + 0.05, (cos_fair, cos_avg)
        # A keeps FedIT's average: only B is corrected.
        np.testing.assert_allclose(fair[name][0], avg[name][0])


def test_fedit_averages_each_factor():
    updates = [_pairs(s) for s in range(3)]
    out = fedit(updates, WEIGHTS)
    w = np.asarray(WEIGHTS) / sum(WEIGHTS)
    want = sum(wk * u["q"][0].astype(np.float64) for wk, u in zip(w, updates, strict=True))
    np.testing.assert_allclose(out["q"][0], want, rtol=1e-5)


def _flat(pairs: dict, extra: bool = True) -> dict:
    out = {}
    for m, (A, B) in pairs.items():
        out[f"base_model.model.{m}.lora_A.weight"] = A
        out[f"base_model.model.{m}.lora_B.weight"] = B
    if extra:
        out["bias"] = np.ones(4, dtype=np.float32) * len(pairs)
    return out


@pytest.mark.parametrize("strategy", ["fedit", "flora", "lora-fair"])
def test_aggregate_flat_updates(strategy):
    updates = [_flat(_pairs(s)) for s in range(3)]
    out = aggregate(strategy, updates, WEIGHTS)
    assert set(out) == set(updates[0])
    np.testing.assert_allclose(out["bias"], updates[0]["bias"])
    if strategy == "flora":
        A, B = out["base_model.model.q.lora_A.weight"], out["base_model.model.q.lora_B.weight"]
        ideal = ideal_delta([_pairs(s) for s in range(3)], WEIGHTS, "q")
        np.testing.assert_allclose(B @ A, ideal, rtol=1e-5, atol=1e-5)


def test_aggregate_ffa_means_everything():
    updates = [{"m.parallel_B": np.full((2, 2), float(k), np.float32)} for k in range(3)]
    out = aggregate("ffa-lora", updates, [1, 1, 1])
    np.testing.assert_allclose(out["m.parallel_B"], np.ones((2, 2)))


def test_pairing_rules():
    assert b_key_of("a.lora_A.weight") == "a.lora_B.weight"
    assert b_key_of("l.parallel_A") == "l.parallel_B"
    assert b_key_of("pools.q_proj.A") == "pools.q_proj.B"
    assert b_key_of("l.index_A") == "l.index_B"  # never sent: not a float tensor
    assert b_key_of("l.lora_B.weight") is None
    assert set(pair_keys(["x.sequential_A", "x.sequential_B", "y.parallel_A"])) == {
        "x.sequential_A"
    }


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown strategy"):
        aggregate("fedsgd", [{"x": np.zeros(1)}], [1])
    with pytest.raises(ValueError, match="no client updates"):
        aggregate("fedit", [], [])
    with pytest.raises(ValueError, match="weights"):
        aggregate("fedit", [{"x": np.zeros(1)}], [0.0])


def test_check_supported():
    for strategy in STRATEGIES:
        check_supported(strategy, "lora")
    with pytest.raises(ValueError, match="does not support method 'mos'"):
        check_supported("flora", "mos")
    with pytest.raises(ValueError, match="unknown strategy"):
        check_supported("krum", "lora")


SHAPES = {"a": (2, 3), "b": (3, 2)}


def _good() -> dict:
    return {k: np.ones(s, np.float32) for k, s in SHAPES.items()}


def test_validation_accepts_a_sane_update():
    validate_update(_good(), SHAPES)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: u.pop("b"), "wrong keys"),
        (lambda u: u.update(c=np.ones(1, np.float32)), "wrong keys"),
        (lambda u: u.update(a=np.ones((3, 2), np.float32)), "shape"),
        (lambda u: u["a"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda u: u["b"].__setitem__((1, 1), np.inf), "NaN or Inf"),
        (lambda u: u.update(a=np.ones((2, 3), np.int64)), "float array"),
        (lambda u: u.update(a=np.full((2, 3), 1e4, np.float32)), "norm"),
    ],
)
def test_validation_rejects(mutate, reason):
    update = _good()
    mutate(update)
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(update, SHAPES, max_norm=100.0)
