"""Bad adapter directories and adapters that do not fit the base: clear errors, base untouched."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods import create_adapter, load_adapter, make_config
from adapterhub.methods.layer_base import AdapterLayer
from tests.test_methods_support import (
    load_base,
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
)

CONFIGS = {
    "lora": make_config("lora", r=4),
    "mos": make_config("mos", r=4, pool_vectors_per_layer=2, private_rank=1),
    "hydra": make_config("hydra", r_parallel=2, r_sequential=2),
}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(params=list(CONFIGS))
def saved(request, tiny_llama, tmp_path):
    """A saved adapter of each method on tiny_llama."""
    adapter = create_adapter(load_base(tiny_llama), CONFIGS[request.param])
    randomize(adapter)
    adapter.save(tmp_path / "adapter")
    return tmp_path / "adapter"


def _is_plain(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer | BaseTunerLayer) for m in model.modules())


def _small_llama(hidden: int = 32, layers: int = 2) -> AutoModelForCausalLM:
    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_pickle_only_dir_is_refused(saved, tiny_llama):
    weights = saved / WEIGHTS
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded")
    weights.unlink()
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(load_base(tiny_llama), saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved, tiny_llama, damage):
    weights = saved / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64,
                         "empty": b""}[damage])
    model = load_base(tiny_llama)
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter(model, saved)
    assert _is_plain(model)


def test_nan_tensor(saved, tiny_llama):
    tensors = load_file(saved / WEIGHTS)
    key = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[key][0, 0] = float("nan")
    save_file(tensors, saved / WEIGHTS)
    with pytest.raises(AdapterError, match=f"{key}.*NaN"):
        load_adapter(load_base(tiny_llama), saved)


def test_different_hidden_size(saved):
    model = _small_llama(hidden=32)
    message = r"shape mismatch for \S+: adapter has \[.*\], LlamaForCausalLM needs \["
    with pytest.raises(IncompatibleAdapterError, match=message):
        load_adapter(model, saved)
    assert _is_plain(model)  # the failed load took its layers out again


def test_fewer_layers_than_the_adapter(saved):
    model = _small_llama(hidden=64, layers=1)
    # LoRA and Hydra miss layer 1's modules; MoS's pools are sized by the layer count.
    with pytest.raises(IncompatibleAdapterError, match="layers.1|shape mismatch"):
        load_adapter(model, saved)
    assert _is_plain(model)


def test_missing_target_module(tiny_llama):
    model = load_base(tiny_llama)
    config = make_config("hydra", target_modules=["q_proj", "c_attn"])
    with pytest.raises(IncompatibleAdapterError, match="c_attn"):
        create_adapter(model, config)
    assert _is_plain(model)


def test_mos_shards_must_divide_dims(tiny_llama):
    model = load_base(tiny_llama)
    with pytest.raises(IncompatibleAdapterError, match="shards_per_vector=3"):
        create_adapter(model, make_config("mos", shards_per_vector=3))
    assert _is_plain(model)


def test_out_of_range_mos_index(tiny_llama, tmp_path):
    mos = create_adapter(load_base(tiny_llama), CONFIGS["mos"])
    mos.save(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in tensors if k.endswith("index_A"))
    tensors[key][0] = 10_000
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(AdapterError, match="outside the pool"):
        load_adapter(load_base(tiny_llama), tmp_path)


def test_no_second_adapter(tiny_llama):
    adapter = create_adapter(load_base(tiny_llama), CONFIGS["hydra"])
    with pytest.raises(AdapterError, match="already carries"):
        create_adapter(adapter.model, CONFIGS["lora"])


def test_state_dict_shape_check(tiny_llama):
    adapter = create_adapter(load_base(tiny_llama), CONFIGS["lora"])
    sd = adapter.adapter_state_dict()
    key = next(iter(sd))
    with pytest.raises(IncompatibleAdapterError, match="shape mismatch"):
        adapter.load_adapter_state_dict({**sd, key: torch.zeros(1)})
    with pytest.raises(IncompatibleAdapterError, match="lacks"):
        adapter.load_adapter_state_dict({k: v for k, v in sd.items() if k != key})
