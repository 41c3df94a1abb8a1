"""Greedy exact-match scoring of prompt/completion records, shared by the build and the tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterhub.data import Record, encode_prompt


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of ``prompts``, batched with left padding (BOS + prompt as trained)."""
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    batch_size: int = 64,
) -> float:
    """Fraction of records whose greedy completion equals the expected completion exactly."""
    if not records:
        return 0.0
    # Two tokens of slack let a wrong-length answer show up as wrong rather than truncated.
    longest = max(len(r.completion) for r in records) + 2
    was_training = model.training
    model.eval()
    try:
        got = generate_completions(
            model, tokenizer, [r.prompt for r in records], longest, batch_size
        )
    finally:
        model.train(was_training)
    return sum(g == r.completion for g, r in zip(got, records, strict=True)) / len(records)
