"""(f) MLServer with adaptive batching (max batch 32, max batch time 100 ms), identity only:
the issue's table has it for the identity model. Runs in its own environment
(``bench/.venv-mlserver``, built by ``python -m bench.run`` unless ``--no-mlserver``),
never in ringserve's.

    bench/.venv-mlserver/bin/python -m bench.baselines.mlserver_app --port P --dir D

writes MLServer's ``settings.json`` and the model's ``model-settings.json`` under ``D``
and runs ``mlserver start D``: the KServe v2 endpoint ``POST /v2/models/id/infer`` (JSON),
the model's readiness at ``GET /v2/models/id/ready``. Everything else as MLServer ships it (one
inference worker process beside the HTTP server); gRPC and the metrics server get free
ports of their own so that repetitions do not collide. Debug mode (on by default) is
off, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

MODEL = "id"


class Identity(MLModel):
    """Returns its input: what the other systems' identity model does, on numpy."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        data = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("output", data)],
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_settings(folder: Path, port: int, max_batch: int, max_batch_time_s: float) -> None:
    """MLServer's two settings files: the server's and the identity model's."""
    server = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": _free_port(),
        "metrics_port": _free_port(),
        "debug": False,
    }
    model = {
        "name": MODEL,
        "implementation": "bench.baselines.mlserver_app.Identity",  # (not __main__)
        "max_batch_size": max_batch,
        "max_batch_time": max_batch_time_s,
    }
    (folder / MODEL).mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(server))
    (folder / MODEL / "model-settings.json").write_text(json.dumps(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, help="where the settings files are written")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-batch-time-ms", type=float, default=100)
    args = ap.parse_args()
    folder = Path(args.dir)
    write_settings(folder, args.port, args.max_batch, args.max_batch_time_ms / 1000)
    mlserver = Path(sys.executable).parent / "mlserver"  # (the venv's, not resolved)
    os.execv(str(mlserver), [str(mlserver), "start", str(folder)])


if __name__ == "__main__":
    main()
