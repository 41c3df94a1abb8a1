"""The job side of co-serving: a Trainer look-alike for run_finetune, on the job's thread.

``CoservedTraining`` is the FinetuneBackend that run_finetune uses for a co-served job: the
base model is a skeleton over the engine's resident weights and the trainer is a
``CoservedTrainer``, which attaches the job's Trainee to the engine and then only follows
it: it logs each step (a cancelled or stopped job raises there and is detached), and at
the pauses the Trainee makes, with no slice of it running, it evaluates, writes resumable
checkpoints (adapterhub/train/state.py) and, if asked, serves the checkpoint at once under
a name of the user's choosing. MLflow tracking and registration stay run_finetune's.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterhub.data import Record
from adapterhub.errors import CheckpointError
from adapterhub.train import state as ckpt
from adapterhub.train.config import TrainConfig
from adapterhub.train.evaluate import evaluate
from serving.engine.adapter_loader import host_adapter_from_model
from serving.engine.coserve.coserver import CoServer
from serving.engine.coserve.trainee import Trainee, trainable_skeleton

LogFn = Callable[[dict[str, float], int], None]
# How often a job waiting for its next step asks whether it was cancelled or must stop.
INTERRUPT_CHECK_S = 0.5


class CoservedTrainer:
    """Trainer's interface (``resume``, ``train``, ``step``, ``history``) over a Trainee."""

    def __init__(self, coserver: CoServer, adapter, tokenizer, train_records: Sequence[Record],
                 config: TrainConfig, eval_records: Sequence[Record] | None = None,
                 output_dir: str | Path | None = None, log: LogFn | None = None,
                 serve_as: str | None = None, name: str = "job",
                 interrupt: Callable[[], BaseException | None] | None = None) -> None:
        self.coserver = coserver
        self.engine = coserver.engine
        self.model = adapter
        self.tokenizer = tokenizer
        self.config = config
        self.eval_records = list(eval_records or [])[: config.eval_limit]
        self.output_dir = Path(output_dir) if output_dir else None
        self.log = log or (lambda metrics, step: None)
        self.serve_as = serve_as
        self.interrupt = interrupt or (lambda: None)
        self.history: list[dict[str, float]] = []
        self.trainee = Trainee(name, adapter, tokenizer, train_records, config,
                               pause_at=self._pause_due)

    @property
    def step(self) -> int:
        return self.trainee.step

    def _pause_due(self, step: int) -> bool:
        cfg = self.config
        return bool((cfg.eval_every and step % cfg.eval_every == 0)
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0))

    def resume(self) -> bool:
        """Load the newest checkpoint under output_dir (adapter, optimizer, generator, step)."""
        path = ckpt.latest_checkpoint(self.output_dir) if self.output_dir else None
        if path is None:
            return False
        self.model.load_adapter_state_dict(ckpt.load_adapter_tensors(path))
        meta = ckpt.read_state(path)
        ckpt.load_optimizer(self.trainee.optimizer, path / ckpt.OPTIM_FILE, meta["optimizer"])
        self.trainee.rng_state = ckpt.read_rng(path)
        self.trainee.step = int(meta["step"])
        return True

    def train(self) -> dict[str, float]:
        """Train inside the engine to ``config.steps``; the same return value as Trainer's."""
        cfg = self.config
        final: dict[str, float] = {}
        if self.trainee.step < cfg.steps:
            self.coserver.attach(self.trainee)
            try:
                final = self._follow()
            finally:
                self.coserver.detach(self.trainee)
        self._checkpoint()
        self.model.eval()
        if self.eval_records:
            final = {**final, **self._eval()}
        return final

    def _follow(self) -> dict[str, float]:
        final: dict[str, float] = {}
        while True:
            try:
                kind, payload, step = self.trainee.events.get(timeout=INTERRUPT_CHECK_S)
            except queue.Empty:
                exc = self.interrupt()
                if exc is not None:
                    raise exc from None
                continue
            if kind == "step":
                final = payload
                self.history.append(payload)
                self.log(payload, step)
            elif kind == "pause":
                cfg = self.config
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._eval()
                    self.model.train()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._checkpoint()
                self.trainee.resume()
                self.coserver.wake()
            elif kind == "done":
                return final
            elif kind == "error":
                raise payload

    def _eval(self) -> dict[str, float]:
        metrics = evaluate(self.model, self.tokenizer, self.eval_records, self.config.max_length,
                           self.config.max_new_tokens)
        self.log(metrics, self.step)
        return metrics

    def _checkpoint(self) -> None:
        if self.output_dir is not None:
            ckpt.save_checkpoint(self.output_dir, self.step, self.model, self.trainee.optimizer,
                                 {"config": self.config.to_dict()},
                                 rng_state=self.trainee.rng_state)
        if self.serve_as:
            self.serve(self.serve_as)

    def serve(self, name: str) -> None:
        """Register the adapter as it is now in the engine (requests may name it at once)."""
        source = f"co-served job {self.trainee.name}, step {self.step}"
        host = host_adapter_from_model(name, self.model, self.engine.shape,
                                       self.engine.config.dtype, source)
        self.engine.register_adapter(name, host)


class CoservedTraining:
    """run_finetune's backend for a job co-served by ``coserver``'s engine."""

    def __init__(self, coserver: CoServer, serve_as: str | None = None,
                 interrupt: Callable[[], BaseException | None] | None = None) -> None:
        self.coserver = coserver
        self.serve_as = serve_as
        self.interrupt = interrupt

    def load_base(self, job: Any, base_dir: Path) -> tuple[Any, Any]:
        from adapterhub.checkpoints import load_tokenizer

        check_coservable(job, self.coserver.engine)
        # Its own tokenizer: fast tokenizers must not be shared between threads.
        return trainable_skeleton(self.coserver.engine.runner.model), load_tokenizer(base_dir)

    def make_trainer(self, adapter, tokenizer, train_records, config, eval_records, output_dir,
                     log, progress) -> CoservedTrainer:
        name = Path(output_dir).name if output_dir else "job"
        return CoservedTrainer(self.coserver, adapter, tokenizer, train_records, config,
                               eval_records, output_dir, log, self.serve_as, name,
                               self.interrupt)


class EngineCoserving:
    """What the job service needs to co-serve jobs in one engine (adapterhub's Coserving)."""

    def __init__(self, coserver: CoServer) -> None:
        self.coserver = coserver

    def unavailable(self, spec: Any) -> str | None:
        return coservable(spec, self.coserver.engine)

    def backend(self, spec: Any, interrupt: Callable[[], BaseException | None]
                ) -> CoservedTraining:
        return CoservedTraining(self.coserver, spec.serve_checkpoints_as, interrupt)


def coservable(job: Any, engine: Any) -> str | None:
    """Why ``job`` cannot train inside ``engine`` (None when it can). It trains on the
    engine's device, whatever ``job.device`` says."""
    from adapterhub.finetune import base_path

    if job.quantize:
        return "a quantized (nf4) base is not the model the engine serves"
    base = base_path(job).resolve()
    if base != Path(engine.config.model).expanduser().resolve():
        return f"its base {base} is not the engine's model {engine.config.model}"
    return None


def check_coservable(job: Any, engine: Any) -> None:
    why = coservable(job, engine)
    if why is not None:
        raise CheckpointError(f"job {job.name!r} cannot be co-served: {why}")
