"""AdapterService: list, inspect, load (registry reference or local directory) and unload."""

from __future__ import annotations

from adapterhub.v1 import adapters_pb2, adapters_pb2_grpc
from serving.api.backend import LocalBackend
from serving.api.calls import CallTracker, unary
from serving.api.convert import adapter_message


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, backend: LocalBackend, calls: CallTracker) -> None:
        self.backend = backend
        self.calls = calls

    @unary("AdapterService/List")
    def List(self, request, context, info):
        return adapters_pb2.ListAdaptersResponse(
            adapters=[adapter_message(a) for a in self.backend.list_adapters()])

    @unary("AdapterService/Get")
    def Get(self, request, context, info):
        info["adapter"] = request.name
        return adapter_message(self.backend.get_adapter(request.name))

    @unary("AdapterService/Load")
    def Load(self, request, context, info):
        info["adapter"] = request.name or request.source
        return adapter_message(self.backend.load_adapter(request.name, request.source))

    @unary("AdapterService/Unload")
    def Unload(self, request, context, info):
        info["adapter"] = request.name
        self.backend.unload_adapter(request.name)
        return adapters_pb2.UnloadAdapterResponse()
