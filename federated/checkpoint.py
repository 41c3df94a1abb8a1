"""The server's per-round checkpoint: the global state (safetensors) and run state (JSON).

Written after every aggregated round (files replaced atomically), read on start: a restarted
server resumes from the last global adapter and the same MLflow run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.numpy import load_file, save_file

from federated.strategies.base import Arrays

GLOBAL_FILE, STATE_FILE = "global.safetensors", "state.json"


@dataclass
class RunState:
    round: int = 0  # last completed round
    run_id: str = ""  # the MLflow run to keep logging into
    fingerprint: dict = field(default_factory=dict)  # what must match to resume
    finished: bool = False


def save(directory: Path, arrays: Arrays, state: RunState) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (GLOBAL_FILE + ".tmp")
    save_file({k: v for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, directory / GLOBAL_FILE)
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    os.replace(tmp, directory / STATE_FILE)


def load(directory: Path, fingerprint: dict) -> tuple[Arrays, RunState] | None:
    """The checkpoint to resume from, or None if absent, finished or from another setup."""
    state_file, global_file = directory / STATE_FILE, directory / GLOBAL_FILE
    if not state_file.is_file() or not global_file.is_file():
        return None
    state = RunState(**json.loads(state_file.read_text()))
    if state.finished or state.fingerprint != fingerprint:
        return None
    return dict(load_file(str(global_file))), state
