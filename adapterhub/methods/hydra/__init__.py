"""Hydra: a parallel LoRA branch on the input plus a sequential one on the base output.

config.py holds the hyperparameters, layer.py the math and model.py the injection.
"""

from adapterhub.methods.hydra.config import HydraConfig

__all__ = ["HydraConfig"]
