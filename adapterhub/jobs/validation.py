"""Checks of a job's spec that must pass before it is queued (everything but its dataset)."""

from __future__ import annotations

from dataclasses import replace

from adapterhub.errors import CheckpointError
from adapterhub.finetune import PLACEMENTS, FinetuneJob, base_path
from adapterhub.train.config import TrainConfig


def check_spec(spec: FinetuneJob) -> FinetuneJob:
    """Validate name, method, hyper-parameters, training config, aliases, quantization, base.

    Raises ValueError or an AdapterHubError subclass whose message names the bad field;
    returns the spec with a fresh, validated TrainConfig.
    """
    from adapterhub.checkpoints import QUANTIZATIONS, read_base_config
    from adapterhub.methods import make_config
    from adapterhub.registry import validate_alias, validate_name

    if not isinstance(spec, FinetuneJob):
        raise TypeError(f"expected a FinetuneJob, got {type(spec).__name__}")
    validate_name(spec.name)
    if not isinstance(spec.method_params, dict):
        raise ValueError("method_params must be a mapping of hyper-parameter names to values")
    make_config(spec.method, **spec.method_params)
    train = spec.train
    if isinstance(train, dict):
        train = TrainConfig.from_dict(train)
    # Rebuilt so fields changed after construction are validated too.
    train = TrainConfig.from_dict(train.to_dict())
    if isinstance(spec.aliases, str) or not all(isinstance(a, str) for a in spec.aliases):
        raise ValueError("aliases must be a list of strings")
    for alias in spec.aliases:
        validate_alias(alias)
    if spec.quantize is not None and spec.quantize not in QUANTIZATIONS:
        raise CheckpointError(
            f"unknown quantization {spec.quantize!r} (supported: {', '.join(QUANTIZATIONS)})"
        )
    if not isinstance(spec.device, str) or not spec.device:
        raise ValueError("device must be a non-empty string such as 'cpu' or 'cuda'")
    if spec.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, "
                         f"got {spec.placement!r}")
    serve_as = spec.serve_checkpoints_as
    if serve_as is not None and serve_as != f"{spec.name}@latest":
        if not isinstance(serve_as, str):
            raise ValueError("serve_checkpoints_as must be an adapter name")
        validate_name(serve_as)
    if spec.base is not None:
        # Absolute, so the job does not depend on the worker's working directory.
        spec = replace(spec, base=str(base_path(spec).resolve()))
    read_base_config(base_path(spec))
    return replace(spec, train=train, aliases=list(spec.aliases))
