"""Co-serving (FlexLLM): fine-tuning jobs trained inside the engine's iterations.

Each iteration's token budget goes to inference first; what is left (at least a configured
minimum share, less when an inference latency target is missed) goes to the resident
fine-tuning jobs, shared fairly between them, as sequence-granular slices of their
micro-batches. The result equals adapterhub's Trainer: co-serving changes when the work
runs, not what it computes.

    config.py    knobs (minimum share, latency targets, overlap and its helper)
    budget.py    the SLO controller and the fair share between jobs
    memory.py    activation bytes per token, measured, and pool pages reserved for them
    trainee.py   one job resident in the engine: data order, slices, optimizer steps
    coserver.py  the engine hook: plans and runs each iteration's fine-tuning slices
    worker.py    the process that computes overlapped slices on CPU (no GIL contention)
    job.py       the job-service side: checkpoints, evaluation, serving checkpoints, MLflow
"""

from serving.engine.coserve.config import CoserveConfig
from serving.engine.coserve.coserver import CoServer
from serving.engine.coserve.trainee import Trainee, trainable_skeleton

__all__ = ["CoServer", "CoserveConfig", "Trainee", "trainable_skeleton"]
