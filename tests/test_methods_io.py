"""Native save/load round trips, LoRA options through PEFT, and the normalized low-rank form."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from adapterhub.methods import create_adapter, load_adapter, make_config, read_adapter_config
from adapterhub.methods.configs import AdapterConfig
from tests.test_methods_support import (
    ATOL,
    assert_changed,
    batch,
    load_base,
    logits,
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
)

CONFIGS: dict[str, AdapterConfig] = {
    "lora": make_config("lora", r=4, alpha=8),
    "mos": make_config("mos", r=6, pool_vectors_per_layer=3, private_rank=1, alpha=6),
    "hydra": make_config("hydra", r_parallel=2, r_sequential=2, alpha=4),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_load_round_trip(tiny_qwen2, tmp_path, method):
    adapter = create_adapter(load_base(tiny_qwen2), CONFIGS[method])
    randomize(adapter)
    inputs = batch(adapter.model.config.vocab_size)
    want = logits(adapter, inputs)
    assert_changed(want, logits(load_base(tiny_qwen2), inputs))
    adapter.save(tmp_path)

    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapterhub_method"] == method
    assert meta["base_model_name_or_path"] == str(tiny_qwen2)
    assert read_adapter_config(tmp_path) == CONFIGS[method]

    loaded = load_adapter(load_base(tiny_qwen2), tmp_path)
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    torch.testing.assert_close(logits(loaded, inputs), want, atol=0, rtol=0)
    got, saved = loaded.adapter_state_dict(), adapter.adapter_state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in got)

    ids = inputs["input_ids"][:1, :4]
    out = loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_mos_native_storage_is_compact(tiny_llama, tmp_path):
    mos = create_adapter(load_base(tiny_llama), CONFIGS["mos"])
    mos.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    floats = {k for k, t in tensors.items() if t.is_floating_point()}
    assert floats == {f"pools.{p}.{part}" for p in CONFIGS["mos"].target_modules
                      for part in ("A", "B")}
    ints = [t for t in tensors.values() if not t.is_floating_point()]
    assert len(ints) == 2 * 7 * 2 and all(t.dtype == torch.int64 for t in ints)
    assert sum(t.numel() for k, t in tensors.items() if k in floats) == \
        mos.num_trainable_parameters()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_rslora_and_bias(request, tmp_path, family):
    path = request.getfixturevalue(f"tiny_{family}")
    config = make_config("lora", r=4, alpha=6, use_rslora=True, lora_bias=True)
    lora = create_adapter(load_base(path), config)
    randomize(lora)
    inputs = batch(lora.model.config.vocab_size)
    want = logits(lora, inputs)
    assert_changed(want, logits(load_base(path), inputs))

    name = "model.layers.0.self_attn.q_proj"
    peft_layer = lora.model.get_submodule("base_model.model." + name)
    delta = lora.lowrank()[name]
    scale = 6 / math.sqrt(4)
    assert peft_layer.scaling["default"] == pytest.approx(scale)
    torch.testing.assert_close(delta.B, peft_layer.lora_B["default"].weight * scale)
    torch.testing.assert_close(delta.bias, peft_layer.lora_B["default"].bias * scale)

    lora.save(tmp_path / "native")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in \
        load_file(tmp_path / "native" / "adapter_model.safetensors")
    loaded = load_adapter(load_base(path), tmp_path / "native")
    torch.testing.assert_close(logits(loaded, inputs), want, atol=0, rtol=0)

    lora.export_peft_lora(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(load_base(path), tmp_path / "peft").eval()
    cfg = peft_model.peft_config["default"]
    assert cfg.lora_bias and not cfg.use_rslora and cfg.lora_alpha == cfg.r == 4
    torch.testing.assert_close(logits(peft_model, inputs), want, atol=ATOL, rtol=0)

    merged = lora.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), want, atol=ATOL, rtol=0)


def test_plain_peft_dir_loads_as_lora(tiny_mistral, tmp_path):
    lora = create_adapter(load_base(tiny_mistral), make_config("lora", r=2, alpha=5))
    randomize(lora)
    lora.model.save_pretrained(tmp_path)  # PEFT's own writer, not ours
    inputs = batch(lora.model.config.vocab_size)
    loaded = load_adapter(load_base(tiny_mistral), tmp_path)
    assert loaded.config.method == "lora" and loaded.config.alpha == 5
    torch.testing.assert_close(logits(loaded, inputs), logits(lora, inputs), atol=0, rtol=0)


def test_lowrank_keys_are_base_module_paths(tiny_llama):
    paths = None
    for config in CONFIGS.values():
        deltas = create_adapter(load_base(tiny_llama), config).lowrank()
        assert all(k.startswith("model.layers.") for k in deltas)
        for d in deltas.values():
            assert d.A.shape[0] == d.B.shape[1] and d.A.dim() == d.B.dim() == 2
        paths = paths or set(deltas)
        assert set(deltas) == paths and len(paths) == 14


def test_rank_pattern_export(tiny_llama, tmp_path):
    config = make_config("lora", r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={})
    lora = create_adapter(load_base(tiny_llama), config)
    randomize(lora)
    assert lora.lowrank()["model.layers.1.self_attn.v_proj"].rank == 2
    lora.export_peft_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path).eval()
    assert peft_model.peft_config["default"].rank_pattern
    inputs = batch(lora.model.config.vocab_size)
    torch.testing.assert_close(logits(peft_model, inputs), logits(lora, inputs), atol=ATOL,
                               rtol=0)
