"""Generated gRPC stubs of the public API (package adapterhub.v1)."""
