"""The model card written next to the shipped base checkpoint (how it was made, what it knows)."""

from __future__ import annotations

from pathlib import Path

from adapterhub.basemodel.corpus import OPS, WEIGHTS


def write_model_card(out: Path, facts: dict) -> Path:
    """Write ``base_model.md`` into ``out`` from the facts the build collected."""
    ops = ", ".join(f"`{op}` (x{WEIGHTS[op]:g})" if WEIGHTS[op] != 1 else f"`{op}`" for op in OPS)
    text = f"""# {facts['name']}

A {facts['params']:,}-parameter Llama ({facts['layers']} layers, hidden {facts['hidden']},
MLP {facts['intermediate']}, {facts['heads']} query / {facts['kv_heads']} key-value heads, tied
embeddings, char-level vocabulary of 100 tokens) pre-trained from scratch by AdapterHub so
that the project works offline. It is a *base* for adapters, not a useful model on its own.

## Reproduce

```
python -m adapterhub.basemodel.build --out adapterhub/assets/base-model \\
    --steps {facts['steps']} --seed {facts['seed']}
```

Recipe: full-parameter AdamW (betas 0.9/0.98, weight decay 0.01, grad clip 1.0), peak lr
{facts['lr']:g}, {facts['warmup']} warm-up steps then cosine decay to 10%, {facts['steps']}
steps of {facts['batch_size']} freshly sampled records (max length {facts['max_length']}),
seed {facts['seed']}. Final training loss {facts['final_loss'] or float('nan'):.4f}. This build
took {facts['seconds']:.0f} s of wall time on {facts['threads']} CPU threads; a step takes about
0.16 s on 2 idle cores (about 4 minutes in all) and far longer on a busy machine. The weights
depend only on the seed and the recipe: two builds gave byte-identical `model.safetensors`.

## Training data

Synthetic records `"<op>: <input> ="` -> `" <output>"`, encoded as `BOS prompt completion EOS`
with the loss on the completion only (`adapterhub.data.encode_example`). Operations
(`adapterhub/basemodel/corpus.py`), sampled uniformly except where weighted: {ops}.
Inputs mix lowercase, uppercase and digits.

None of the shipped adapter tasks (`adapterhub/tasks.py`) is in the corpus.

## Held-out greedy exact match

* `copy` (a corpus skill): {facts['copy_em']:.2f}
* `{facts['default_task']}` (the default adapter task, never trained): {facts['task_em']:.2f}
"""
    path = out / "base_model.md"
    path.write_text(text, encoding="utf-8")
    return path
