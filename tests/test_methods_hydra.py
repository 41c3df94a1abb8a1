"""Hydra: the layer formula, and merged == unmerged == exported rank r_p + r_s LoRA."""

from __future__ import annotations

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


def test_layer_matches_formula(tiny_qwen2):
    hydra = create_adapter(load_base(tiny_qwen2), make_config(
        "hydra", r_parallel=2, r_sequential=3, alpha=10, target_modules=["k_proj"],
    ))
    randomize(hydra)
    layer = hydra.model.get_submodule("model.layers.1.self_attn.k_proj")
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    assert b0.abs().max() > 0  # Qwen2's QKV bias, so the sequential bias path is exercised
    x = torch.randn(3, layer.in_features)
    h = x @ W0.T + b0
    s = 10 / 5
    want = (h + s * (x @ layer.parallel_A.T @ layer.parallel_B.T)
            + s * (h @ layer.sequential_A.T @ layer.sequential_B.T))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=ATOL, rtol=1e-5)
        delta = layer.lowrank()
    assert delta.rank == 5 and delta.bias is not None
    torch.testing.assert_close(h + x @ delta.weight().T + delta.bias, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("ranks", [(2, 3), (0, 4), (4, 0)])
def test_merged_unmerged_and_exported_agree(tiny_checkpoint, tmp_path, ranks):
    r_p, r_s = ranks
    hydra = create_adapter(load_base(tiny_checkpoint), make_config(
        "hydra", r_parallel=r_p, r_sequential=r_s, alpha=8, use_rslora=r_p == 0,
    ))
    randomize(hydra)
    inputs = batch(hydra.model.config.vocab_size)
    unmerged = logits(hydra, inputs)
    assert_changed(unmerged, logits(load_base(tiny_checkpoint), inputs))

    hydra.export_peft_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(load_base(tiny_checkpoint), tmp_path).eval()
    peft_config = peft_model.peft_config["default"]
    assert peft_config.r == peft_config.lora_alpha == r_p + r_s
    has_bias = hydra.model.model.layers[0].self_attn.q_proj.bias is not None
    # Only the sequential branch over a biased base layer yields a bias term.
    assert peft_config.lora_bias == (has_bias and r_s > 0)
    torch.testing.assert_close(logits(peft_model, inputs), unmerged, atol=ATOL, rtol=0)

    merged = hydra.merge_and_unload()
    assert not any("sequential" in n or "parallel" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), unmerged, atol=ATOL, rtol=0)


def test_gradients_reach_both_branches(tiny_llama):
    hydra = create_adapter(load_base(tiny_llama), make_config("hydra", r_parallel=2,
                                                               r_sequential=2))
    # Default init: B zero, so only the B factors get gradient at step 0 (as in LoRA).
    hydra(**batch(hydra.model.config.vocab_size)).loss.backward()
    layer = hydra.model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.parallel_B.grad.abs().sum() > 0
    assert layer.sequential_B.grad.abs().sum() > 0
    assert layer.parallel_A.grad.abs().sum() == 0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
