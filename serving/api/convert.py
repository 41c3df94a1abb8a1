"""Inference messages <-> engine values: sampling parameters in, outputs and timings out."""

from __future__ import annotations

import grpc

from adapterhub.v1 import adapters_pb2, inference_pb2
from serving.api.backend import AdapterInfo
from serving.api.status import ApiError
from serving.engine.outputs import RequestOutput
from serving.engine.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16
MAX_STOPS = 16

FINISH = {
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "stop": inference_pb2.FINISH_REASON_STOP,
    "eos": inference_pb2.FINISH_REASON_EOS,
    "aborted": inference_pb2.FINISH_REASON_ABORTED,
    "deadline": inference_pb2.FINISH_REASON_DEADLINE,
    "error": inference_pb2.FINISH_REASON_ERROR,
}


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def sampling_params(req: inference_pb2.GenerateRequest, max_stop_chars: int) -> SamplingParams:
    """Proto defaults (zeros) become engine defaults; range checks stay the engine's."""
    s = req.sampling
    if len(req.stop) > MAX_STOPS:
        raise _invalid(f"at most {MAX_STOPS} stop sequences, got {len(req.stop)}")
    for stop in req.stop:
        if not stop:
            raise _invalid("stop sequences must be non-empty strings")
        if len(stop) > max_stop_chars:
            raise _invalid(f"stop sequences are limited to {max_stop_chars} characters")
    return SamplingParams(
        max_tokens=req.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=float(s.temperature),
        top_k=int(s.top_k),
        top_p=float(s.top_p) if s.top_p != 0 else 1.0,
        seed=int(s.seed) if s.HasField("seed") else None,
        stop=list(req.stop),
        ignore_eos=req.ignore_eos,
    )


def _usage(out: RequestOutput) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=out.prompt_tokens,
                               completion_tokens=len(out.token_ids))


def _timings(out: RequestOutput) -> inference_pb2.Timings:
    # The engine does not report queueing time yet; first_token_s includes it.
    return inference_pb2.Timings(first_token_s=out.ttft_s or 0.0, total_s=out.latency_s or 0.0)


def response(out: RequestOutput) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        request_id=out.request_id, text=out.text, token_ids=out.token_ids,
        finish_reason=FINISH.get(out.finish_reason or "", 0),
        usage=_usage(out), timings=_timings(out))


def chunk(out: RequestOutput) -> inference_pb2.GenerateChunk:
    msg = inference_pb2.GenerateChunk(request_id=out.request_id, text=out.new_text,
                                      token_ids=out.new_token_ids)
    if out.finished:
        msg.finish_reason = FINISH.get(out.finish_reason or "", 0)
        msg.usage.CopyFrom(_usage(out))
        msg.timings.CopyFrom(_timings(out))
    return msg


def adapter_message(info: AdapterInfo) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        name=info.name, source=info.source, method=info.method, max_rank=info.max_rank,
        host_bytes=info.host_bytes, resident=info.resident,
        running_requests=info.running, waiting_requests=info.waiting, replicas=info.replicas)
