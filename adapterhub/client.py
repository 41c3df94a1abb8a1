"""Python client of the AdapterHub gRPC API (inference, adapters, fine-tune jobs).

    with Client("127.0.0.1:50051", api_key="...") as c:
        print(c.generate("reverse: abc =", adapter="rev@production").text)
        job = c.submit_job("rev2", task="reverse", training={"steps": 100})
        for state in c.watch_job(job.id):
            print(state.step, state.loss)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from adapterhub.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    finetune_pb2,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
JOB_STATES = {v: k.removeprefix("JOB_STATE_").lower()
              for k, v in finetune_pb2.JobState.items()}
FINISH_REASONS = {v: k.removeprefix("FINISH_REASON_").lower()
                  for k, v in inference_pb2.FinishReason.items()}


class ClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (e.g. NOT_FOUND)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _wrap(exc: grpc.RpcError) -> ClientError:
    return ClientError(exc.code().name, exc.details() or "")


class Client:
    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        tls_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float | None = None,
    ) -> None:
        self.address = address or os.environ.get("ADAPTERHUB_SERVER", DEFAULT_ADDRESS)
        self.api_key = api_key if api_key is not None else os.environ.get("ADAPTERHUB_API_KEY")
        self.timeout = timeout
        if tls_ca or client_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
            )
            self.channel = grpc.secure_channel(self.address, creds)
        else:
            self.channel = grpc.insecure_channel(self.address)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.jobs = finetune_pb2_grpc.FineTuneServiceStub(self.channel)

    # -- plumbing -------------------------------------------------------------------------
    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def _call(self, rpc, request, timeout: float | None = None):
        try:
            return rpc(request, metadata=self._md(), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def _stream(self, rpc, request, timeout: float | None = None) -> Iterator:
        try:
            yield from rpc(request, metadata=self._md(), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inference ------------------------------------------------------------------------
    @staticmethod
    def _request(prompt: str, adapter: str = "", max_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Iterable[str] = (), ignore_eos: bool = False
                 ) -> inference_pb2.GenerateRequest:
        sampling = inference_pb2.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None:
            sampling.seed = seed
        return inference_pb2.GenerateRequest(prompt=prompt, adapter=adapter or "",
                                             sampling=sampling, max_tokens=max_tokens,
                                             stop=list(stop), ignore_eos=ignore_eos)

    def generate(self, prompt: str, timeout: float | None = None, **kwargs
                 ) -> inference_pb2.GenerateResponse:
        return self._call(self.inference.Generate, self._request(prompt, **kwargs), timeout)

    def generate_stream(self, prompt: str, timeout: float | None = None, **kwargs
                        ) -> Iterator[inference_pb2.GenerateChunk]:
        return self._stream(self.inference.GenerateStream, self._request(prompt, **kwargs),
                            timeout)

    # -- adapters -------------------------------------------------------------------------
    def list_adapters(self) -> list[adapters_pb2.Adapter]:
        return list(self._call(self.adapters.List, adapters_pb2.ListAdaptersRequest()).adapters)

    def get_adapter(self, name: str) -> adapters_pb2.Adapter:
        return self._call(self.adapters.Get, adapters_pb2.GetAdapterRequest(name=name))

    def load_adapter(self, source: str, name: str = "") -> adapters_pb2.Adapter:
        return self._call(self.adapters.Load,
                          adapters_pb2.LoadAdapterRequest(name=name, source=source))

    def unload_adapter(self, name: str) -> None:
        self._call(self.adapters.Unload, adapters_pb2.UnloadAdapterRequest(name=name))

    # -- fine-tune jobs -------------------------------------------------------------------
    def submit_job(
        self,
        output_name: str,
        method: str = "lora",
        method_params: dict | None = None,
        task: str | None = None,
        train_path: str | None = None,
        records: Iterable[tuple[str, str]] | None = None,
        eval_path: str | None = None,
        training: dict | None = None,
        aliases: Iterable[str] = (),
        quantize: str = "",
    ) -> finetune_pb2.FineTuneJob:
        dataset = finetune_pb2.Dataset()
        if task:
            dataset.task = task
        elif train_path:
            dataset.path = train_path
        elif records is not None:
            dataset.records.records.extend(
                finetune_pb2.Record(prompt=p, completion=c) for p, c in records)
        if eval_path:
            dataset.eval_path = eval_path
        params = struct_pb2.Struct()
        params.update(method_params or {})
        spec = finetune_pb2.FineTuneJobSpec(
            output_name=output_name, method=method, method_params=params, dataset=dataset,
            training=finetune_pb2.TrainingParams(**(training or {})), quantize=quantize,
            aliases=list(aliases))
        return self._call(self.jobs.Submit, finetune_pb2.SubmitJobRequest(spec=spec))

    def get_job(self, job_id: str) -> finetune_pb2.FineTuneJob:
        return self._call(self.jobs.Get, finetune_pb2.GetJobRequest(id=job_id))

    def list_jobs(self) -> list[finetune_pb2.FineTuneJob]:
        return list(self._call(self.jobs.List, finetune_pb2.ListJobsRequest()).jobs)

    def cancel_job(self, job_id: str) -> finetune_pb2.FineTuneJob:
        return self._call(self.jobs.Cancel, finetune_pb2.CancelJobRequest(id=job_id))

    def watch_job(self, job_id: str, timeout: float | None = None
                  ) -> Iterator[finetune_pb2.FineTuneJob]:
        return self._stream(self.jobs.Watch, finetune_pb2.WatchJobRequest(id=job_id), timeout)
