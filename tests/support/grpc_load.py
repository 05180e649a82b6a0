"""gRPC calls in a loop across a disruption, as a client with the retry policy that
docs/kserve-v2.md recommends (retry UNAVAILABLE and CANCELLED) makes them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from conftest import wait_until

RETRY_UNAVAILABLE = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "inference.GRPCInferenceService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    # CANCELLED: what grpc core answers a call that reached a server as it
                    # began to shut down (grpc/grpc#41785), seen in a rolling restart
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    }
)


def retrying_client(address: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        address,
        channel_args=[("grpc.service_config", RETRY_UNAVAILABLE), ("grpc.enable_retries", 1)],
    )


def calls_across(address: str, disrupt: Callable[[], None], threads: int = 4) -> tuple[int, list]:
    """Identity calls from ``threads`` clients, 200 before ``disrupt()`` and 200 after
    it returns; returns (calls answered, errors and wrong answers)."""
    stop, errors, done = threading.Event(), [], [0]

    def loop(n: int) -> None:
        c = retrying_client(address)
        x = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
        try:
            while not stop.is_set():
                x.set_data_from_numpy(np.array([[n, done[0]]], np.float32))
                try:
                    out = c.infer("id", [x], client_timeout=10).as_numpy("OUTPUT0")
                    if out[0, 0] != n:
                        errors.append(f"wrong answer {out}")
                    done[0] += 1
                except Exception as e:
                    errors.append(f"{getattr(e, 'status', lambda: '')()} {e}")
        finally:
            c.close()

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    try:
        wait_until(lambda: done[0] >= 200, 30, "load before the disruption")
        disrupt()
        before = done[0]
        wait_until(lambda: done[0] >= before + 200, 30, "load after the disruption")
    finally:
        stop.set()
        for t in workers:
            t.join(30)
    return done[0], errors
