"""MoS (Mixture of Shards): LoRA factors gathered from pools shared across layers.

config.py holds the hyperparameters, sharding.py the index sets, layer.py the math and
model.py the injection; the model is imported from its module (adapterhub.methods.api does).
"""

from adapterhub.methods.mos.config import MoSConfig

__all__ = ["MoSConfig"]
