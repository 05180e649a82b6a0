"""(b) The HTTP stack's own limit: Starlette under uvicorn running the model inline in the
handler (no batching, no IPC), one or N processes sharing the port (uvicorn ``workers``).

    python -m bench.baselines.inline_uvicorn --port P --model identity|resnet50 \
        [--procs N] [--threads T] [--device cpu|cuda]

Same event loop and HTTP parser as ringserve's frontends (uvloop, httptools).
"""

from __future__ import annotations

import argparse
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app() -> Starlette:
    from bench.baselines import common

    name = os.environ["BENCH_MODEL"]
    model = common.load_model(
        name, int(os.environ.get("BENCH_THREADS", "1")), os.environ.get("BENCH_DEVICE", "cpu")
    )

    async def predict(request: Request) -> Response:
        body = await request.body()
        try:
            x = common.decode(name, body)
        except common.BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        (result,) = common.run_batch(model, name, [x])  # inline: blocks the loop, by design
        return Response(common.response(result, 1), media_type="application/json")

    async def readiness(request: Request) -> Response:
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/readiness", readiness),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="identity")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    # uvicorn's worker processes are spawned: they read the settings from the environment.
    os.environ.update(
        BENCH_MODEL=args.model, BENCH_THREADS=str(args.threads), BENCH_DEVICE=args.device
    )
    import uvicorn

    uvicorn.run(
        "bench.baselines.inline_uvicorn:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.procs if args.procs > 1 else None,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
