"""NF4 (QLoRA-style) bases on CPU: every method trains, merges and exports over a 4-bit W0."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from peft import PeftModel

from adapterhub.methods import create_adapter, make_config
from adapterhub.methods.quant import dequantize_weight
from tests.test_methods_support import (
    batch,
    load_base,
    logits,
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
)

CONFIGS = {
    "lora": make_config("lora", r=4, alpha=8, lora_bias=True),
    "mos": make_config("mos", r=4, pool_vectors_per_layer=2, private_rank=1),
    "hydra": make_config("hydra", r_parallel=2, r_sequential=2),
}


def _packed(layer: bnb.nn.Linear4bit) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def _step_lowers_loss(adapter) -> None:
    adapter.train()
    inputs = batch(adapter.model.config.vocab_size, seed=1)
    optimizer = torch.optim.Adam(adapter.trainable_parameters(), lr=1e-2)
    before = adapter(**inputs).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = adapter(**inputs).loss
    assert after.item() < before.item() - 1e-4


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_step_on_nf4_base(tiny_qwen2, method):
    adapter = create_adapter(load_base(tiny_qwen2, nf4=True), CONFIGS[method])
    four_bit = [m for m in adapter.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14
    assert not any(p.requires_grad for m in four_bit for p in m.parameters())
    trainable = {id(p) for p in adapter.trainable_parameters()}
    assert trainable and all(p.is_floating_point() for p in adapter.trainable_parameters())
    assert not any(id(p) in trainable for m in four_bit for p in m.parameters())
    _step_lowers_loss(adapter)


@pytest.mark.parametrize("method", ["hydra", "mos"])
def test_merge_and_export_over_nf4(tiny_qwen2, tmp_path, method):
    adapter = create_adapter(load_base(tiny_qwen2, nf4=True), CONFIGS[method])
    randomize(adapter)
    # Train mode with dropout 0: bitsandbytes then computes in fp32 (see quant.py).
    adapter.train()
    inputs = batch(adapter.model.config.vocab_size)
    want = logits(adapter, inputs)

    adapter.export_peft_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(load_base(tiny_qwen2, nf4=True), tmp_path).train()
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=1e-4, rtol=0)

    merged = adapter.merge_and_unload().train()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.model.layers.modules())
    torch.testing.assert_close(logits(merged, inputs), want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only "
                    "on CPUs with AVX512-BF16")
def test_cpu_inference_layout_is_undone(tiny_llama):
    model = load_base(tiny_llama, nf4=True)
    layer = model.model.layers[0].mlp.up_proj
    dense = dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    with torch.no_grad():
        model(**batch(model.config.vocab_size))  # eval + no grad: bitsandbytes repacks
    assert _packed(layer)
    # The stock dequantizer misreads the repacked layout; ours does not.
    assert (dequantize_4bit(layer.weight.data, layer.weight.quant_state) - dense).abs().max() > 1e-2
    # The repacked layout keeps absmax in bf16 only, hence the tolerance.
    torch.testing.assert_close(dequantize_weight(layer), dense, atol=1e-3, rtol=1e-2)

    adapter = create_adapter(model, CONFIGS["hydra"])
    assert not _packed(layer)
    torch.testing.assert_close(dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                               dequantize_weight(layer), atol=0, rtol=0)
    _step_lowers_loss(adapter)
    with torch.no_grad():
        adapter.eval()(**batch(model.config.vocab_size))  # no repacking any more
    assert not _packed(layer)
