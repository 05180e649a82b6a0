"""(c) The hand-written batcher many teams start with: FastAPI, one ``asyncio.Queue``, a
background task that takes up to 32 requests or waits up to 100 ms for them, and the
model in a worker thread (``run_in_executor``) so the event loop keeps accepting.

    python -m bench.baselines.fastapi_batcher --port P --model identity|resnet50 \
        [--threads T] [--max-batch 32] [--wait-ms 100] [--device cpu|cuda]

One process. Decoding (JSON or JPEG) happens with the batch in the model thread, as
ringserve decodes in its worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def create_app() -> FastAPI:
    from bench.baselines import common

    name = os.environ["BENCH_MODEL"]
    max_batch = int(os.environ.get("BENCH_MAX_BATCH", "32"))
    wait_s = float(os.environ.get("BENCH_WAIT_MS", "100")) / 1000
    model = common.load_model(
        name, int(os.environ.get("BENCH_THREADS", "1")), os.environ.get("BENCH_DEVICE", "cpu")
    )
    executor = ThreadPoolExecutor(1, thread_name_prefix="model")
    queue: asyncio.Queue[tuple[bytes, asyncio.Future]] = asyncio.Queue()

    def infer(bodies: list[bytes]) -> list[object]:
        """In the model thread: decode each body, run the good ones as one batch."""
        inputs, results = [], []
        for body in bodies:
            try:
                inputs.append(common.decode(name, body))
                results.append(None)
            except common.BadRequest as e:
                results.append(e)
        outputs = iter(common.run_batch(model, name, inputs) if inputs else [])
        return [r if r is not None else next(outputs) for r in results]

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + wait_s
            while len(batch) < max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                outputs = await loop.run_in_executor(executor, infer, [b for b, _ in batch])
            except Exception as e:
                outputs = [e] * len(batch)
            for (_, fut), out in zip(batch, outputs, strict=True):
                if not fut.done():
                    fut.set_result((out, len(batch)))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher())
        yield
        task.cancel()
        executor.shutdown(wait=False)

    app = FastAPI(lifespan=lifespan)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        fut = asyncio.get_running_loop().create_future()
        await queue.put((await request.body(), fut))
        out, size = await fut
        if isinstance(out, Exception):
            return JSONResponse({"error": str(out)}, status_code=400)
        return Response(common.response(out, size), media_type="application/json")

    @app.get("/readiness")
    async def readiness() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="identity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=100)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.update(
        BENCH_MODEL=args.model,
        BENCH_THREADS=str(args.threads),
        BENCH_DEVICE=args.device,
        BENCH_MAX_BATCH=str(args.max_batch),
        BENCH_WAIT_MS=str(args.wait_ms),
    )
    import uvicorn

    uvicorn.run(
        "bench.baselines.fastapi_batcher:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
