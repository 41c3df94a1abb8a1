"""Held-out evaluation: completion loss (teacher forcing) and greedy exact match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapterhub.data import IGNORE_INDEX, Record, collate, encode_example, encode_prompt


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def completion_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    max_length: int,
    batch_size: int = 32,
) -> float:
    """Mean cross-entropy per completion token over ``records``."""
    device = _device_of(model)
    total, count = 0.0, 0
    for i in range(0, len(records), batch_size):
        batch = collate(
            [encode_example(tokenizer, r, max_length) for r in records[i : i + batch_size]],
            tokenizer.pad_token_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches, stopped at EOS)."""
    device = _device_of(model)
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in generated[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, ignoring surrounding whitespace."""
    if not references:
        return 0.0
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    max_length: int = 128,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """Return ``{"eval_loss", "exact_match"}`` for ``records``; restores the train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        loss = completion_loss(model, tokenizer, records, max_length)
        preds = greedy_complete(model, tokenizer, [r.prompt for r in records], max_new_tokens)
    finally:
        model.train(was_training)
    return {"eval_loss": loss, "exact_match": exact_match(preds, [r.completion for r in records])}
