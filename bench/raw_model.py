"""(a) The raw model limit: the model alone in a tight in-process loop at each batch size
(no HTTP, no decoding, no IPC). ``--with-decode`` also times the per-image JPEG decode and
resize that a server does before the model (reported separately).

    python -m bench.raw_model --model resnet50 --batch-sizes 1,2,4,8,16,32 --duration 3 \
        [--threads 2] [--device cpu|cuda] [--image bench/results/input.jpg] [--json OUT]

``--compile`` runs the model as ringserve's ``compile = true`` does (inductor, frozen
weights, a graph per batch size, compiled before it is timed).

``--serve`` keeps the model loaded and runs the loop for as many seconds, at the batch
size, as each line on stdin says, answering each with one JSON line (``bench.run`` takes
turns with it around a server's resnet50 points).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines import common
from ringserve.ipc import heap


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))  # (alone: the current device, cuda:0)


# How many batch sizes a compiled loop may compile before dynamo stops recompiling: the
# benchmark asks for at most 1, 2, 4, 8, 16 and 32, one graph each (``serve`` compiles
# the sizes it is asked for, as they come).
COMPILED_SIZES_LIMIT = 8


def load(model_name: str, threads: int, device: str, compiled: bool) -> torch.nn.Module:
    model = common.load_model(model_name, threads, device)
    if not compiled:
        return model
    from ringserve.gpu_worker.compiled import compile_module

    return compile_module(model, COMPILED_SIZES_LIMIT)


def measure(
    model_name: str,
    batch_sizes: list[int],
    duration_s: float,
    threads: int,
    device: str,
    compiled: bool = False,
) -> list[dict]:
    model = load(model_name, threads, device, compiled)
    rows = []
    for bs in batch_sizes:
        x = _input(model_name, bs, device)
        with torch.inference_mode():
            for _ in range(2):  # warm-up (allocator, kernels)
                model(x)
            _sync(device)
        t = np.array(_loop(model, model_name, x, duration_s, device))
        rows.append(
            {
                "batch_size": bs,
                "iterations": len(t),
                "items_per_s": bs * len(t) / t.sum(),
                "p50_ms": float(np.percentile(t, 50) * 1000),
                "p99_ms": float(np.percentile(t, 99) * 1000),
            }
        )
    return rows


def _input(model_name: str, batch: int, device: str) -> torch.Tensor:
    shape = (16,) if model_name == "identity" else (3, common.CROP, common.CROP)
    x = torch.randn(batch, *shape, device=device)
    return x.contiguous(memory_format=common.memory_format(model_name, device))


def _loop(
    model: torch.nn.Module, model_name: str, x: torch.Tensor, duration_s: float, device: str
) -> list[float]:
    """Seconds per forward, back to back, for ``duration_s`` (at least 3 forwards)."""
    times: list[float] = []
    with torch.inference_mode():
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            out = model(x)
            if model_name != "identity":
                out = out.softmax(dim=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def serve(model_name: str, threads: int, device: str, compiled: bool = False) -> None:
    """The loop on request: each stdin line is "SECONDS [BATCH]" (batch 1 by default);
    each answer is one JSON line with the p50 in ms and the items/s. Idle (blocked on
    stdin) between requests."""
    model = load(model_name, threads, device, compiled)
    inputs = {1: _input(model_name, 1, device)}
    _loop(model, model_name, inputs[1], 0.0, device)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        seconds, *rest = line.split()
        batch = int(rest[0]) if rest else 1
        if batch not in inputs:
            inputs[batch] = _input(model_name, batch, device)
            _loop(model, model_name, inputs[batch], 0.0, device)  # warm-up at this size
        t = np.array(_loop(model, model_name, inputs[batch], float(seconds), device))
        answer = {
            "batch_size": batch,
            "p50_ms": float(np.percentile(t, 50) * 1000),
            "items_per_s": batch * len(t) / float(t.sum()),
            "n": len(t),
        }
        print(json.dumps(answer), flush=True)


def decode_ms(image: str, n: int = 20) -> float:
    body = Path(image).read_bytes()
    common.decode_image(body)
    t0 = time.perf_counter()
    for _ in range(n):
        common.decode_image(body)
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="identity")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", help="JPEG to time the decode of (resnet50)")
    ap.add_argument("--json")
    ap.add_argument("--serve", action="store_true", help="batch 1 on request (stdin)")
    ap.add_argument("--compile", action="store_true", help="as ringserve's compile = true")
    args = ap.parse_args()
    # On the heap of ringserve's workers: with glibc's moving thresholds the loop paid
    # page faults at batch 8 that the server does not (ipc/heap.py), and the ratios
    # judged against it would count the allocator as serving speed.
    heap.set_thresholds(heap.WORKER)
    if args.serve:
        serve(args.model, args.threads, args.device, args.compile)
        return
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    result = {
        "model": args.model,
        "threads": args.threads,
        "device": args.device,
        "compiled": args.compile,
        "rows": measure(args.model, sizes, args.duration, args.threads, args.device, args.compile),
    }
    if args.image and args.model != "identity":
        result["decode_ms"] = decode_ms(args.image)
    for r in result["rows"]:
        print(
            f"batch {r['batch_size']:3d}: {r['items_per_s']:12,.1f} items/s  "
            f"p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms"
        )
    if "decode_ms" in result:
        print(f"decode+resize one JPEG: {result['decode_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
