"""Method configs: construction, validation and the dict round trip."""

from __future__ import annotations

import json

import pytest

from adapterhub.errors import AdapterError
from adapterhub.methods import (
    METHODS,
    HydraConfig,
    LoraConfig,
    MoSConfig,
    config_from_dict,
    make_config,
    read_adapter_config,
)


def test_methods_and_classes():
    assert METHODS == ("lora", "mos", "hydra")
    for method, cls in zip(METHODS, (LoraConfig, MoSConfig, HydraConfig), strict=True):
        config = make_config(method)
        assert type(config) is cls and config.method == method
        assert "gate_proj" in config.target_modules


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, alpha=8, use_rslora=True, lora_bias=True, rank_pattern={"q_proj": 2}),
    MoSConfig(r=6, shards_per_vector=4, pool_vectors_per_layer=3, private_rank=2, seed=7),
    HydraConfig(r_parallel=0, r_sequential=3, target_modules=["q_proj", "v_proj"]),
    LoraConfig(target_modules=r".*\.(q|v)_proj"),
])
def test_dict_round_trip(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert d["method"] == config.method
    assert config_from_dict(d) == config
    assert type(config).from_dict(d) == config
    # A whole native adapter_config.json dict is accepted too.
    assert config_from_dict({**d, "adapterhub_method": config.method,
                             "base_model_name_or_path": "x"}) == config


def test_unknown_method_names_valid_ones():
    with pytest.raises(ValueError, match="lora, mos, hydra"):
        make_config("dora", r=4)
    with pytest.raises(ValueError, match="unknown adapter method"):
        config_from_dict({"method": "ia3"})


def test_unknown_hyperparameter():
    with pytest.raises(ValueError, match="lora_alpha"):
        make_config("lora", lora_alpha=16)
    with pytest.raises(ValueError, match="r_parallel"):
        make_config("mos", r_parallel=2)


@pytest.mark.parametrize(("method", "hparams", "message"), [
    ("mos", {"r": 2, "private_rank": 3, "pool_vectors_per_layer": 4}, "private_rank"),
    ("mos", {"r": 4, "private_rank": 3, "pool_vectors_per_layer": 2}, "pool_vectors_per_layer"),
    ("mos", {"r": 4, "private_rank": 2, "pool_vectors_per_layer": 2}, "pool_vectors_per_layer"),
    ("mos", {"shards_per_vector": 0}, "shards_per_vector"),
    ("lora", {"r": 0}, "r must"),
    ("lora", {"r": 2.5}, "r must"),
    ("lora", {"dropout": 1.0}, "dropout"),
    ("lora", {"target_modules": []}, "target_modules"),
    ("hydra", {"r_parallel": 0, "r_sequential": 0}, "positive"),
    ("hydra", {"alpha": -1}, "alpha"),
])
def test_invalid_values(method, hparams, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **hparams)


def test_read_config_errors(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter_config(tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"adapterhub_method": "foo"}))
    with pytest.raises(AdapterError, match="unknown adapter method"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="IA3"):
        read_adapter_config(tmp_path)
    dora = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(dora))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter_config(tmp_path)


def test_plain_peft_config_reads_as_lora(tmp_path):
    peft_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"],
                "lora_dropout": 0.0, "use_rslora": False, "lora_bias": True, "bias": "none",
                "rank_pattern": {"a": 2}, "alpha_pattern": {"a": 2}, "task_type": "CAUSAL_LM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_cfg))
    config = read_adapter_config(tmp_path)
    assert config == LoraConfig(r=4, alpha=4, target_modules=("q_proj",), lora_bias=True,
                                rank_pattern={"a": 2}, alpha_pattern={"a": 2})
