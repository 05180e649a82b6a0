"""KServe v2 over gRPC (service.py)."""
