"""Implementations of the CLI subcommands (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapterhub.errors import AdapterHubError


def quiet_libraries() -> None:
    """Silence library progress bars and chatter that would bury our one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _registry(args: argparse.Namespace):
    from adapterhub.registry import Registry

    return Registry(args.data_dir)


def _method_params(args: argparse.Namespace) -> dict:
    params = dict(args.param)
    if args.rank is not None:
        if args.method == "hydra":
            params.setdefault("r_parallel", args.rank - args.rank // 2)
            params.setdefault("r_sequential", args.rank // 2)
        else:
            params.setdefault("r", args.rank)
    if args.alpha is not None:
        params.setdefault("alpha", args.alpha)
    return params


def cmd_finetune(args: argparse.Namespace) -> int:
    from adapterhub.finetune import FinetuneJob, run_finetune
    from adapterhub.train import TrainConfig

    job = FinetuneJob(
        name=args.name, method=args.method, method_params=_method_params(args), base=args.base,
        task=args.task, train_file=args.train_file, eval_file=args.eval_file,
        train=TrainConfig(
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=args.lr, max_length=args.max_length, seed=args.seed,
            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        ),
        quantize=args.quantize, device=args.device, aliases=args.alias,
    )
    result = run_finetune(job, args.data_dir, progress=not args.no_progress,
                          resume=not args.no_resume)
    print(json.dumps({
        "name": result.name, "version": result.version, "run_id": result.run_id,
        "adapter_dir": str(result.adapter_dir),
        "base": result.base_metrics, "adapter": result.metrics,
    }, indent=1, default=float))
    return 0


def _summary_row(a) -> dict:
    return {"name": a.name, "latest_version": a.latest_version, "aliases": a.aliases,
            "method": a.method, "base_model": a.base_model}


def _client(args: argparse.Namespace):
    from adapterhub.client import Client

    return Client(args.server, api_key=args.api_key, tls_ca=args.tls_ca,
                  client_cert=args.tls_cert, client_key=args.tls_key)


def _server_adapters(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        if args.action == "load":
            print(json.dumps(MessageToDict(client.load_adapter(args.source, args.name)),
                             indent=1))
        elif args.action == "unload":
            client.unload_adapter(args.name)
            print(f"unloaded {args.name}")
        else:
            rows = [MessageToDict(a, always_print_fields_with_no_presence=True)
                    for a in client.list_adapters()]
            print(json.dumps(rows, indent=1))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    if args.action in ("load", "unload") or getattr(args, "server", None):
        return _server_adapters(args)
    registry = _registry(args)
    if args.action == "list":
        rows = [_summary_row(a) for a in registry.list_adapters()]
        if args.json:
            print(json.dumps(rows, indent=1, default=str))
        elif not rows:
            print("no adapters registered")
        else:
            print(f"{'NAME':24} {'VERSION':>7}  {'METHOD':6}  ALIASES")
            for r in rows:
                aliases = ", ".join(f"{k}->v{v}" for k, v in sorted(r["aliases"].items()))
                print(f"{r['name']:24} {r['latest_version']:>7}  {r['method'] or '-':6}  {aliases}")
        return 0
    if args.action == "alias":
        registry.set_alias(args.name, args.alias, args.version)
        print(f"{args.name}@{args.alias} -> version {args.version}")
        return 0
    path = registry.resolve(args.ref)
    if args.action == "show":
        from adapterhub.methods import read_adapter_config

        config = read_adapter_config(path)
        print(json.dumps({"ref": args.ref, "path": str(path), "config": config.to_dict()},
                         indent=1, default=str))
        return 0
    if args.action == "export":
        return _export(path, Path(args.out), args.base)
    raise AdapterHubError(f"unknown action {args.action}")


def _export(adapter_dir: Path, out: Path, base: str | None) -> int:
    from adapterhub.checkpoints import load_base_model
    from adapterhub.methods import load_adapter

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise AdapterHubError(f"{adapter_dir}: no base model recorded; pass --base")
    adapter = load_adapter(load_base_model(base), adapter_dir)
    adapter.export_peft_lora(out)
    print(f"exported {adapter.config.method} adapter as PEFT LoRA to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from adapterhub.client import FINISH_REASONS

    kwargs = dict(adapter=args.adapter, max_tokens=args.max_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, stop=args.stop)
    with _client(args) as client:
        if args.stream:
            last = None
            for last in client.generate_stream(args.prompt, timeout=args.timeout, **kwargs):
                print(last.text, end="", flush=True)
            print()
            reason = FINISH_REASONS[last.finish_reason] if last else "?"
            print(f"[finish: {reason}]", file=sys.stderr)
        else:
            out = client.generate(args.prompt, timeout=args.timeout, **kwargs)
            print(out.text)
            print(f"[finish: {FINISH_REASONS[out.finish_reason]}, "
                  f"{out.usage.completion_tokens} tokens, {out.timings.total_s:.3f}s]",
                  file=sys.stderr)
    return 0


def _job_row(job) -> dict:
    from adapterhub.client import JOB_STATES

    return {"id": job.id, "name": job.spec.output_name, "state": JOB_STATES[job.state],
            "step": job.step, "total_steps": job.total_steps, "loss": round(job.loss, 5),
            "tokens_per_s": round(job.tokens_per_s, 1), "adapter": job.adapter_ref,
            "error": job.error, "metrics": dict(job.metrics)}


def _watch(client, job_id: str) -> int:
    from adapterhub.client import JOB_STATES

    last = None
    for last in client.watch_job(job_id):
        row = _job_row(last)
        print(f"{row['id']} {row['state']:9} step {row['step']}/{row['total_steps']} "
              f"loss {row['loss']} tok/s {row['tokens_per_s']}", flush=True)
    if last is not None and JOB_STATES[last.state] != "succeeded":
        print(f"error: job {job_id} ended {JOB_STATES[last.state]}: {last.error}",
              file=sys.stderr)
        return 1
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "submit":
            params = dict(args.param)
            if args.rank is not None:
                params.setdefault("r", args.rank)
            records = None
            if args.records:
                from adapterhub.data import read_jsonl

                records = [(r.prompt, r.completion) for r in read_jsonl(args.records)]
            training = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size,
                                          "lr": args.lr}.items() if v}
            job = client.submit_job(args.name, method=args.method, method_params=params,
                                    task=args.task, train_path=args.train, records=records,
                                    eval_path=args.eval, training=training,
                                    aliases=args.alias)
            print(json.dumps(_job_row(job), indent=1))
            return _watch(client, job.id) if args.watch else 0
        if args.action == "list":
            print(json.dumps([_job_row(j) for j in client.list_jobs()], indent=1))
        elif args.action == "get":
            print(json.dumps(_job_row(client.get_job(args.id)), indent=1))
        elif args.action == "cancel":
            print(json.dumps(_job_row(client.cancel_job(args.id)), indent=1))
        elif args.action == "watch":
            return _watch(client, args.id)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from adapterhub.tasks import DEFAULT_TASK, TASKS, write_task

    for name, spec in TASKS.items():
        mark = " (default)" if name == DEFAULT_TASK else ""
        print(f"{name:12} {spec.description}{mark}")
        if args.write:
            write_task(name, Path(args.write) / name, n_train=2000, n_eval=200, seed=0)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from adapterhub import settings
    from adapterhub.registry.server import start_ui, stop

    root = settings.data_dir(args.data_dir)
    proc = start_ui(root, host=args.host, port=args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (data: {root}); Ctrl-C to stop")
    try:
        proc.wait()
    finally:
        stop(proc)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from adapterhub.demo import run_demo

    return run_demo(args.data_dir, steps=args.steps, name=args.name)
