"""`adapterhub serve` options of co-serving, and attaching a CoServer to the server's engine."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coserve", choices=["overlap", "inline", "off"], default="overlap",
                   help="train co-served fine-tune jobs inside the engine's iterations, beside "
                   "the inference forward (overlap: in a worker process over shared weights "
                   "on CPU, on a helper thread on a GPU) or after it on the engine thread "
                   "(inline); off: every job runs on the dedicated worker")
    p.add_argument("--coserve-min-share", type=float, default=0.05,
                   help="share of each iteration's token budget fine-tuning always gets")
    p.add_argument("--coserve-ttft-slo-ms", type=float, default=None,
                   help="first-token latency target; misses shrink the fine-tuning share")
    p.add_argument("--coserve-tpot-slo-ms", type=float, default=None,
                   help="time-per-output-token target; misses shrink the fine-tuning share")


def attach(engine: Any, args: Any) -> Any:
    """Give ``engine`` a CoServer per ``args``; returns the job service's Coserving or None."""
    mode = getattr(args, "coserve", "overlap")
    if mode == "off":
        return None
    from serving.engine.coserve.config import CoserveConfig
    from serving.engine.coserve.coserver import CoServer
    from serving.engine.coserve.job import EngineCoserving

    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000.0

    config = CoserveConfig(
        min_share=getattr(args, "coserve_min_share", 0.05), overlap=mode == "overlap",
        ttft_slo_s=seconds(getattr(args, "coserve_ttft_slo_ms", None)),
        tpot_slo_s=seconds(getattr(args, "coserve_tpot_slo_ms", None)))
    engine.coserve = CoServer(engine, config)
    return EngineCoserving(engine.coserve)
