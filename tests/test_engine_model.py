"""The serving decoder against transformers: paged KV, flattened batches, chunked prefill.

Every scenario runs 3 sequences of different prompt lengths through LlamaForServing on a small
pool whose pages are handed out shuffled and non-contiguous (padding points at a zero null page
as in UnifiedPool); pages nobody was given hold NaN, so reading a wrong page poisons the logits,
and a masking bug shows against transformers' logits.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from serving.engine import kernels
from serving.engine.attention import AttentionMetadata
from serving.engine.layout import TARGET_MODULES
from serving.engine.model import LlamaForServing
from serving.engine.packed_linear import packing_enabled
from serving.engine.rope import RotaryEmbedding
from tests.native_support import require_native

BLOCK = 4
PROMPT_LENS = (11, 3, 7)
NEW_TOKENS = 6


def _pool(model: LlamaForServing, tables: list[list[int]],
          device: str = "cpu") -> tuple[torch.Tensor, int]:
    """The KV pool and its null page (the last). Like UnifiedPool: pages handed to a sequence
    start zeroed and tables are padded with the zero null page; every other page holds NaN,
    so reading a page nobody was given poisons the result instead of hiding."""
    s = model.shape
    handed = sorted({p for t in tables for p in t})
    null = handed[-1] + 2  # one NaN page in between that nobody gets
    shape = (null + 1, s.num_layers, 2, BLOCK, s.num_kv_heads, s.head_dim)
    kv = torch.full(shape, torch.nan, dtype=model.dtype, device=device)
    kv[handed] = 0
    kv[null] = 0
    return kv, null


def _block_tables(n_seqs: int, blocks_each: int, seed: int = 0) -> list[list[int]]:
    """Every page of the pool, shuffled, dealt round-robin: no sequence gets neighbours."""
    perm = torch.randperm(n_seqs * blocks_each, generator=torch.Generator().manual_seed(seed))
    return [perm[i::n_seqs].tolist() for i in range(n_seqs)]


@dataclass
class _Seq:
    tokens: list[int]
    prompt_len: int
    table: list[int]
    cached: int = 0  # tokens whose K/V are in the pool
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> logits

    @property
    def finished(self) -> bool:
        return len(self.tokens) >= self.prompt_len + NEW_TOKENS


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _serve(
    model: LlamaForServing, prompts: list[list[int]], chunk: int | None, device: str = "cpu"
) -> list[_Seq]:
    """Greedy-generate NEW_TOKENS per prompt like an engine loop: each step flattens a prefill
    chunk (at most ``chunk`` tokens) of every still-prefilling sequence, then one decode token
    of every other unfinished sequence."""
    blocks = -(-(max(PROMPT_LENS) + NEW_TOKENS) // BLOCK)
    tables = _block_tables(len(prompts), blocks)
    kv, null = _pool(model, tables, device)
    seqs = [_Seq(list(p), len(p), t) for p, t in zip(prompts, tables, strict=True)]
    mixed_steps = 0
    while not all(s.finished for s in seqs):
        pre = [s for s in seqs if s.cached < s.prompt_len]
        dec = [s for s in seqs if s.cached >= s.prompt_len and not s.finished]
        q_lens = [min(chunk or s.prompt_len, s.prompt_len - s.cached) for s in pre]
        mixed_steps += bool(pre and dec)
        meta = AttentionMetadata.build(
            BLOCK, q_lens, [s.cached + q for s, q in zip(pre, q_lens, strict=True)],
            [s.table for s in pre], [len(s.tokens) for s in dec], [s.table for s in dec],
            device=device, pad_page=null,
        )
        ids = [t for s, q in zip(pre, q_lens, strict=True) for t in s.tokens[s.cached:s.cached + q]]
        ids += [s.tokens[-1] for s in dec]
        hidden = model(torch.tensor(ids, device=device), meta.positions, meta, kv)
        logits = model.compute_logits(hidden).cpu()
        start = 0
        for s, q in [*zip(pre, q_lens, strict=True), *((s, 1) for s in dec)]:
            for i in range(q):
                s.logits[s.cached + i] = logits[start + i]
            s.cached += q
            start += q
            if s.cached == len(s.tokens):  # prompt done or decode token consumed: sample
                s.tokens.append(int(logits[start - 1].argmax()))
    assert chunk is None or mixed_steps > 0, "scenario never mixed prefill and decode"
    return seqs


def _check_against_hf(
    path: Path, seqs: list[_Seq], dtype: torch.dtype = torch.float32, atol: float = 1e-4
) -> None:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    for s in seqs:
        with torch.no_grad():
            ref = hf(torch.tensor([s.tokens[:-1]])).logits[0].float()
        ours = torch.stack([s.logits[p] for p in range(len(s.tokens) - 1)])
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        # Greedy tokens: each generated token is HF's argmax given the same prefix.
        assert s.tokens[s.prompt_len:] == ref[s.prompt_len - 1:].argmax(-1).tolist()


@pytest.fixture(params=["native", "torch"])
def decode_path(request: pytest.FixtureRequest, monkeypatch) -> list[int]:
    """Decode attention through the native kernel (CPU float32's default) or torch SDPA (every
    other device and dtype); the kernel's calls are counted, so a test knows it ran."""
    calls: list[int] = []
    if request.param == "torch":
        monkeypatch.setattr(kernels, "paged_decode_lib", lambda: None)
    else:
        require_native()
        native = kernels.paged_decode
        monkeypatch.setattr(kernels, "paged_decode",
                            lambda *a: calls.append(1) or native(*a))
    return calls


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-prefill", "chunked-5"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed-weights", "plain-weights"])
def test_matches_hf(tiny_checkpoint: Path, chunk: int | None, decode_path: list[int],
                    packed: bool) -> None:
    model = LlamaForServing.from_checkpoint(tiny_checkpoint)
    assert (model.pack_weights(packed) > 0) == (packed and packing_enabled())
    seqs = _serve(model, _prompts(model.shape.vocab_size), chunk)
    _check_against_hf(tiny_checkpoint, seqs)
    assert decode_path or kernels.paged_decode_lib() is None  # the kernel ran where it was on


@pytest.mark.parametrize("packed", [True, False], ids=["packed-weights", "plain-weights"])
def test_bf16_matches_hf_bf16(tiny_mistral: Path, decode_path: list[int], packed: bool) -> None:
    # Same casts as HF, so only bf16 rounding of differently ordered sums differs. On the CPU
    # the attention, RMSNorm and RoPE kernels and the packed weights take bf16 too.
    model = LlamaForServing.from_checkpoint(tiny_mistral, dtype=torch.bfloat16)
    assert (model.pack_weights(packed) > 0) == packed
    seqs = _serve(model, _prompts(model.shape.vocab_size), chunk=5)
    _check_against_hf(tiny_mistral, seqs, dtype=torch.bfloat16, atol=5e-2)
    assert decode_path or kernels.paged_decode_lib() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_hf(tiny_checkpoint: Path) -> None:
    model = LlamaForServing.from_checkpoint(tiny_checkpoint, device="cuda")
    seqs = _serve(model, _prompts(model.shape.vocab_size), chunk=5, device="cuda")
    _check_against_hf(tiny_checkpoint, seqs, atol=1e-3)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_matches_hf(tmp_path: Path, family: str, decode_path: list[int]) -> None:
    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "mistral":
        config = MistralConfig(sliding_window=5, **common)
    else:  # window on layer 1 only
        config = Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                             **common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = LlamaForServing.from_checkpoint(tmp_path)
    assert [layer.self_attn.window for layer in model.model.layers] == (
        [5, 5] if family == "mistral" else [None, 5]
    )
    _check_against_hf(tmp_path, _serve(model, _prompts(50), chunk=5))
    assert decode_path or kernels.paged_decode_lib() is None


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                 "long_factor": [1.0 + i for i in range(8)],
                 "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_hf_incremental(case: str) -> None:
    """Per-token cos/sin equal what HF's rotary module gives each token during generation
    (one position per call, so dynamic/longrope switch exactly as in HF's decode)."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                         rope_scaling=ROPE_CASES[case])
    ours = RotaryEmbedding(config, head_dim=16, device="cpu")
    positions = torch.arange(80)
    cos, sin = ours(positions, torch.float32)
    hf = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, 16)
    for p in positions.tolist():
        ref_cos, ref_sin = hf(x, torch.tensor([[p]]))
        torch.testing.assert_close(cos[p], ref_cos[0, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sin[p], ref_sin[0, 0], atol=1e-6, rtol=1e-6)


def test_metadata_build() -> None:
    # One chunk of 3 new tokens on 5 cached ones, then two decode tokens.
    meta = AttentionMetadata.build(4, [3], [8], [[7, 2, 9]], [1, 6], [[4], [5, 0, 3]])
    assert meta.num_prefill_tokens == 3 and meta.num_decode_tokens == 2
    assert meta.positions.tolist() == [5, 6, 7, 0, 5]
    assert meta.slot_pages.tolist() == [2, 2, 2, 4, 0]
    assert meta.slot_offsets.tolist() == [1, 2, 3, 0, 1]
    assert meta.prefill_block_tables.tolist() == [[7, 2]]  # pages beyond ctx are dropped
    assert meta.decode_block_tables.tolist() == [[4, 0], [5, 0]]
    with pytest.raises(ValueError, match="needs 2"):
        AttentionMetadata.build(4, [], [], [], [6], [[5]])


def test_decode_is_one_batched_computation(tiny_mistral: Path, monkeypatch,
                                           decode_path: list[int]) -> None:
    """64 decode tokens with different context lengths: one attention call per layer (SDPA,
    or the native kernel), and each token's output equals decoding its sequence alone."""
    model = LlamaForServing.from_checkpoint(tiny_mistral)
    n, s = 64, model.shape
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(1, 13, (n,), generator=g).tolist()
    tables = _block_tables(n, 3, seed=3)
    kv, null = _pool(model, tables)
    for c, table in zip(ctx, tables, strict=True):  # cached context = random finite K/V
        for p in range(c - 1):
            kv[table[p // BLOCK], :, :, p % BLOCK] = torch.randn(
                s.num_layers, 2, s.num_kv_heads, s.head_dim, generator=g)
    ids = torch.randint(3, s.vocab_size, (n,), generator=g)

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1)
                        or sdpa(*a, **k))
    meta = AttentionMetadata.build(BLOCK, [], [], [], ctx, tables, pad_page=null)
    batched = model(ids, meta.positions, meta, kv)
    native = kernels.paged_decode_lib() is not None
    assert len(decode_path if native else calls) == s.num_layers
    assert not (native and calls)
    assert torch.isfinite(batched).all()
    for i in range(n):  # rewriting a token's own K/V is idempotent, so the pool is reusable
        meta = AttentionMetadata.build(BLOCK, [], [], [], [ctx[i]], [tables[i]], pad_page=null)
        alone = model(ids[i:i + 1], meta.positions, meta, kv)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=0)


class _Recorder:
    def __init__(self, delta: float = 0.0):
        self.calls: list[tuple[int, str, tuple, tuple]] = []
        self.delta = delta

    def begin(self, layer: int, module: str, x: torch.Tensor) -> None:
        pass

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((layer, module, tuple(x.shape), tuple(y.shape)))
        return y + self.delta if (layer, module) == (1, "down_proj") else y


def test_lora_hook_sees_every_target(tiny_qwen2: Path) -> None:
    model = LlamaForServing.from_checkpoint(tiny_qwen2)
    dims = model.shape.module_dims()

    def run(lora):
        kv, null = _pool(model, [[3, 1]])
        meta = AttentionMetadata.build(BLOCK, [5], [5], [[3, 1]], [], [], pad_page=null)
        return model(torch.arange(3, 8), meta.positions, meta, kv, lora=lora)

    rec = _Recorder()
    torch.testing.assert_close(run(rec), run(None), atol=0, rtol=0)
    expected = [(i, m, (5, dims[m][0]), (5, dims[m][1]))
                for i in range(model.shape.num_layers) for m in TARGET_MODULES]
    assert sorted(rec.calls) == sorted(expected)
    assert not torch.allclose(run(_Recorder(delta=0.5)), run(None))


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    file = next(dst.glob("*.safetensors"))
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    path = _edit_checkpoint(tiny_llama, tmp_path / "ck",
                            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaForServing.from_checkpoint(path)


def test_wrong_shape_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)

    path = _edit_checkpoint(tiny_llama, tmp_path / "ck", edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(3, 64\)"):
        LlamaForServing.from_checkpoint(path)


def test_loading_never_unpickles(tiny_checkpoint: Path, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load called")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", forbidden)
        m.setattr(torch.serialization, "load", forbidden)
        model = LlamaForServing.from_checkpoint(tiny_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    ours = dict(model.named_parameters())
    assert ours.keys() <= hf.state_dict().keys()
    for name, param in ours.items():
        assert torch.equal(param, hf.state_dict()[name]), name
