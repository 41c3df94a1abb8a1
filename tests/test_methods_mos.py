"""MoS: reduces exactly to LoRA without sharing, fixed parameter budget, sharding structure."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel

from adapterhub.methods import create_adapter, make_config
from tests.test_methods_support import (
    ATOL,
    assert_changed,
    batch,
    load_base,
    logits,
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_no_sharing_equals_peft_lora_outputs_and_gradients(tiny_checkpoint):
    r = 4
    mos = create_adapter(load_base(tiny_checkpoint), make_config(
        "mos", r=r, alpha=8, pool_vectors_per_layer=r, private_rank=r, shards_per_vector=2,
    ))
    randomize(mos)
    lora = create_adapter(load_base(tiny_checkpoint), make_config("lora", r=r, alpha=8))
    factors = {n: (A.detach(), B.detach()) for n, (A, B) in mos.factors().items()}
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = lora.model.get_submodule("base_model.model." + name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)

    inputs = batch(mos.model.config.vocab_size)
    base_logits = logits(load_base(tiny_checkpoint), inputs)
    mos_out, lora_out = mos(**inputs), lora(**inputs)
    assert_changed(mos_out.logits.detach(), base_logits)
    torch.testing.assert_close(mos_out.logits, lora_out.logits, atol=ATOL, rtol=0)
    mos_out.loss.backward()
    lora_out.loss.backward()

    checked = 0
    for name in factors:
        mos_layer = mos.model.get_submodule(name)
        lora_layer = lora.model.get_submodule("base_model.model." + name)
        d_in, d_out = mos_layer.in_features, mos_layer.out_features
        grad_A = mos_layer.pool.A.grad[mos_layer.index_A].reshape(r, d_in)
        grad_B = mos_layer.pool.B.grad[mos_layer.index_B].reshape(r, d_out).t()
        want_A = lora_layer.lora_A["default"].weight.grad
        want_B = lora_layer.lora_B["default"].weight.grad
        assert want_A.abs().max() > 0 and want_B.abs().max() > 0
        torch.testing.assert_close(grad_A, want_A, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(grad_B, want_B, atol=ATOL, rtol=1e-4)
        checked += 1
    assert checked == 7 * mos.model.config.num_hidden_layers


def test_no_sharing_uses_only_private_shards(tiny_llama):
    mos = create_adapter(load_base(tiny_llama), make_config(
        "mos", r=3, pool_vectors_per_layer=3, private_rank=3, shards_per_vector=4,
    ))
    per_layer = 3 * 4
    for i in range(2):
        layer = mos.model.get_submodule(f"model.layers.{i}.self_attn.q_proj")
        own = torch.arange(i * per_layer, (i + 1) * per_layer)
        # Layer i's factors are exactly its own private shards, in order.
        assert torch.equal(layer.index_A, own) and torch.equal(layer.index_B, own)
        A, B = layer.factors()
        torch.testing.assert_close(A, layer.pool.A[own].reshape(3, -1), atol=0, rtol=0)


@pytest.mark.parametrize("r", [1, 2, 4, 6, 9])
def test_trainable_parameters_independent_of_rank(tiny_mistral, r):
    e, p, shards = 4, 1, 2
    model = load_base(tiny_mistral)
    num_layers = model.config.num_hidden_layers
    dims = {name.rpartition(".")[2]: (m.in_features, m.out_features)
            for name, m in model.model.layers[0].named_modules()
            if name.endswith(PROJECTIONS)}
    assert len(dims) == len(PROJECTIONS)
    mos = create_adapter(model, make_config(
        "mos", r=r, pool_vectors_per_layer=e, private_rank=p, shards_per_vector=shards,
    ))
    expected = {n: e * num_layers * (d_in + d_out) for n, (d_in, d_out) in dims.items()}
    got = {n: pool.A.numel() + pool.B.numel() for n, pool in mos.pools.items()}
    assert got == expected
    assert mos.num_trainable_parameters() == sum(expected.values())
    assert all(p.requires_grad for p in mos.trainable_parameters())
    # The active rank still is r: every layer's delta has rank-r factors.
    assert {d.rank for d in mos.lowrank().values()} == {r}


def test_sharding_structure(tiny_llama):
    r, e, p, shards = 5, 3, 2, 2
    config = make_config("mos", r=r, pool_vectors_per_layer=e, private_rank=p,
                         shards_per_vector=shards, seed=3)
    mos = create_adapter(load_base(tiny_llama), config)
    num_layers = 2
    n_pub = (e - p) * num_layers * shards
    layers = [mos.model.get_submodule(f"model.layers.{i}.mlp.up_proj") for i in range(num_layers)]
    split = (r - p) * shards
    for part in ("index_A", "index_B"):
        private = [set(getattr(layer, part)[split:].tolist()) for layer in layers]
        public = [getattr(layer, part)[:split] for layer in layers]
        assert all(len(s) == p * shards for s in private)
        assert not private[0] & private[1]
        assert all(min(s) >= n_pub for s in private)
        assert all(int(ids.max()) < n_pub for ids in public)
    # Pair dissociation: A and B draw their public shards independently.
    assert not torch.equal(layers[0].index_A, layers[0].index_B)
    # Fixed by the seed, and a different seed gives different draws.
    again = create_adapter(load_base(tiny_llama), config)
    other = create_adapter(load_base(tiny_llama), dataclasses.replace(config, seed=4))
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(again.model.get_submodule(name).index_A, layers[0].index_A)
    assert not torch.equal(other.model.get_submodule(name).index_A, layers[0].index_A)


def test_shared_shards_receive_gradient_from_several_layers(tiny_llama):
    # e = 1, p = 0: every layer draws from the same few public shards.
    mos = create_adapter(load_base(tiny_llama), make_config(
        "mos", r=2, pool_vectors_per_layer=1, private_rank=0, shards_per_vector=2,
        target_modules=["q_proj"],
    ))
    randomize(mos)
    ids = [set(mos.model.get_submodule(f"model.layers.{i}.self_attn.q_proj").index_B.tolist())
           for i in range(2)]
    assert ids[0] & ids[1]
    mos(**batch(mos.model.config.vocab_size)).loss.backward()
    assert mos.pools["q_proj"].A.grad.abs().sum() > 0


def test_export_to_peft_lora_and_merge(tiny_checkpoint, tmp_path):
    mos = create_adapter(load_base(tiny_checkpoint), make_config(
        "mos", r=6, pool_vectors_per_layer=4, private_rank=2, shards_per_vector=4, alpha=12,
    ))
    randomize(mos)
    inputs = batch(mos.model.config.vocab_size)
    want = logits(mos, inputs)
    assert_changed(want, logits(load_base(tiny_checkpoint), inputs))

    mos.export_peft_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(load_base(tiny_checkpoint), tmp_path).eval()
    assert peft_model.peft_config["default"].r == 6
    assert peft_model.peft_config["default"].lora_alpha == 6
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=ATOL, rtol=0)

    merged = mos.merge_and_unload()
    assert not any("pool" in n or "index" in n for n, _ in merged.named_buffers())
    torch.testing.assert_close(logits(merged, inputs), want, atol=ATOL, rtol=0)
