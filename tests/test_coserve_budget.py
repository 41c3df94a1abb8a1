"""The fine-tuning share: the SLO controller shrinks it under load down to the minimum share
and grows it back; deficit round robin shares it fairly between jobs."""

from __future__ import annotations

import pytest

from serving.engine.coserve import CoserveConfig
from serving.engine.coserve.budget import FairShare, SloController
from serving.engine.sampling import SamplingParams
from tests.coserve_support import attach_job, detach_all, train_config
from tests.test_server_support import make_engine


def test_misses_shrink_the_share_and_it_grows_back():
    slo = SloController(CoserveConfig(min_share=0.1, tpot_slo_s=0.010, cooldown_iters=0,
                                      ft_token_cost=1.0))
    assert slo.allowance(100, 20) == 80  # inference first, fine-tuning gets the rest
    shares = []
    for _ in range(8):
        assert slo.observe(tpot_s=0.030)
        shares.append(slo.allowance(100, 20))
    assert shares == sorted(shares, reverse=True) and shares[0] < 80
    assert shares[-1] == 10  # the floor: min_share of the budget
    missed = [slo.observe(tpot_s=0.005) for _ in range(40)]
    # The smoothed inter-token time takes a few iterations to fall under the target.
    assert missed[0] and not any(missed[10:])
    assert slo.allowance(100, 20) == 80


def test_minimum_share_holds_under_any_load():
    slo = SloController(CoserveConfig(min_share=0.07, ttft_slo_s=0.1, tpot_slo_s=0.01,
                                      ft_token_cost=1.0))
    for _ in range(50):
        slo.observe(tpot_s=1.0, ttfts_s=[5.0])
    for inference in (0, 50, 100, 400):
        assert slo.allowance(100, inference) >= 7
    assert slo.allowance(100, 100) == 7  # inference took the whole budget
    off = SloController(CoserveConfig(min_share=0.0))
    assert off.allowance(100, 100) == 0
    # A fine-tuning token (forward and backward) costs three inference tokens by default.
    assert SloController(CoserveConfig(min_share=0.3)).allowance(100, 100) == 10
    assert SloController(CoserveConfig()).allowance(100, 40) == 20


def test_first_token_misses_count_and_a_decrease_gets_time_to_act():
    slo = SloController(CoserveConfig(ttft_slo_s=0.2, cooldown_iters=3, decrease=0.5))
    assert not slo.observe(ttfts_s=[0.1] * 9)
    slo.observe(ttfts_s=[0.5, 0.5])  # the window's p90 crosses the target
    assert slo.scale == 0.5
    for _ in range(3):  # still within the cool-down: no second halving
        slo.observe(ttfts_s=[0.5])
    assert slo.scale == 0.5 and slo.misses == 4
    slo.observe(ttfts_s=[0.5])
    assert slo.scale == 0.25
    assert not slo.observe()  # an iteration without new samples is no miss
    no_target = SloController(CoserveConfig())
    assert not no_target.observe(tpot_s=10.0, ttfts_s=[10.0])


def test_deficit_round_robin_is_fair_to_long_sequences():
    fair = FairShare()
    costs = {"short": 10, "long": 60}
    for _ in range(300):
        for key, limit in fair.grant(20, [(k, 1.0, c) for k, c in costs.items()]):
            while limit >= costs[key]:  # runs whole slices while the deficit covers them
                fair.charge(key, costs[key])
                limit -= costs[key]
    served = fair.served
    assert abs(served["short"] - served["long"]) <= 60
    assert served["short"] + served["long"] >= 0.95 * 20 * 300
    weighted = FairShare()
    for _ in range(200):
        for key, limit in weighted.grant(30, [("a", 2.0, 5), ("b", 1.0, 5)]):
            n = limit // 5 * 5
            if n:
                weighted.charge(key, n)
    assert weighted.served["a"] == pytest.approx(2 * weighted.served["b"], rel=0.05)


def test_two_jobs_share_the_engine_fairly(tiny_llama):
    engine = make_engine(tiny_llama, num_pages=4096, max_batched_tokens=48)
    try:
        coserver, a = attach_job(engine, "lora", CoserveConfig(overlap=False),
                                 train=train_config(steps=100), name="a")
        _, b = attach_job(engine, "hydra", train=train_config(steps=100, seed=9), name="b",
                          coserver=coserver)
        for _ in range(60):
            engine.step()
        served = coserver.fair.served
        longest = max(max(a.lengths), max(b.lengths)) * 4
        assert min(served[id(a)], served[id(b)]) > 0
        assert abs(served[id(a)] - served[id(b)]) <= longest
    finally:
        detach_all(engine)


def test_load_shrinks_fine_tuning_to_its_minimum_share(tiny_llama):
    engine = make_engine(tiny_llama, num_pages=4096, max_batched_tokens=64, max_queue=256)
    try:
        # An unreachable target: every iteration with decodes misses it.
        config = CoserveConfig(overlap=False, min_share=0.25, tpot_slo_s=1e-6,
                               cooldown_iters=0)
        coserver, trainee = attach_job(engine, "lora", config, train=train_config(steps=500))
        for _ in range(10):  # idle: fine-tuning takes the whole budget
            engine.step()
        idle_rate = trainee.tokens_trained / 10
        for i in range(4):
            engine.add_request([5 + i, 6, 7], SamplingParams(max_tokens=60, ignore_eos=True))
        for _ in range(5):
            engine.step()
        start, steps = coserver.fair.served[id(trainee)], 40
        for _ in range(steps):
            engine.step()
        loaded = (coserver.fair.served[id(trainee)] - start) / steps
        assert coserver.slo.scale < 0.01 and coserver.slo.misses >= steps
        floor = 0.25 * 64 / config.ft_token_cost
        # The floor, within one sequence of rounding (slices are whole sequences).
        assert floor - max(trainee.lengths) / steps <= loaded <= floor + max(trainee.lengths)
        assert loaded < idle_rate
    finally:
        detach_all(engine)
