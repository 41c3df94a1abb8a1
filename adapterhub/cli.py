"""The `adapterhub` command line: fine-tune, inspect and export adapters, open the MLflow UI.

Heavy libraries are imported inside the commands so that `--help` and argument errors are
instant. Every user error ends as one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from adapterhub.errors import AdapterHubError


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data directory (default: $ADAPTERHUB_HOME or ~/.adapterhub)")


_DEFAULT_SERVER = "127.0.0.1:50051"


def _add_client_flags(p: argparse.ArgumentParser, server: bool = True) -> None:
    if server:
        p.add_argument("--server", default=None,
                       help=f"server address (default: $ADAPTERHUB_SERVER or {_DEFAULT_SERVER})")
    p.add_argument("--api-key", help="API key (default: $ADAPTERHUB_API_KEY)")
    p.add_argument("--tls-ca", help="CA bundle to verify the server's certificate")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client private key (mutual TLS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterhub", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="train an adapter, track it in MLflow, register it")
    ft.add_argument("--name", required=True, help="registered adapter name")
    ft.add_argument("--method", default="lora", help="lora | mos | hydra")
    ft.add_argument("--base", help="checkpoint directory (default: the shipped base model)")
    src = ft.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a shipped task (see `adapterhub tasks`)")
    src.add_argument("--train", dest="train_file", help="JSONL of {prompt, completion} records")
    ft.add_argument("--eval", dest="eval_file", help="held-out JSONL (default: 10%% of --train)")
    ft.add_argument("--rank", type=int, help="adapter rank (hydra: split parallel/sequential)")
    ft.add_argument("--alpha", type=float, help="scaling numerator (scale = alpha / rank)")
    ft.add_argument("--param", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                    help="method hyper-parameter, e.g. shards_per_vector=2 (repeatable)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--grad-accum", type=int, default=1)
    ft.add_argument("--lr", type=float, default=3e-3)
    ft.add_argument("--max-length", type=int, default=128)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--eval-every", type=int, default=0)
    ft.add_argument("--checkpoint-every", type=int, default=50)
    ft.add_argument("--quantize", choices=["nf4"], help="4-bit NF4 base (QLoRA)")
    ft.add_argument("--device", default="cpu")
    ft.add_argument("--alias", action="append", default=[], help="alias to set (repeatable)")
    ft.add_argument("--no-resume", action="store_true", help="restart instead of resuming")
    ft.add_argument("--no-progress", action="store_true")
    _add_data_dir(ft)

    ad = sub.add_parser("adapters", help="registered adapters (registry, or a server's)")
    ad_sub = ad.add_subparsers(dest="action", required=True)
    ls = ad_sub.add_parser("list", help="list registered adapters (--server: loaded ones)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--server", nargs="?", const=_DEFAULT_SERVER, default=None,
                    help="list what a server has loaded instead of the registry")
    _add_client_flags(ls, server=False)
    _add_data_dir(ls)
    ld = ad_sub.add_parser("load", help="load an adapter into a running server")
    ld.add_argument("source", help="registry reference or a directory the server can read")
    ld.add_argument("--name", default="", help="name requests use (default: the reference)")
    _add_client_flags(ld)
    ul = ad_sub.add_parser("unload", help="unload an adapter from a running server")
    ul.add_argument("name")
    _add_client_flags(ul)
    show = ad_sub.add_parser("show", help="versions, aliases and config of one adapter")
    show.add_argument("ref", help="name, name@alias, name/version, models:/..., or a path")
    _add_data_dir(show)
    ex = ad_sub.add_parser("export", help="export as a plain PEFT LoRA directory")
    ex.add_argument("ref")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--base", help="base checkpoint (default: the one it was trained on)")
    _add_data_dir(ex)
    al = ad_sub.add_parser("alias", help="point an alias at a version")
    al.add_argument("name")
    al.add_argument("alias")
    al.add_argument("version", type=int)
    _add_data_dir(al)

    gen = sub.add_parser("generate", help="generate text on a running server")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default="", help="adapter reference (default: bare base)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    _add_client_flags(gen)

    jobs = sub.add_parser("jobs", help="fine-tune jobs on a running server")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    js = jobs_sub.add_parser("submit", help="submit a fine-tune job")
    js.add_argument("--name", required=True, help="adapter name to register")
    js.add_argument("--method", default="lora")
    js_src = js.add_mutually_exclusive_group(required=True)
    js_src.add_argument("--task", help="a task shipped with the server")
    js_src.add_argument("--train", help="JSONL path on the server")
    js_src.add_argument("--records", help="local JSONL file sent inline")
    js.add_argument("--eval", help="held-out JSONL path on the server")
    js.add_argument("--param", action="append", type=_kv, default=[], metavar="KEY=VALUE")
    js.add_argument("--rank", type=int)
    js.add_argument("--steps", type=int, default=0)
    js.add_argument("--batch-size", type=int, default=0)
    js.add_argument("--lr", type=float, default=0.0)
    js.add_argument("--alias", action="append", default=[])
    js.add_argument("--watch", action="store_true", help="follow progress until it ends")
    _add_client_flags(js)
    for action in ("get", "cancel", "watch"):
        p = jobs_sub.add_parser(action, help=f"{action} a job")
        p.add_argument("id")
        _add_client_flags(p)
    _add_client_flags(jobs_sub.add_parser("list", help="list jobs"))

    tasks = sub.add_parser("tasks", help="list the shipped training tasks")
    tasks.add_argument("--write", metavar="DIR", help="also write each task's JSONL here")

    ui = sub.add_parser("ui", help="open the MLflow UI on the data directory")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    _add_data_dir(ui)

    demo = sub.add_parser("demo", help="the end-to-end main job on the embedded default")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--name", default="demo-adapter")
    _add_data_dir(demo)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Commands of the serving and federated packages, registered as entry points so that
    this core package never imports them (``adapterhub.commands`` group)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="adapterhub.commands"):
        try:
            register = ep.load()
        except ImportError:
            continue  # that package is not installed
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from adapterhub import settings

    settings.offline_env(getattr(args, "data_dir", None))
    from adapterhub import commands
    from adapterhub.client import ClientError

    commands.quiet_libraries()
    handler = getattr(args, "func", None) or getattr(commands, f"cmd_{args.command}")
    try:
        return int(handler(args) or 0)
    except AdapterHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # Parameter validation (configs, ranks) and file-system failures are user errors too.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
