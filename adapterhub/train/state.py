"""Resumable training checkpoints: adapter, optimizer and RNG state, without pickle.

Optimizer tensors go to safetensors and the rest to JSON, so a checkpoint is as safe to
open as an adapter file; ``torch.load`` is never used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (its state file is written last)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict:
    """Write tensors of the optimizer state to ``path``; return the JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(path))
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, meta: dict) -> None:
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    output_dir: Path, step: int, model, optimizer: torch.optim.Optimizer, extra: dict,
    keep: int = 2, rng_state: torch.Tensor | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically enough for resume and prune old ones.

    ``rng_state`` is the CPU generator state to resume from (default: torch's global one;
    a job co-served inside the engine keeps its own).
    """
    path = checkpoint_dir(output_dir, step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.save(path / ADAPTER_DIR)
    optim_meta = save_optimizer(optimizer, path / OPTIM_FILE)
    rng = torch.get_rng_state() if rng_state is None else rng_state
    save_file({"cpu": rng}, str(path / "rng.safetensors"))
    state = {"step": step, "optimizer": optim_meta, **extra}
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    old = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if p != path)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint, in the native form ``AdapterModel.save`` wrote."""
    return load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def read_rng(path: Path) -> torch.Tensor:
    """The CPU generator state a checkpoint saved."""
    return load_file(str(path / "rng.safetensors"))["cpu"]


def restore_rng(path: Path) -> None:
    torch.set_rng_state(read_rng(path))
