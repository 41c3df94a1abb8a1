"""Helpers shared by the tests/test_methods_*.py files (this module holds no tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from adapterhub.methods import AdapterModel

ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box OpenMP's spinning
    threads make each one ~1000x slower; test modules import this autouse fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_base(path: Path, nf4: bool = False) -> PreTrainedModel:
    """A fresh fp32 (or NF4 with fp32 compute) copy of a tiny checkpoint, in eval mode."""
    kwargs = {}
    if nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval()


def randomize(adapter: AdapterModel, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero values for every adapter parameter, B included (zero B makes tests vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def batch(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of two sequences, labels included."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def assert_changed(adapted: torch.Tensor, base: torch.Tensor, margin: float = 1e-3) -> None:
    """The adapter visibly moves the outputs, so an equality check after it means something."""
    assert (adapted - base).abs().max().item() > margin
