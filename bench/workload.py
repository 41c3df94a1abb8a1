"""The S-LoRA serving workload scaled to CPU: a random Llama checkpoint, random mixed-rank
adapters and a request trace (BENCHMARKS.md section 1; S-LoRA's benchmarks/trace.py).

Used by bench/serving.py. Everything is seeded so every side of a comparison sees the same
model weights, adapter weights, prompts, lengths and arrival times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from adapterhub.tokenizer import save_char_tokenizer
from serving.engine.adapter_store import HostAdapter, build_host_adapter, unpack
from serving.engine.layout import TARGET_MODULES, ModelShape

# Special ids of the char tokenizer (pad, bos, eos, unk); prompts never contain them.
FIRST_PROMPT_ID = 4


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 256
    # Wider than HF's 0.02 so a random model's logits have clear winners: greedy decoding
    # then does not hinge on fp32 rounding, and engine and PEFT outputs can be compared.
    initializer_range: float = 0.05


def build_checkpoint(path: Path, spec: ModelSpec, seed: int) -> PreTrainedModel:
    """Write a random Llama (safetensors + char tokenizer) to ``path``; return the HF model.

    The vocabulary is larger than the char tokenizer's: prompts are passed as token ids, and
    the engine's detokenizer skips ids it does not know, so only the LM head's size matters.
    """
    path.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        initializer_range=spec.initializer_range, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


# -- adapters -------------------------------------------------------------------------------
class AdapterBank:
    """n random LoRA adapters on every target module, ranks cycled over ``ranks``.

    Adapter i has rank ``ranks[i % len(ranks)]``. Its flat weights (the engine's normalized
    layout: per module A [r, d_in], B [d_out, r], scaling folded in) are a window of one random
    buffer per rank, at an offset that differs per adapter. The weights are therefore distinct
    per adapter while host memory stays O(1) in n: 1000 full-size adapters would otherwise need
    ~9 GB, and what is measured (copying an adapter into pool pages, packing, the LoRA GEMMs)
    does not depend on whether two host buffers overlap.

    Scale: every element ~ N(0, s_r^2) with s_r^2 = delta_ratio * init_range / sqrt(r), so that
    a module's LoRA delta B A x is about ``delta_ratio`` times its base output W x (the sqrt(d_in)
    factors cancel): adapters visibly change greedy outputs while activations stay finite.

    ``dtype`` is the weights' (the serving dtype: an engine stores what it loads in its own);
    the same seed draws the same values, rounded.
    """

    def __init__(self, n: int, ranks: tuple[int, ...], shape: ModelShape, init_range: float,
                 seed: int, delta_ratio: float = 0.3, stride: int = 7919,
                 dtype: torch.dtype = torch.float32) -> None:
        self.n, self.ranks, self.shape, self.dtype = n, ranks, shape, dtype
        self.delta_ratio = delta_ratio
        g = torch.Generator().manual_seed(seed)
        self._layouts = {}
        self._buffers = {}
        for r in sorted(set(ranks)):
            # A zero template validated by the engine's own builder gives the layout.
            template = build_host_adapter(f"template-r{r}", {
                (layer, m): (torch.zeros(r, d_in), torch.zeros(d_out, r), None)
                for layer in range(shape.num_layers)
                for m, (d_in, d_out) in shape.module_dims().items()
            }, shape)
            count = sum(1 for i in range(n) if self.rank(i) == r)
            numel = template.flat.numel()
            scale = math.sqrt(delta_ratio * init_range / math.sqrt(r))
            self._layouts[r] = (template.layout, numel)
            self._buffers[r] = (torch.randn(numel + stride * max(count - 1, 0), generator=g)
                                * scale).to(dtype)
        self.stride = stride

    def rank(self, i: int) -> int:
        return self.ranks[i % len(self.ranks)]

    @staticmethod
    def name(i: int) -> str:
        return f"a{i}"

    def flat(self, i: int) -> torch.Tensor:
        r = self.rank(i)
        _, numel = self._layouts[r]
        offset = (i // len(self.ranks)) * self.stride
        return self._buffers[r][offset:offset + numel]

    def host_adapter(self, i: int) -> HostAdapter:
        layout, _ = self._layouts[self.rank(i)]
        return HostAdapter(self.name(i), self.flat(i), layout, source="bench")

    def weights(self, i: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) views per (layer, module), for copying into a PEFT model."""
        layout, _ = self._layouts[self.rank(i)]
        flat = self.flat(i)
        return {key: unpack(flat, s)[:2] for key, s in layout.items()}

    def host_bytes(self, i: int) -> int:
        return self._layouts[self.rank(i)][1] * self.dtype.itemsize

    @property
    def unique_host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def add_peft_adapters(model: PreTrainedModel, bank: AdapterBank, count: int):
    """Wrap ``model`` in PEFT with adapters a0..a{count-1} holding the bank's weights.

    lora_alpha = r gives PEFT scaling 1, matching the bank's scaling-folded B. The first
    adapter goes through get_peft_model; the others are added per target module with
    ``LoraLayer.update_layer``, which is what ``add_adapter`` runs on each module, minus its
    walk over the whole (growing) model per call: 100 add_adapter calls take ~30 s here, and
    the resulting layers and forward path are the same stock PEFT ones.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    def config(i: int) -> LoraConfig:
        r = bank.rank(i)
        return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, inference_mode=True,
                          target_modules=list(TARGET_MODULES), init_lora_weights=False)

    peft_model = get_peft_model(model, config(0), adapter_name=bank.name(0))
    layers = []
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            parts = module_name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            layers.append(((layer, parts[-1]), module))
    if len(layers) != len(TARGET_MODULES) * bank.shape.num_layers:
        raise RuntimeError(f"PEFT wrapped {len(layers)} modules, expected every target module")
    # update_layer ends by re-activating and moving every adapter of the layer, which makes
    # adding n adapters O(n^2); here a0 stays active, and the caller's .to() moves and casts
    # the whole model once.
    skipped = ("set_adapter", "_move_adapter_to_device_of_base_layer")
    for _, module in layers:
        for attr in skipped:
            setattr(module, attr, lambda *args, **kwargs: None)
    try:
        with torch.no_grad():
            for i in range(count):
                name, cfg = bank.name(i), config(i)
                if i:
                    peft_model.peft_config[name] = cfg
                w = bank.weights(i)
                for key, module in layers:
                    if i:
                        module.update_layer(name, cfg.r, cfg.lora_alpha, cfg,
                                            target_name=key[1])
                    A, B = w[key]
                    module.lora_A[name].weight.copy_(A)
                    module.lora_B[name].weight.copy_(B)
    finally:
        for _, module in layers:
            for attr in skipped:
                delattr(module, attr)
    peft_model.set_adapter(bank.name(0))
    peft_model.eval()
    return peft_model


# -- trace ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float  # offset from the start of the run
    u: float  # np.random.power(alpha) draw: the adapter is floor(u * n) for any n
    prompt: tuple[int, ...]
    output_len: int

    def adapter(self, n: int) -> int:
        return min(int(self.u * n), n - 1)


@dataclass
class Record:
    """What a side measured of one request: seconds from the run's start."""

    arrival: float
    output_len: int
    first: float | None = None
    finish: float | None = None
    tokens: list[int] = field(default_factory=list)


def make_trace(num_requests: int, alpha: float, rate: float | None, cv: float,
               input_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int,
               seed: int) -> list[Request]:
    """S-LoRA's generate_requests: power-law adapter choice, Gamma arrivals, uniform lengths.

    ``rate`` None means every request arrives at t = 0 (the offline, saturating setting).
    The same seed gives the same prompts, lengths and adapter draws whatever ``rate`` is, so the
    saturated and the moderate-rate runs replay one request set.
    """
    rng = np.random.default_rng(seed)
    u = rng.power(alpha, num_requests)
    in_lens = rng.integers(*input_range, num_requests)
    out_lens = rng.integers(*output_range, num_requests)
    prompts = [tuple(int(t) for t in rng.integers(FIRST_PROMPT_ID, vocab_size, n))
               for n in in_lens]
    gaps_rng = np.random.default_rng(seed + 1)
    if rate is None:
        arrivals = np.zeros(num_requests)
    else:
        shape = 1.0 / (cv * cv)
        arrivals = np.cumsum(gaps_rng.gamma(shape, cv * cv / rate, num_requests))
        arrivals -= arrivals[0]  # the first request opens the run
    return [Request(i, float(arrivals[i]), float(u[i]), prompts[i], int(out_lens[i]))
            for i in range(num_requests)]
