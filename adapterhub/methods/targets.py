"""Finding the Linear layers a config targets, and swapping modules in and out of a model."""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods.config_base import TargetModules
from adapterhub.methods.layer_base import AdapterLayer


def matches_target(name: str, targets: TargetModules) -> bool:
    """PEFT's rule: a regex must match the whole name, a listed name must be a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, targets: TargetModules) -> list[tuple[str, nn.Linear]]:
    """The ``(name, Linear)`` pairs ``targets`` selects, in model order.

    Raises IncompatibleAdapterError when a listed target matches nothing (a config written for
    another architecture must not silently adapt a subset) or matches a non-Linear module.
    """
    found = [(n, m) for n, m in model.named_modules() if n and matches_target(n, targets)]
    arch = type(model).__name__
    if not found:
        raise IncompatibleAdapterError(f"no module of {arch} matches target_modules {targets!r}")
    if not isinstance(targets, str):
        missing = [t for t in targets if not any(matches_target(n, (t,)) for n, _ in found)]
        if missing:
            raise IncompatibleAdapterError(f"target module(s) {missing} not found in {arch}")
    for name, module in found:
        # bitsandbytes Linear4bit subclasses nn.Linear, so QLoRA bases pass too.
        if not isinstance(module, nn.Linear):
            raise IncompatibleAdapterError(
                f"target {name} is a {type(module).__name__}; only Linear layers can be adapted"
            )
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def ensure_no_adapter(model: nn.Module) -> None:
    """Refuse to stack a second adapter: wrapping a wrapper would corrupt both."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer | BaseTunerLayer):
            raise AdapterError(f"model already carries an adapter (at {name}); unload it first")


def unwrap_adapter_layers(model: nn.Module) -> nn.Module:
    """Put every AdapterLayer's base layer back in its place (no merge); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            replace_module(model, name, module.base_layer)
    return model
