"""Adapter training: the loop, held-out evaluation and resumable checkpoints."""

from adapterhub.train.config import TrainConfig
from adapterhub.train.evaluate import evaluate, greedy_complete
from adapterhub.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "evaluate", "greedy_complete"]
