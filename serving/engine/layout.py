"""Shapes shared by the pool, the model and the runner (the one place they are defined).

The unified pool is one preallocated tensor of ``num_pages`` equal pages. A KV page holds
keys and values of ``block_size`` consecutive tokens of one sequence for every layer, so a
sequence's block table is a plain list of page ids; viewed as
``[num_pages, num_layers, 2, block_size, num_kv_heads, head_dim]``. Adapter weights use the
same pages as flat storage (see pool.py), which is what makes the memory unified.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every adapter target module."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.kv_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelShape:
        heads = cfg["num_attention_heads"]
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
        )


def kv_page_elems(shape: ModelShape, block_size: int) -> int:
    """Elements in one page: K and V of ``block_size`` tokens for all layers."""
    return shape.num_layers * 2 * block_size * shape.kv_dim


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Target modules projecting the same input, in the order a layer calls them: the LoRA worker
# computes a group's deltas as one job, from the first one's base GEMM on (lora_worker.py).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                ("down_proj",))
