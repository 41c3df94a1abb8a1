"""MoS injection: one shard pool per projection type, one MoSLinear per targeted layer."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods.base import AdapterModel
from adapterhub.methods.config_base import lora_scaling
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.mos.config import MoSConfig
from adapterhub.methods.mos.layer import MoSLinear, MoSPool
from adapterhub.methods.mos.sharding import build_indices, pool_rows, type_generator
from adapterhub.methods.targets import replace_module, resolve_targets, unwrap_adapter_layers

POOL_PREFIX = "pools."


Targets = list[tuple[str, nn.Linear]]


def group_by_projection(targets: Targets) -> dict[str, Targets]:
    """Targets keyed by projection type (the last name component), in layer order."""
    groups: dict[str, Targets] = defaultdict(list)
    for name, layer in targets:
        groups[name.rpartition(".")[2]].append((name, layer))
    return dict(groups)


def _check_group(projection: str, members: Targets, shards: int) -> None:
    shapes = {(m.in_features, m.out_features) for _, m in members}
    if len(shapes) > 1:
        raise IncompatibleAdapterError(
            f"MoS shares one pool per projection type, but the {projection} layers differ in "
            f"shape (in, out): {sorted(shapes)}"
        )
    d_in, d_out = shapes.pop()
    if d_in % shards or d_out % shards:
        raise IncompatibleAdapterError(
            f"shards_per_vector={shards} must divide {projection}'s d_in={d_in} and d_out={d_out}"
        )


class MoSAdapterModel(AdapterModel):
    """A causal LM whose targeted Linears draw their LoRA factors from shared shard pools."""

    config: MoSConfig

    def __init__(self, model: PreTrainedModel, config: MoSConfig) -> None:
        super().__init__(model, config, getattr(model, "name_or_path", "") or "")
        shards, e, p, r = (
            config.shards_per_vector, config.pool_vectors_per_layer, config.private_rank, config.r
        )
        groups = group_by_projection(resolve_targets(model, config.target_modules))
        for projection, members in groups.items():
            _check_group(projection, members, shards)
        model.requires_grad_(False)
        scaling = lora_scaling(config.alpha, r, config.use_rslora)
        self.pools = nn.ModuleDict()
        for projection, members in groups.items():
            num_layers = len(members)
            first = members[0][1]
            pool = MoSPool(
                pool_rows(num_layers, e, shards), first.in_features, first.out_features, shards,
                device=first.weight.device,
            )
            self.pools[projection] = pool
            gen = type_generator(config.seed, projection)
            # Separate draws for A and B: MoS's pair dissociation.
            index_A = build_indices(num_layers, r, p, e, shards, gen)
            index_B = build_indices(num_layers, r, p, e, shards, gen)
            for i, (name, layer) in enumerate(members):
                replace_module(model, name, MoSLinear(
                    layer, pool, index_A[i], index_B[i], r, scaling, config.dropout,
                ))

    def _layers(self) -> dict[str, MoSLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MoSLinear)}

    def _adapter_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {
            f"{POOL_PREFIX}{projection}.{part}": getattr(pool, part)
            for projection, pool in self.pools.items() for part in ("A", "B")
        }
        for name, layer in self._layers().items():
            out.update({f"{name}.{k}": t for k, t in layer.adapter_tensors().items()})
        return out

    def _check_loaded(self, sd: dict[str, Tensor]) -> None:
        for name, layer in self._layers().items():
            rows = layer.pool.A.shape[0]
            for key in (f"{name}.index_A", f"{name}.index_B"):
                index = sd[key]
                if index.numel() and (index.min() < 0 or index.max() >= rows):
                    raise AdapterError(f"{key} holds shard ids outside the pool of {rows} rows")

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per module path, its unscaled, differentiable ``(A [r, d_in], B [d_out, r])``."""
        return {name: layer.factors() for name, layer in self._layers().items()}

    @torch.no_grad()
    def lowrank(self) -> dict[str, LowRankDelta]:
        return {name: layer.lowrank() for name, layer in self._layers().items()}

    def unload(self) -> PreTrainedModel:
        self.pools = nn.ModuleDict()
        return unwrap_adapter_layers(self.model)
