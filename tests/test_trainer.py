"""The training loop: deterministic resume, learning, and a 4-bit (QLoRA) base on CPU."""

from __future__ import annotations

import pytest
import torch

from adapterhub.checkpoints import load_base
from adapterhub.data import Record
from adapterhub.methods import create_adapter, make_config
from adapterhub.train import TrainConfig, Trainer
from adapterhub.train.state import latest_checkpoint
from adapterhub.train.trainer import batch_indices


def _records(n: int = 40) -> list[Record]:
    words = ["ab", "cd", "efg", "hij", "klm", "nop", "qr", "stu"]
    return [Record(f"rev {w}{i % 7} =", f" {(w + str(i % 7))[::-1]}") for i, w in
            enumerate(words * (n // len(words)))]


class _Interrupt(Exception):
    pass


def _adapter(path, method: str, quantize=None):
    torch.manual_seed(0)  # the same initial adapter weights in every call
    model, tok = load_base(path, quantize=quantize)
    params = {"lora": {"r": 4, "dropout": 0.1}, "mos": {"r": 4, "pool_vectors_per_layer": 2,
              "private_rank": 1, "shards_per_vector": 2},
              "hydra": {"r_parallel": 2, "r_sequential": 2}}[method]
    return create_adapter(model, make_config(method, **params)), tok


def test_batches_cover_each_epoch_once():
    cfg = TrainConfig(batch_size=4, steps=10, seed=3)
    epoch = [i for s in range(5) for i in batch_indices(s, 0, 20, cfg)]
    assert sorted(epoch) == list(range(20))
    assert epoch != list(range(20))  # shuffled
    assert batch_indices(7, 0, 20, cfg) == batch_indices(7, 0, 20, cfg)


@pytest.mark.parametrize("method", ["lora", "mos", "hydra"])
def test_resume_matches_uninterrupted_run(tiny_llama, tmp_path, method):
    cfg = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2,
                      checkpoint_every=3, seed=1)
    adapter, tok = _adapter(tiny_llama, method)
    Trainer(adapter, tok, _records(), cfg, output_dir=tmp_path / "a", progress=False).train()
    want = {k: v.clone() for k, v in adapter.adapter_state_dict().items()}

    def stop_after_four(metrics, step):
        if step == 4:
            raise _Interrupt

    adapter, tok = _adapter(tiny_llama, method)
    trainer = Trainer(adapter, tok, _records(), cfg, output_dir=tmp_path / "b",
                      log=stop_after_four, progress=False)
    with pytest.raises(_Interrupt):
        trainer.train()
    assert latest_checkpoint(tmp_path / "b").name == "step-0000003"

    adapter, tok = _adapter(tiny_llama, method)  # a fresh process would start like this
    resumed = Trainer(adapter, tok, _records(), cfg, output_dir=tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    got = adapter.adapter_state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_training_lowers_loss_and_reports_eval(tiny_llama):
    cfg = TrainConfig(steps=30, batch_size=8, lr=2e-2, warmup_steps=3, checkpoint_every=0,
                      max_new_tokens=8)
    # A fixed answer is learnable by a random tiny model within a few steps.
    records = [Record(r.prompt, " yes") for r in _records()]
    adapter, tok = _adapter(tiny_llama, "lora")
    trainer = Trainer(adapter, tok, records, cfg, eval_records=records[:8], progress=False)
    metrics = trainer.train()
    first = sum(h["loss"] for h in trainer.history[:3]) / 3
    last = sum(h["loss"] for h in trainer.history[-3:]) / 3
    assert last < 0.3 * first
    assert set(metrics) >= {"loss", "eval_loss", "exact_match", "tokens_per_s"}
    assert metrics["exact_match"] == 1.0


def test_qlora_training_on_cpu_lowers_loss(tiny_llama):
    import bitsandbytes as bnb

    adapter, tok = _adapter(tiny_llama, "lora", quantize="nf4")
    base_linears = [m for m in adapter.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert base_linears, "the base was not quantized"
    cfg = TrainConfig(steps=12, batch_size=8, lr=2e-2, warmup_steps=2, checkpoint_every=0)
    trainer = Trainer(adapter, tok, _records(), cfg, progress=False)
    trainer.train()
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"]
