"""The small base model AdapterHub ships, and the script that builds it (`build`)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BASE_NAME = "adapterhub-tiny-llama"


def default_base_path() -> Path:
    """Directory of the shipped base checkpoint (safetensors + char tokenizer)."""
    return Path(__file__).resolve().parent.parent / "assets" / "base-model"
