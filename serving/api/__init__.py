"""The gRPC API: servicers for inference, adapters and fine-tune jobs, and the server around them.

The servicers talk to a backend (backend.py) rather than to the engine directly, so the
embedded server and a later cluster mode share one implementation of every RPC.
"""

from serving.api.config import ServerConfig
from serving.api.server import Server, build_server

__all__ = ["Server", "ServerConfig", "build_server"]
