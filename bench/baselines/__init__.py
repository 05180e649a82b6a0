"""Comparison servers for the benchmark: (b) inline uvicorn, (c) FastAPI + asyncio.Queue
batcher, (d) LitServe. Each serves ``POST /predict`` and ``GET /readiness``."""
