"""(f) MLServer with adaptive batching (max batch 32, max batch time 100 ms), identity only:
the issue's table has it for the identity model. Runs in its own environment
(``bench/.venv-mlserver``, built by ``python -m bench.run`` unless ``--no-mlserver``),
never in ringserve's.

    bench/.venv-mlserver/bin/python -m bench.baselines.mlserver_app --port P --dir D \
        --name NAME

writes MLServer's ``settings.json`` and the model's ``model-settings.json`` under ``D``
and runs ``mlserver start D``: the KServe v2 endpoint ``POST /v2/models/NAME/infer``
(JSON), the model's readiness at ``GET /v2/models/NAME/ready``. Everything else as MLServer ships it (one
inference worker process beside the HTTP server); gRPC and the metrics server listen on
port 0, a free port the kernel picks, so that repetitions do not collide. Debug mode (on
by default) is off, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


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


def write_settings(
    folder: Path, port: int, name: str, max_batch: int, max_batch_time_s: float
) -> None:
    """MLServer's two settings files: the server's and the identity model's."""
    server = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": 0,
        "metrics_port": 0,
        "debug": False,
    }
    model = {
        "name": name,
        "implementation": "bench.baselines.mlserver_app.Identity",  # (not __main__)
        "max_batch_size": max_batch,
        "max_batch_time": max_batch_time_s,
    }
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(server))
    (folder / name / "model-settings.json").write_text(json.dumps(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, help="where the settings files are written")
    ap.add_argument("--name", required=True, help="the model's name in the v2 routes")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-batch-time-ms", type=float, default=100)
    args = ap.parse_args()
    folder = Path(args.dir)
    write_settings(folder, args.port, args.name, args.max_batch, args.max_batch_time_ms / 1000)
    mlserver = Path(sys.executable).parent / "mlserver"  # (the venv's, not resolved)
    os.execv(str(mlserver), [str(mlserver), "start", str(folder)])


if __name__ == "__main__":
    main()
