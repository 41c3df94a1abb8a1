"""Shared behaviour of the adapter method configs: defaults, dict round trip and validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Self

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)

# A sequence of module-name suffixes, or one regex that must match the full module name
# (the same two forms, with the same meaning, that PEFT's ``target_modules`` accepts).
TargetModules = tuple[str, ...] | str


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def check_int(name: str, value: Any, minimum: int) -> None:
    """An integer hyperparameter (bools rejected: JSON ``true`` is not a rank)."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an integer >= {minimum}, got {value!r}",
    )


def check_number(name: str, value: Any, low: float, high: float | None = None) -> None:
    """A real hyperparameter in ``[low, high)`` (``high=None``: unbounded, ``low`` exclusive)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = low <= value < high if high is not None else value > low
    bounds = f"in [{low}, {high})" if high is not None else f"> {low}"
    require(ok, f"{name} must be a number {bounds}, got {value!r}")


def normalize_targets(value: Any) -> TargetModules:
    """Lists from JSON become tuples so configs compare equal after a round trip."""
    if isinstance(value, str):
        require(bool(value), "target_modules must not be empty")
        return value
    if isinstance(value, list | tuple | set | frozenset):
        names = tuple(sorted(value)) if isinstance(value, set | frozenset) else tuple(value)
        require(bool(names), "target_modules must not be empty")
        require(all(isinstance(n, str) and n for n in names), "target_modules must be names")
        return names
    raise ValueError(f"target_modules must be a list of names or a regex, got {value!r}")


@dataclasses.dataclass
class MethodConfig:
    """Base of LoraConfig, MoSConfig and HydraConfig; subclasses add fields and ``validate``."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.target_modules = normalize_targets(self.target_modules)
        check_number("dropout", self.dropout, 0.0, 1.0)
        check_number("alpha", self.alpha, 0.0)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ValueError with the offending field named."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including ``"method"``; ``from_dict`` inverts it."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Build from a dict; unknown keys are an error so typos never pass silently."""
        d = dict(d)
        method = d.pop("method", cls.method)
        require(method == cls.method, f"{cls.__name__} cannot load a {method!r} config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        require(
            not unknown,
            f"unknown {cls.method} hyperparameter(s) {unknown}; valid: {sorted(names)}",
        )
        return cls(**d)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's output scale: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
