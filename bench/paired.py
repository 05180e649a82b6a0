"""Judge a change: this checkout against an older commit, both serving at once, in paired
alternation. On a shared VM the host moves by more than most changes (resnet50's raw
loop read 25-31 img/s in one evening), so back-to-back runs of each mislead; short
slices taken in turns, compared pair by pair, do not.

Starts ``ringserve serve`` twice (``--base`` exported with ``git archive`` into a
temporary directory, and this checkout), the same model and settings, then runs wrk
against each in turn (order flipped every round) and prints per concurrency each
side's median, the paired median ratio new / base, and the v2 statistics per request.

    python -m bench.paired --base 72fe718 --model resnet50 --concurrency 8,32 \\
        [--rounds 6] [--seconds 12] [--image photo.jpg] [--set batching.preferred_batch_size=8]

``--model digits`` serves the default model with ``--image`` (by default a 640x480
JPEG made here): a model whose forward is trivial, so decoding is the work, as with a
fast model on a GPU host.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import run as bench_run
from bench.batch_mix import stats

PACKAGES = ("frontend", "gpu_worker", "ipc", "supervisor")
PATHS = {"resnet50": "/v1/models/r50/predict", "digits": "/v1/models/digits/predict"}


def export(rev: str, into: Path) -> Path:
    """``rev`` of this repository as an importable ``ringserve`` package; returns the
    directory to put first on PYTHONPATH."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(bench_run.REPO), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = into / "path" / "ringserve"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(tree / name)
    (package / "__init__.py").symlink_to(tree / "ringserve_pkg" / "__init__.py")
    return into / "path"


def photo(path: Path) -> Path:
    """A 640x480 JPEG with some texture (a camera's frame, not a thumbnail)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.normal(0, 20, (480, 640, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def command(model: str, port: int, args: argparse.Namespace, tmp: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ringserve.supervisor.cli", "serve", "--port", str(port)]
    cmd += ["--instance", f"paired{port}", "--admin-socket", str(tmp / f"admin-{port}.sock")]
    cmd += ["--frontends", "2", "--threads", str(args.threads)]
    if model == "resnet50":  # as bench.run starts it
        cmd += ["--model", "r50=torchvision:resnet50", "--max-batch-size", "8"]
        cmd += ["--max-queue-delay-ms", str(bench_run.RESNET_QUEUE_DELAY_MS)]
    for s in args.set:
        cmd += ["--set", s]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--model", default="resnet50", choices=list(PATHS))
    ap.add_argument("--concurrency", default="8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, help="request body (digits); JPEG")
    ap.add_argument("--set", action="append", default=[], help="passed to ringserve serve")
    args = ap.parse_args(argv)
    wrk = bench_run.ensure_wrk() or "wrk"
    name = PATHS[args.model].split("/")[3]
    with tempfile.TemporaryDirectory(prefix="ringserve-paired-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.model == "resnet50":
            body = bench_run.make_inputs(tmp)["jpeg"]
        else:
            body = args.image or photo(tmp / "photo.jpg")
        sides = {"base": str(export(args.base, tmp / "base")), "new": bench_run._pythonpath()}
        servers: dict[str, tuple[str, int, int]] = {}
        with contextlib.ExitStack() as stack:
            for side, pythonpath in sides.items():
                port = bench_run.free_port()
                env = {"PYTHONPATH": pythonpath, "XDG_CACHE_HOME": str(tmp / f"cache-{side}")}
                launch = bench_run.Launch(
                    command(args.model, port, args, tmp), PATHS[args.model], "", "", env
                )
                log = tmp / f"server-{side}.log"
                pid = stack.enter_context(bench_run.running(launch, port, log, 300))
                servers[side] = (f"http://127.0.0.1:{port}{PATHS[args.model]}", pid, port)
                bench_run.run_wrk(wrk, servers[side][0], 8, 2, body, "image/jpeg")  # warm-up
            concs = [int(c) for c in args.concurrency.split(",") if c]
            results = {(s, c): [] for s in sides for c in concs}
            per_request = {(s, c): [] for s in sides for c in concs}
            for r in range(args.rounds):
                for conc in concs:
                    for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                        url, pid, port = servers[side]
                        bench_run.settle(bench_run.tree(pid))
                        before = stats(port, name)[1]
                        w = bench_run.run_wrk(wrk, url, conc, args.seconds, body, "image/jpeg")
                        bench_run.settle(bench_run.tree(pid))
                        after = stats(port, name)[1]
                        results[(side, conc)].append(w["p50_ms"] if conc == 1 else w["throughput"])
                        per_request[(side, conc)].append(
                            {
                                k: (after[k][1] - before[k][1]) / (after[k][0] - before[k][0]) / 1e6
                                for k in ("queue", "compute_input", "compute_infer")
                                if after[k][0] > before[k][0]
                            }
                        )
        for conc in concs:
            unit = "p50 ms" if conc == 1 else "req/s"
            for side in sides:
                v, ms = results[(side, conc)], per_request[(side, conc)]
                stages = ", ".join(
                    f"{k} {statistics.median(m.get(k, 0.0) for m in ms):.2f}"
                    for k in ("queue", "compute_input", "compute_infer")
                )
                print(
                    f"c={conc} {side:4s}: median {statistics.median(v):8.2f} {unit}  "
                    f"({', '.join(f'{x:.1f}' for x in v)}); ms per request: {stages}"
                )
            pairs = zip(results[("new", conc)], results[("base", conc)], strict=True)
            ratios = [n / b for n, b in pairs]
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(
                f"c={conc} new / base, paired: median {statistics.median(ratios):.3f}, "
                f"geometric mean {geo:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
