"""(d) LitServe with batching: max batch 32, batch timeout 5 ms, 2 API server processes,
one inference worker. Runs in its own environment (``bench/.venv-litserve``, built by
``python -m bench.run`` unless ``--no-litserve``), never in ringserve's.

    bench/.venv-litserve/bin/python -m bench.baselines.litserve_app --port P \
        --model identity|resnet50 [--threads T] [--api-servers 2] [--device cpu|cuda]

LitServe parses request bodies as JSON (or forms), so resnet50 gets the same JPEG as the
other systems base64-encoded in ``{"image": "..."}``; identity gets ``{"data": [...]}``.
"""

from __future__ import annotations

import argparse
import base64
import os

import litserve as ls

from bench.baselines import common


class BenchAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.name = os.environ["BENCH_MODEL"]
        self.model = common.load_model(self.name, int(os.environ.get("BENCH_THREADS", "1")), device)

    def decode_request(self, request: dict) -> object:
        if self.name == "identity":
            return common.decode_identity_data(request["data"])
        return common.decode_image(base64.b64decode(request["image"]))

    def batch(self, inputs: list) -> list:
        return inputs  # run_batch stacks (and handles ragged identity inputs)

    def predict(self, x: list) -> list:
        return common.run_batch(self.model, self.name, x)

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: object) -> dict:
        return {"result": output}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="identity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-timeout-ms", type=float, default=5)
    ap.add_argument("--api-servers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.update(BENCH_MODEL=args.model, BENCH_THREADS=str(args.threads))
    api = BenchAPI(max_batch_size=args.max_batch, batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(
        api,
        accelerator="cuda" if args.device.startswith("cuda") else "cpu",
        devices=1,  # as ringserve's one worker on one device ("auto": one per GPU)
        workers_per_device=1,
        healthcheck_path="/readiness",
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
