"""Model side of a federated run: base loading, the global adapter, local training, evaluation.

Everything here is a plain function of (config, arrays, records), so the Flower apps stay thin
and the logic is tested without Flower. The global state is a flat ``{key: ndarray}`` dict:

* FedIT, LoRA-FAIR: every float adapter tensor (A and B factors, MoS pools).
* FFA-LoRA: only the non-A tensors; A is rebuilt from the run seed on every node, frozen.
* FLoRA: the stack of every round's aggregated LoRA factors (rank grows each round). Clients
  merge its product into their base weights and train a fresh adapter (the FLoRA recipe);
  the final adapter is the whole stack as one LoRA of rank ``Σ`` with the same scaling.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterhub.basemodel import default_base_path
from adapterhub.checkpoints import load_base
from adapterhub.data import Record
from adapterhub.methods import AdapterModel, LoraConfig, create_adapter
from adapterhub.methods.config_base import lora_scaling
from adapterhub.train import Trainer, evaluate
from federated.config import FedConfig
from federated.strategies.base import Arrays, is_a_key

_BASES: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}


def base_path(cfg: FedConfig) -> Path:
    return Path(cfg.base_model) if cfg.base_model else default_base_path()


def fresh_base(cfg: FedConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A private copy of the base model (loaded once per process) and its tokenizer."""
    key = str(base_path(cfg))
    if key not in _BASES:
        _BASES[key] = load_base(key)
    model, tok = _BASES[key]
    return copy.deepcopy(model), tok


def seeded_adapter(model: PreTrainedModel, cfg: FedConfig, seed: int) -> AdapterModel:
    """The adapter every node builds identically from ``seed`` (shared init, FFA's frozen A)."""
    torch.manual_seed(seed)
    return create_adapter(model, cfg.adapter_config())


def _live(adapter: AdapterModel) -> dict[str, torch.Tensor]:
    # The live tensors by native key (a protected AdapterModel hook): needed to freeze A.
    return adapter._adapter_tensors()  # noqa: SLF001


def sent_keys(adapter: AdapterModel, strategy: str) -> list[str]:
    """Keys a client uploads: float adapter tensors (MoS index tables are seeded, never sent)."""
    keys = [k for k, t in _live(adapter).items() if t.is_floating_point()]
    if strategy == "ffa-lora":
        keys = [k for k in keys if not is_a_key(k)]
    return sorted(keys)


def to_numpy(tensors: dict[str, torch.Tensor], keys: Sequence[str]) -> Arrays:
    return {k: tensors[k].detach().cpu().float().numpy().copy() for k in keys}


# --- FLoRA: the stacked global delta ---------------------------------------------------------

_PEFT_PREFIX = "base_model.model."
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def flora_scaling(cfg: FedConfig) -> float:
    lora = cfg.adapter_config()
    return lora_scaling(lora.alpha, lora.r, lora.use_rslora)


def merge_stack(model: PreTrainedModel, cfg: FedConfig, stack: Arrays) -> PreTrainedModel:
    """Add ``s · B_stack @ A_stack`` of every module into ``model``'s weights (in place)."""
    from adapterhub.methods import LowRankDelta
    from adapterhub.methods.merge import merge_deltas

    s = flora_scaling(cfg)
    deltas = {
        key.removeprefix(_PEFT_PREFIX).removesuffix(_A_SUFFIX): LowRankDelta(
            A=torch.from_numpy(stack[key]), B=torch.from_numpy(stack[key[: -len(_A_SUFFIX)]
                                                                     + _B_SUFFIX]) * s,
        )
        for key in stack if key.endswith(_A_SUFFIX)
    }
    return merge_deltas(model, deltas)


def stacked_lora_config(cfg: FedConfig, stack: Arrays) -> LoraConfig:
    """A LoRA whose rank is the stack's and whose scaling is the clients' (alpha = s · R)."""
    rank = next(v.shape[0] for k, v in stack.items() if k.endswith(_A_SUFFIX))
    lora = cfg.adapter_config()
    return dataclasses.replace(lora, r=rank, alpha=flora_scaling(cfg) * rank, use_rslora=False,
                               rank_pattern={}, alpha_pattern={})


# --- the global adapter ----------------------------------------------------------------------

def initial_global(cfg: FedConfig) -> Arrays:
    """Round 0's global state (FLoRA: empty, no delta yet)."""
    if cfg.strategy == "flora":
        return {}
    model, _ = fresh_base(cfg)
    adapter = seeded_adapter(model, cfg, cfg.seed)
    return to_numpy(_live(adapter), sent_keys(adapter, cfg.strategy))


def global_model(cfg: FedConfig, arrays: Arrays) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base with the global adapter applied (an AdapterModel, or the bare base if none)."""
    model, tok = fresh_base(cfg)
    if cfg.strategy == "flora":
        if not arrays:
            return model, tok
        adapter = create_adapter(model, stacked_lora_config(cfg, arrays))
        adapter.load_adapter_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        return adapter, tok
    adapter = seeded_adapter(model, cfg, cfg.seed)
    state = adapter.adapter_state_dict()
    state.update({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    adapter.load_adapter_state_dict(state)
    return adapter, tok


def save_global(cfg: FedConfig, arrays: Arrays, out_dir: Path) -> Path:
    """Write the global adapter as a native adapter dir (what gets logged and registered)."""
    model, _ = global_model(cfg, arrays)
    if not isinstance(model, AdapterModel):
        raise ValueError("no global adapter yet: no round has completed")
    model.base_model_name_or_path = str(base_path(cfg))
    model.save(out_dir)
    return out_dir


def evaluate_global(cfg: FedConfig, arrays: Arrays, records: Sequence[Record]) -> dict[str, float]:
    model, tok = global_model(cfg, arrays)
    return evaluate(model, tok, list(records), cfg.max_length, cfg.max_new_tokens)


# --- a client's round ------------------------------------------------------------------------

def local_train(
    cfg: FedConfig, arrays: Arrays, train: Sequence[Record], held_out: Sequence[Record],
    server_round: int,
) -> tuple[Arrays, dict[str, float]]:
    """Train on local records from the global state; return the update and metrics."""
    if cfg.strategy == "flora":
        model, tok = fresh_base(cfg)
        if arrays:
            merge_stack(model, cfg, arrays)
        # A fresh adapter each round: the previous rounds live in the merged base.
        adapter = seeded_adapter(model, cfg, cfg.seed + server_round)
    else:
        adapter, tok = global_model(cfg, arrays)
    if cfg.strategy == "ffa-lora":
        for key, tensor in _live(adapter).items():
            if is_a_key(key):
                tensor.requires_grad_(False)
    trainer = Trainer(adapter, tok, list(train), cfg.train_config(server_round),
                      eval_records=list(held_out), progress=False)
    result = trainer.train()
    update = to_numpy(_live(adapter), sent_keys(adapter, cfg.strategy))
    metrics = {"num-examples": float(len(train)), "train_loss": float(result["loss"])}
    if held_out:
        metrics["eval_loss"] = float(result["eval_loss"])
        metrics["exact_match"] = float(result["exact_match"])
    return update, metrics
