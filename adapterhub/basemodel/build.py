"""Build the shipped base model: a small Llama pre-trained from scratch on the synthetic corpus.

    python -m adapterhub.basemodel.build --out adapterhub/assets/base-model [--steps N --seed S]

Full-parameter training with a plain PyTorch loop, seeded, on 2 CPU threads; the output is a
``save_pretrained`` safetensors checkpoint, the char tokenizer and a model card.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from adapterhub.basemodel import DEFAULT_BASE_NAME
from adapterhub.basemodel.card import write_model_card
from adapterhub.basemodel.corpus import sample_op, sample_records
from adapterhub.basemodel.probe import exact_match
from adapterhub.data import collate, encode_example
from adapterhub.tasks import DEFAULT_TASK, generate_records
from adapterhub.tokenizer import build_char_tokenizer, save_char_tokenizer

DEFAULTS = dict(steps=1500, seed=0, batch_size=64, lr=3e-3, warmup=100, max_length=64)


def make_config(vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    """A ~1 M parameter Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,  # multiple of 64: bitsandbytes NF4 on CPU needs it (QLoRA)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: LlamaForCausalLM,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    warmup: int,
    max_length: int,
    log_every: int = 100,
) -> list[tuple[int, float]]:
    """Train all parameters on freshly sampled corpus batches; returns (step, loss) logs."""
    tokenizer = build_char_tokenizer()
    rng = random.Random(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    model.train()
    logs: list[tuple[int, float]] = []
    running, start = 0.0, time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        records = sample_records(rng, batch_size)
        examples = [encode_example(tokenizer, r, max_length) for r in records]
        batch = collate(examples, tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            logs.append((step + 1, running / log_every))
            print(f"step {step + 1}/{steps} loss {running / log_every:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
            running = 0.0
    return logs


def build(out: Path, steps: int, seed: int, batch_size: int, lr: float, warmup: int,
          max_length: int) -> dict:
    """Pre-train and write the checkpoint to ``out``; returns the facts the model card reports."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = make_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    started = time.perf_counter()
    logs = pretrain(model, steps, seed, batch_size, lr, warmup, max_length)
    seconds = time.perf_counter() - started
    model.eval()
    # Held-out probes: the corpus skill it must have, and the shipped task it must not solve.
    probe_rng = random.Random(seed + 1)
    copy_em = exact_match(model, tokenizer, sample_op(probe_rng, "copy", 200))
    task_em = exact_match(model, tokenizer, generate_records(DEFAULT_TASK, 200, seed + 1))
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32,
    )
    model.save_pretrained(out, safe_serialization=True)
    save_char_tokenizer(out)
    facts = dict(
        name=DEFAULT_BASE_NAME, steps=steps, seed=seed, batch_size=batch_size, lr=lr,
        warmup=warmup, max_length=max_length, seconds=seconds, threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()), final_loss=logs[-1][1] if logs else None,
        hidden=config.hidden_size, layers=config.num_hidden_layers,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        intermediate=config.intermediate_size,
        copy_em=copy_em, task_em=task_em, default_task=DEFAULT_TASK,
    )
    write_model_card(out, facts)
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (affects speed only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    facts = build(args.out, args.steps, args.seed, args.batch_size, args.lr, args.warmup,
                  args.max_length)
    print(f"wrote {args.out}: {facts['params']} params, {facts['seconds']:.0f}s, "
          f"copy EM {facts['copy_em']:.2f}, {DEFAULT_TASK} EM {facts['task_em']:.2f}")


if __name__ == "__main__":
    main()
