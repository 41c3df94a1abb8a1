"""oneDNN-packed base weights (packed_linear.py): the same answers as F.linear, never stale,
never on the autograd path, and off where asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.model import AdapterLinear, LlamaForServing
from serving.engine.packed_linear import pack_weight, packing_enabled
from serving.engine.sampling import SamplingParams


@pytest.fixture(autouse=True)
def _packing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing is the CPU default: the pinned torch has oneDNN, so these tests fail rather than
    skip where it is missing, and a caller's ADAPTERHUB_PACKED_WEIGHTS=0 does not hide them."""
    monkeypatch.delenv("ADAPTERHUB_PACKED_WEIGHTS", raising=False)
    assert packing_enabled(), "torch has no oneDNN: the engine would serve on F.linear"


@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 160, generator=g)[:, ::2]  # strided input, as a view may be
    packed = pack_weight(w)
    assert packed is not None and packed.usable(x)
    torch.testing.assert_close(packed.linear(x, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 32, 300])
def test_bfloat16_matches_f_linear(rows: int) -> None:
    """A bf16 engine's weights pack too (oneDNN's bf16 matmul, which F.linear also runs); an
    input of another dtype than the weight's takes F.linear."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 80, generator=g).bfloat16()
    packed = pack_weight(w)
    assert packed is not None and packed.usable(x) and not packed.usable(x.float())
    torch.testing.assert_close(packed.linear(x, b), F.linear(x, w, b))


def test_a_rewritten_or_moved_weight_is_packed_again() -> None:
    lin = AdapterLinear(0, "q_proj", 16, 8, True, torch.float32, "cpu")
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    lin.packed = pack_weight(lin.weight)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lin(x, None), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.mul_(-2)  # e.g. a reload into the same tensor
    assert not lin.packed.fresh()
    torch.testing.assert_close(lin(x, None), F.linear(x, lin.weight, lin.bias))
    lin.weight.share_memory_()  # co-serving's worker process: the storage moves
    torch.testing.assert_close(lin(x, None), F.linear(x, lin.weight, lin.bias))
    assert lin.packed.packs == 3 and lin.packed.fresh()


def test_autograd_inputs_take_f_linear() -> None:
    """The packed op has no backward: an input that needs a gradient must not reach it."""
    lin = AdapterLinear(0, "q_proj", 16, 8, False, torch.float32, "cpu")
    with torch.no_grad():
        lin.weight.normal_()
    lin.packed = pack_weight(lin.weight)
    x = torch.randn(3, 16, requires_grad=True)
    assert not lin.packed.usable(x)
    lin(x, None).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 16))


def test_not_packed_off_cpu_float32_bfloat16_or_when_turned_off(monkeypatch) -> None:
    assert pack_weight(torch.randn(8, 8, dtype=torch.float64)) is None
    assert pack_weight(torch.randn(8)) is None
    monkeypatch.setenv("ADAPTERHUB_PACKED_WEIGHTS", "0")
    assert pack_weight(torch.randn(8, 8)) is None


def test_model_packs_every_projection_and_the_head(tiny_qwen2: Path) -> None:
    model = LlamaForServing.from_checkpoint(tiny_qwen2)
    s = model.shape
    assert model.pack_weights() == 7 * s.num_layers + 1
    weights = [m.weight for m in model.modules() if isinstance(m, AdapterLinear)]
    weights.append(model._head().weight)
    assert model.packed_bytes() == sum(w.numel() * 4 for w in weights)
    assert model.pack_weights(False) == 0 and model.packed_bytes() == 0


def test_engine_tokens_and_logits_the_same_packed_or_not(tiny_qwen2: Path) -> None:
    """Qwen2 has q/k/v biases, so the packed op's bias is exercised too."""
    prompts = [[5, 9, 13, 2, 7, 7, 30], [11, 4], [8] * 20]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    out, logits, stats = {}, {}, {}
    for packed in (True, False):
        engine = Engine(EngineConfig(model=str(tiny_qwen2), num_pages=64, block_size=4,
                                     packed_weights=packed))
        engine.runner.capture = {}
        out[packed] = [r.token_ids for r in engine.generate(prompts, params)]
        logits[packed] = [torch.cat(v) for v in engine.runner.capture.values()]
        stats[packed] = engine.stats()["packed_weight_bytes"]
    assert out[True] == out[False]
    for a, b in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert stats[True] > 0 and stats[False] == 0
