"""Which batches ringserve runs under a closed-loop load, and where a request's time goes:
for tuning ``max_queue_delay_ms`` and the worker count, not a benchmark of record.

Starts ringserve as ``bench.run`` does (resnet50: one worker on every thread, or
``--shared``), drives it with wrk at each concurrency, and prints per point the
throughput, p50, the batch sizes run (KServe v2 ``batch_stats``) and the mean time per
request in each stage (``inference_stats``: queue, compute_input = preprocess,
compute_infer = the model, compute_output).

    python -m bench.batch_mix --model resnet50 --concurrency 1,8 \\
        [--set batching.max_queue_delay_ms=10] [--shared] [--seconds 12] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import urllib.request
from pathlib import Path

from bench import run as bench_run


def stats(port: int, name: str) -> tuple[dict[int, int], dict[str, tuple[int, int]]]:
    """(executions by batch size, {stage: (count, ns)}) as the server counts them."""
    url = f"http://127.0.0.1:{port}/v2/models/{name}/stats"
    with urllib.request.urlopen(url, timeout=10) as r:
        model = json.load(r)["model_stats"][0]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in model["batch_stats"]}
    stages = {k: (v["count"], v["ns"]) for k, v in model["inference_stats"].items()}
    return sizes, stages


def stage_ms(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict:
    """Mean ms per request in each stage between two ``stats`` readings (stages with
    requests in between only)."""
    return {
        k: (ns - before[k][1]) / (n - before[k][0]) / 1e6
        for k, (n, ns) in after.items()
        if n > before[k][0] and k.startswith(("queue", "compute_"))
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", choices=list(bench_run.MODEL_NAMES))
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", action="store_true", help="a worker per thread, sharing them")
    ap.add_argument("--set", action="append", default=[], help="passed to ringserve serve")
    args = ap.parse_args(argv)
    wrk = bench_run.ensure_wrk() or "wrk"
    run_args = bench_run.parse_args(["--threads", str(args.threads)])
    name = bench_run.MODEL_NAMES[args.model]
    with tempfile.TemporaryDirectory(prefix="ringserve-batch-mix-") as tmp_dir:
        tmp = Path(tmp_dir)
        inputs = bench_run.make_inputs(tmp)
        port = bench_run.free_port()
        launch = bench_run.launch_ringserve("wrk", shared=args.shared)(
            args.model, port, run_args, tmp
        )
        for s in args.set:
            launch.cmd += ["--set", s]
        body, ctype = inputs[launch.body], launch.content_type
        with bench_run.running(launch, port, tmp / "server.log", 300) as pid:
            url = f"http://127.0.0.1:{port}{launch.path}"
            bench_run.run_wrk(wrk, url, 2, 2, body, ctype)  # warm-up
            bench_run.settle(bench_run.tree(pid))
            for conc in [int(c) for c in args.concurrency.split(",") if c]:
                for rep in range(args.reps):
                    sizes0, stages0 = stats(port, name)
                    r = bench_run.run_wrk(wrk, url, conc, args.seconds, body, ctype)
                    bench_run.settle(bench_run.tree(pid))  # what was in flight finishes
                    sizes1, stages1 = stats(port, name)
                    ran = {k: n - sizes0.get(k, 0) for k, n in sorted(sizes1.items())}
                    ms = stage_ms(stages0, stages1)
                    print(
                        f"c={conc} rep {rep}: {r['throughput']:.1f}/s p50 {r['p50_ms']:.2f} ms; "
                        f"batches {{{', '.join(f'{k}: {n}' for k, n in ran.items() if n)}}}; "
                        "ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
