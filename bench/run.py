"""One command for the whole benchmark: ``python -m bench.run`` from the repository root.

Systems, each started on a free 127.0.0.1 port and driven by a C load generator (Debian's
``wrk`` with ``bench/post.lua``; Triton's ``perf_analyzer`` for ringserve's KServe v2
endpoint when ``.venv-perf/bin/pa`` is there):

  (a) raw       the model alone in a tight in-process loop at each batch size
  (b) inline-1  one uvicorn process running the model inline (no batching, no IPC)
      inline-N  the same with as many processes as ringserve has frontends
  (c) fastapi   hand-written FastAPI + asyncio.Queue batcher (batch 32, wait 100 ms)
  (d) litserve  LitServe, batch 32, timeout 5 ms, 2 API processes (own venv)
  (e) ringserve ``ringserve serve`` (and ringserve-v2 / ringserve-grpc: the same through
      perf_analyzer, over HTTP / gRPC)
  (f) mlserver  MLServer, adaptive batching 32 / 100 ms, identity only (own venv)

Every repetition starts each system afresh, in a rotated order (systems interleaved per
repetition), measures its idle CPU, then runs each concurrency point; the report takes
the median over repetitions. Results: bench/results/results.json, results.md and
latency_throughput.png. ``--quick`` is the CI smoke: one short point per system.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
LITSERVE_VENV = BENCH / ".venv-litserve"
MLSERVER_VENV = BENCH / ".venv-mlserver"
PERF_ANALYZER = REPO / ".venv-perf" / "bin" / "pa"
POST_LUA = BENCH / "post.lua"

T = TypeVar("T")
MODEL_NAMES = {"identity": "id", "resnet50": "r50"}
# Per model unless --duration / --concurrency say otherwise: seconds per point and the
# concurrencies swept. resnet50 serves ~9 img/s on 2 cores, so its points run longer
# (a 5 s point completes ~45 requests) and skip c=64 (no target; minutes of queueing).
POINT_S = {"identity": 5.0, "resnet50": 8.0}
CONCURRENCY = {"identity": [1, 8, 32, 64], "resnet50": [1, 8, 32]}
# The raw loop's batch sizes. resnet50 up to 32, as the table has it and as
# ringserve's default max_batch_size allows: on a CPU the largest batch is not always
# the fastest (the stock model ran batch 32 35 % slower than batch 4), but
# folded and NHWC it is (2026-12-06 on the EPYC VM: 8 / 16 / 32 at 22.4 / 23.4 / 24.0
# img/s), and a loop that stopped at 8 judged the servers against less than the model's
# best.
RAW_SIZES = {"identity": (1, 8, 32), "resnet50": (1, 2, 4, 8, 16, 32)}
# Seconds a resnet50 point runs before its counting window opens: a cold start of 32
# clients settles into full batches within two (from cold, ringserve ran 14 and 18, then
# 32 each time; a batch of 32 takes 1.3 s on 2 cores).
WINDOW_WARMUP_S = 3.0
RESNET_QUEUE_DELAY_MS = 10
# ringserve's configurations whose resnet50 points are timed against the raw model and
# judged on the targets (``systems``).
RESNET_JUDGED = ("ringserve", "ringserve-shared")
_SHARED = "a worker per thread, sharing them"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- set-up ------------------------------------------------------------------------------


def ensure_bench_deps(install: bool) -> list[str]:
    """fastapi and matplotlib are bench-only: install them here if missing."""
    missing = [m for m in ("fastapi", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing and install:
        log(f"installing bench dependencies into {sys.prefix}: {missing}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")],
            check=False,
            timeout=600,
        )
        importlib.invalidate_caches()
        missing = [m for m in missing if importlib.util.find_spec(m) is None]
    return missing


def ensure_wrk() -> str | None:
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    log("wrk missing: apt-get install wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
        check=False,
        env=env,
        timeout=300,
    )
    return shutil.which("wrk")


@dataclass(frozen=True)
class SideEnv:
    """A peer server's own environment: it pins its own FastAPI, uvicorn and uvloop,
    which must not meet ringserve's."""

    venv: Path
    requirements: str  # under bench/
    imports: str  # what must import for the environment to count as built

    def python(self, build: bool) -> tuple[Path | None, str]:
        """The environment's python, built (or brought up to its requirements: pip
        installs nothing and asks no index when they are met) if asked; (None, why) when
        unavailable. Synced, not just found: an environment built before a pin changed
        imported fine and then failed (MLServer with uvloop 0.22 loads no model)."""
        py, name = self.venv / "bin" / "python", f"bench/{self.venv.name}"
        if not build:
            if self._works(py):
                return py, ""
            return None, f"{name} not built (run `python -m bench.run` without --quick)"
        how = "syncing" if py.exists() else "building (python3 -m venv)"
        log(f"{how} {self.venv}: pip install -r bench/{self.requirements}")
        try:
            if not py.exists():
                subprocess.run(["python3", "-m", "venv", str(self.venv)], check=True, timeout=300)
            out = subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "-r", str(BENCH / self.requirements)],
                capture_output=True,
                text=True,
                timeout=1800,
            )
        except (subprocess.SubprocessError, OSError) as e:
            return None, f"building {name} failed: {e}"
        if out.returncode != 0 or not self._works(py):
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"pip install -r bench/{self.requirements} failed: {tail[0]}"
        return py, ""

    def _works(self, py: Path) -> bool:
        check = [str(py), "-c", f"import {self.imports}"]
        return (
            py.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0
        )


LITSERVE = SideEnv(LITSERVE_VENV, "requirements-litserve.txt", "litserve, torch, torchvision")
MLSERVER = SideEnv(MLSERVER_VENV, "requirements-mlserver.txt", "mlserver")


def make_inputs(out: Path) -> dict[str, Path]:
    """The request bodies: identity JSON (ours, and as a KServe v2 request), a 224x224
    JPEG, and the JPEG as base64 JSON."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "identity": out / "identity.json",
        "identity_v2": out / "identity_v2.json",
        "jpeg": out / "input.jpg",
        "jpeg_b64": out / "input_b64.json",
    }
    rng = np.random.default_rng(0)
    data = [round(float(v), 4) for v in rng.standard_normal(16)]
    paths["identity"].write_text(json.dumps({"data": data}))
    v2 = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": data}]}
    paths["identity_v2"].write_text(json.dumps(v2))
    yy, xx = np.mgrid[0:224, 0:224]
    img = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float32)
    img += rng.normal(0, 20, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(paths["jpeg"], quality=90)
    b64 = base64.b64encode(paths["jpeg"].read_bytes()).decode()
    paths["jpeg_b64"].write_text(json.dumps({"image": b64}))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- systems -----------------------------------------------------------------------------


@dataclass
class Launch:
    cmd: list[str]
    path: str  # POST path
    body: str  # key into make_inputs' paths
    content_type: str
    env: dict[str, str] = field(default_factory=dict)
    driver: str = "wrk"  # or "pa" (perf_analyzer, KServe v2), "pa-grpc" (the same over gRPC)
    ready_path: str = "/readiness"
    grpc_port: int = 0  # pa-grpc: where ringserve serves gRPC


@dataclass
class System:
    key: str
    label: str
    role: str  # (b), (c), ... as in the issue
    launch: Callable[[str, int, argparse.Namespace, Path], Launch]
    skip: str = ""  # non-empty: why this system does not run
    models: tuple[str, ...] = tuple(MODEL_NAMES)  # the models it is run with


def body_for(model: str) -> tuple[str, str]:
    """The request body a model is sent (a key into ``make_inputs``) and its type."""
    return ("identity", "application/json") if model == "identity" else ("jpeg", "image/jpeg")


def _threads(model: str, args: argparse.Namespace, procs: int = 1) -> int:
    # Identity needs no intra-op threads; resnet50 gets --threads in all, split over procs.
    return 1 if model == "identity" else max(1, args.threads // procs)


def launch_inline(procs: int) -> Callable[[str, int, argparse.Namespace, Path], Launch]:
    def launch(model: str, port: int, args: argparse.Namespace, tmp: Path) -> Launch:
        body, ct = body_for(model)
        cmd = [sys.executable, "-m", "bench.baselines.inline_uvicorn", "--port", str(port)]
        cmd += ["--model", model, "--procs", str(procs), "--device", args.device]
        cmd += ["--threads", str(_threads(model, args, procs))]
        return Launch(cmd, "/predict", body, ct)

    return launch


def launch_fastapi(model: str, port: int, args: argparse.Namespace, tmp: Path) -> Launch:
    body, ct = body_for(model)
    cmd = [sys.executable, "-m", "bench.baselines.fastapi_batcher", "--port", str(port)]
    cmd += ["--model", model, "--threads", str(_threads(model, args)), "--device", args.device]
    cmd += ["--max-batch", "32", "--wait-ms", "100"]
    return Launch(cmd, "/predict", body, ct)


def launch_litserve(py: Path) -> Callable[[str, int, argparse.Namespace, Path], Launch]:
    def launch(model: str, port: int, args: argparse.Namespace, tmp: Path) -> Launch:
        cmd = [str(py), "-m", "bench.baselines.litserve_app", "--port", str(port)]
        cmd += ["--model", model, "--threads", str(_threads(model, args)), "--device", args.device]
        cmd += ["--max-batch", "32", "--batch-timeout-ms", "5", "--api-servers", "2"]
        if model == "identity":
            return Launch(cmd, "/predict", "identity", "application/json")
        return Launch(cmd, "/predict", "jpeg_b64", "application/json")

    return launch


def launch_mlserver(py: Path) -> Callable[[str, int, argparse.Namespace, Path], Launch]:
    def launch(model: str, port: int, args: argparse.Namespace, tmp: Path) -> Launch:
        name = MODEL_NAMES[model]
        cmd = [str(py), "-m", "bench.baselines.mlserver_app", "--port", str(port)]
        cmd += ["--dir", str(tmp / f"mlserver-{port}"), "--name", name]
        cmd += ["--max-batch", "32", "--max-batch-time-ms", "100"]
        path = f"/v2/models/{name}/infer"
        # The model's readiness, not the server's: a server whose model failed to load
        # reports itself ready and answers 404 to every request.
        ready = f"/v2/models/{name}/ready"
        return Launch(cmd, path, "identity_v2", "application/json", ready_path=ready)

    return launch


def ringserve_command(port: int, args: argparse.Namespace, tmp: Path) -> list[str]:
    """``ringserve serve`` on ``port`` with the benchmark's frontends and device, before
    any model: its own instance name and admin socket under ``tmp``."""
    cmd = [sys.executable, "-m", "ringserve.supervisor.cli", "serve", "--port", str(port)]
    cmd += ["--instance", f"bench{port}", "--admin-socket", str(tmp / f"admin-{port}.sock")]
    return [*cmd, "--frontends", str(args.frontends), "--device", args.device]


def ringserve_env(port: int, tmp: Path) -> dict[str, str]:
    """A batch-profile cache of this start's own, so each repetition profiles afresh.

    With one cache for the run, the first repetition's profile decided every later one:
    on 2026-12-07 it read resnet50's batch 32 at 21.3 rows/s against 22.9 for 16 (the raw
    loop a minute earlier: 24.6 and 23.9), all three repetitions served c=32 in batches of
    16, and one noisy measurement counted three times. Compiled kernels stay shared:
    they are not a measurement, and compiling again would only lengthen the run."""
    shared = tmp / "cache" / "ringserve"
    return {
        "XDG_CACHE_HOME": str(tmp / f"cache-{port}"),
        "TORCHINDUCTOR_CACHE_DIR": str(shared / "inductor"),
        "TRITON_CACHE_DIR": str(shared / "triton"),
    }


_PROFILE_CHOICE = re.compile(r"batch profile \(rows/s by size\): .* -> preferred (\d+)")


def profile_choice(log_text: str) -> int | None:
    """The batch size ringserve's profile chose, from its log (the first model's)."""
    found = _PROFILE_CHOICE.search(log_text)
    return int(found.group(1)) if found else None


def launch_ringserve(
    driver: str, shared: bool = False
) -> Callable[[str, int, argparse.Namespace, Path], Launch]:
    """ringserve as a user would start it: resnet50 with one worker on every thread, or
    (``shared``, on a CPU) one worker per thread, sharing them."""

    def launch(model: str, port: int, args: argparse.Namespace, tmp: Path) -> Launch:
        name = MODEL_NAMES[model]
        cmd = ringserve_command(port, args, tmp)
        if model == "identity":
            cmd += ["--model", f"{name}=identity"]
        else:
            cmd += ["--model", f"{name}=torchvision:resnet50", "--threads", str(args.threads)]
            # max_batch_size stays at its default (32): the profile picks the size.
            if args.compile:
                cmd += ["--compile"]
            if args.device == "cpu":
                # A batch of 8 takes ~270 ms on a 2-core CPU: a 10 ms wait for company
                # (4 %) covers the clients' turnaround (each JPEG is decoded first,
                # ~1.2 ms), which the 2 ms default does not (docs/benchmarks.md).
                cmd += ["--max-queue-delay-ms", str(RESNET_QUEUE_DELAY_MS)]
            if shared:
                # One worker per thread, sharing the --threads budget: all of it for a
                # lone request, one each under load (gpu_worker/cpu_share.py).
                cmd += ["--workers", str(args.threads), "--share-threads"]
        body, ct = body_for(model)
        grpc_port = free_port() if driver == "pa-grpc" else 0
        if grpc_port:
            cmd += ["--grpc-port", str(grpc_port)]
        path = f"/v1/models/{name}/predict"
        return Launch(cmd, path, body, ct, ringserve_env(port, tmp), driver, grpc_port=grpc_port)

    return launch


def _peer(
    key: str,
    label: str,
    role: str,
    launcher: Callable[[Path], Callable[[str, int, argparse.Namespace, Path], Launch]],
    py: Path | None,
    why_not: str,
    models: tuple[str, ...] = tuple(MODEL_NAMES),
) -> System:
    """A peer that runs in an environment of its own (``SideEnv``): without its python, a
    skipped row that says why."""
    launch = launcher(py) if py else launch_fastapi  # (never started: skipped)
    return System(key, label, role, launch, skip="" if py else why_not, models=models)


def systems(
    args: argparse.Namespace,
    lit_py: Path | None,
    lit_skip: str,
    ml_py: Path | None,
    ml_skip: str,
) -> list[System]:
    n = args.frontends
    out = [
        System("inline-1", "(b) uvicorn inline, 1 proc", "b", launch_inline(1)),
        System(f"inline-{n}", f"(b) uvicorn inline, {n} procs", "b", launch_inline(n)),
        System("fastapi", "(c) FastAPI asyncio.Queue batcher", "c", launch_fastapi),
        _peer(
            "litserve",
            "(d) LitServe batch 32/5 ms, 2 API procs",
            "d",
            launch_litserve,
            lit_py,
            lit_skip,
        ),
        System("ringserve", f"(e) ringserve, {n} frontends", "e", launch_ringserve("wrk")),
        # MLServer serves identity only, as in the table.
        _peer(
            "mlserver",
            "(f) MLServer, adaptive batch 32/100 ms",
            "f",
            launch_mlserver,
            ml_py,
            ml_skip,
            ("identity",),
        ),
    ]
    if args.device == "cpu" and args.threads > 1 and not args.compile:
        # (A compiled model cannot share threads: its count is fixed when it compiles.)
        # The other way to spend a CPU's threads on resnet50, judged beside it: one
        # worker per thread (faster on the EPYC host before the batcher kept batches full
        # at c=8, slower on the Xeon: docs/benchmarks.md).
        out.append(
            System(
                "ringserve-shared",
                f"(e) ringserve, {n} frontends, {args.threads} resnet50 workers sharing "
                f"{args.threads} threads",
                "e",
                launch_ringserve("wrk", shared=True),
                models=("resnet50",),
            )
        )
    if PERF_ANALYZER.exists():
        out.append(
            # perf_analyzer sends tensors, not JPEGs: identity only.
            System(
                "ringserve-v2",
                "(e) ringserve v2 via perf_analyzer",
                "e",
                launch_ringserve("pa"),
                models=("identity",),
            )
        )
        out.append(
            System(
                "ringserve-grpc",
                "(e) ringserve v2 over gRPC via perf_analyzer",
                "e",
                launch_ringserve("pa-grpc"),
                models=("identity",),
            )
        )
    if args.systems:
        wanted = set(args.systems.split(","))
        out = [s for s in out if s.key in wanted or s.role in wanted]
    return out


# -- process handling and sampling ----------------------------------------------------------


@contextlib.contextmanager
def running(launch: Launch, port: int, log_path: Path, timeout_s: float) -> Iterator[int]:
    """Start a server in its own session, wait until it is ready, stop it (group) afterwards."""
    env = {**os.environ, "PYTHONPATH": _pythonpath(), **launch.env}
    env.pop("NOTIFY_SOCKET", None)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            launch.cmd,
            cwd=REPO,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_ready(proc, port, timeout_s, log_path, launch.ready_path)
        yield proc.pid
    finally:
        stop(proc)


def wait_ready(
    proc: subprocess.Popen, port: int, timeout_s: float, log_path: Path, path: str = "/readiness"
) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited {proc.returncode} before ready:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200 and all_workers_ready(port):
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {timeout_s} s (log: {log_path})")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def all_workers_ready(port: int) -> bool:
    """ringserve is ready with one worker per model; the benchmark waits for all of them
    (a worker still profiling its batch sizes would be measured as idle CPU and would
    slow the first point). Servers without ``/v1/models`` count as ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            models = json.loads(r.read()).get("models", [])
    except urllib.error.HTTPError:
        return True  # a baseline: no such route
    except (ValueError, AttributeError):
        return True
    return all(m.get("workers_ready", 0) >= m.get("workers", 0) for m in models)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # Anything left in the server's own process group (its children) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def host_cpu_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks over all CPUs since boot, from /proc/stat.

    Steal is time a vCPU was runnable but the hypervisor ran someone else: on a shared
    VM it is the one number that says a slow point was the host's doing, not ours."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return ticks[7], sum(ticks)  # user nice system idle iowait irq softirq steal
    return 0, 0


HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def guest_halt_poll() -> str:
    """How an idle vCPU of a virtual machine waits: "off" when it halts at once (each
    wake-up then goes through the hypervisor, which more than doubles the ipc round trip
    here; docs/deployment.md), else for how long it polls first; "" on bare metal."""
    try:
        ns = int(HALT_POLL.read_text())
    except (OSError, ValueError):
        return ""
    return "guest halt polling off" if ns == 0 else f"guest halt polling {ns / 1000:g} µs"


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100 * (after[0] - before[0]) / total if total > 0 else 0.0


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """CPU seconds used so far by ``procs`` (every thread, also those that exited), to
    the nanosecond: each process's CPU-time clock (``clock_getcpuclockid``), where
    ``/proc/PID/stat`` counts 10 ms clock ticks. An idle server uses a few ms a second:
    over the quick run's 0.5 s idle window, one tick read 2.00 % against the target's
    "< 2 %"."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError):  # EINVAL once the process is gone
            total += time.clock_gettime(_cpu_clock(p.pid))
    return total


def tree_cpu(pid: int) -> dict[tuple[int, float], float]:
    """The CPU seconds of each process in ``pid``'s tree now, by (pid, start time)."""
    out: dict[tuple[int, float], float] = {}
    for p in tree(pid):
        with contextlib.suppress(psutil.Error, OSError):  # gone since the listing
            out[(p.pid, p.create_time())] = time.clock_gettime(_cpu_clock(p.pid))
    return out


def cpu_since(pid: int, before: dict[tuple[int, float], float]) -> float:
    """CPU seconds ``pid``'s tree used since ``before`` (``tree_cpu``), the tree read
    again now: a process started since then counts all its CPU, one gone since counts
    none. (Reading the tree of the start at both ends missed the processes started in
    between, and a process that exited in between took its whole life's CPU off the
    window's, which could read below zero.)"""
    return sum(c - before.get(key, 0.0) for key, c in tree_cpu(pid).items())


def _cpu_clock(pid: int) -> int:
    """The clock id of ``pid``'s process-wide CPU time: Linux's encoding, which glibc's
    ``clock_getcpuclockid`` returns (``CPUCLOCK_SCHED``, not per thread)."""
    return ((~pid) << 3) | 2


def memory(procs: list[psutil.Process]) -> tuple[float, float]:
    """(sum of PSS over the tree, largest PSS of a ringserve frontend) in MB."""
    pss = frontend = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            mb = p.memory_full_info().pss / 2**20
            pss += mb
            if "ringserve.frontend" in " ".join(p.cmdline()):
                frontend = max(frontend, mb)
    return pss, frontend


# -- load generators -------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    conc: int,
    duration_s: float,
    body: Path,
    content_type: str,
    warmup_s: float = 0.0,
) -> dict:
    """One wrk run. With ``warmup_s``, throughput is counted in a window of ``duration_s``
    that starts ``warmup_s`` into the run, and the run goes on a second past it
    (bench/post.lua says why); latencies, errors and CPU cover the whole run."""
    threads = 1 if conc == 1 else 2
    run_s = max(1, round(duration_s))
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_CONTENT_TYPE": content_type}
    if warmup_s > 0:
        run_s = math.ceil(warmup_s + duration_s) + 1
        window_from = time.monotonic() + warmup_s
        env["BENCH_WINDOW_FROM"] = repr(window_from)
        env["BENCH_WINDOW_TO"] = repr(window_from + duration_s)
    cmd = [wrk, f"-t{threads}", f"-c{conc}", f"-d{run_s}s", "--latency"]
    cmd += ["--timeout", "30s", "-s", str(POST_LUA), url]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=run_s + 60)
    m = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result (rc {out.returncode}): {out.stdout}{out.stderr}")
    r = json.loads(m.group(1))
    errors = sum(r[k] for k in r if k.startswith("errors_"))
    secs = r["duration_us"] / 1e6
    # wrk's request count is of the answers it got, non-2xx among them (``errors_status``).
    # A socket error (connect, read, write) is no answer and not in that count, and a
    # timeout is counted for a request still waiting (each time wrk's timer finds it so),
    # its answer, if one comes, in the count: subtracting those too counted fewer answers
    # than came (a server that drops one connection in two read at half its rate).
    ok = max(0, r["requests"] - r["errors_status"])
    whole_run = ok / secs
    throughput, window = whole_run, {}
    if warmup_s > 0:
        times = r["window_times"]
        throughput = completion_rate(times, duration_s)
        window = {
            # wrk's own count and the window's, beside the rate: for comparison.
            "throughput_whole_run": whole_run,
            "throughput_window_count": len(times) / duration_s,
            "window_answers": len(times),
            "window_errors": r["window_bad"],  # non-2xx in the window (all count in errors)
        }
    return {
        "requests": r["requests"],
        "errors": errors,
        "ok": ok,
        "throughput": throughput,
        **window,
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "seconds": secs,
    }


def completion_rate(times: list[float], window_s: float) -> float:
    """Answers per second: the least-squares slope of the answer count against time.

    A count over a fixed window moves by a whole batch with where the window's edges fall
    (a batch of 8 in an 8 s window at 23 img/s: 4.5 %); the slope through every answer's
    time does not, whether answers come one by one or eight at a time (each batch's
    answers sit around the line). Fewer than two distinct times: the count instead."""
    if len(set(times)) < 2:
        return len(times) / window_s
    ts = sorted(times)
    return statistics.linear_regression(ts, range(len(ts))).slope


def run_pa(
    port: int, model: str, conc: int, duration_s: float, tmp: Path, protocol: str = "http"
) -> dict:
    """perf_analyzer against /v2/models/{name}/infer (or its gRPC method), fixed windows,
    no stability hunt."""
    csv = tmp / f"pa-{port}-{conc}.csv"
    window_ms = max(300, int(duration_s * 1000 / 3))
    cmd = [str(PERF_ANALYZER), "-m", MODEL_NAMES[model], "-u", f"127.0.0.1:{port}", "-i", protocol]
    cmd += ["--concurrency-range", f"{conc}:{conc}", "--shape", "INPUT0:16"]
    cmd += ["--measurement-mode", "time_windows", "--measurement-interval", str(window_ms)]
    # 3 windows is the fewest perf_analyzer accepts as "stable"; 1000 % accepts any 3.
    cmd += ["--max-trials", "3", "--stability-percentage", "1000", "-f", str(csv)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s * 4 + 60)
    if out.returncode != 0 or not csv.exists():
        raise RuntimeError(f"perf_analyzer failed (rc {out.returncode}): {out.stdout[-2000:]}")
    header, row = csv.read_text().strip().splitlines()[:2]
    rec = dict(zip(header.split(","), row.split(","), strict=True))
    rate = float(rec["Inferences/Second"])
    # The requests perf_analyzer counted, from its report: its windows run longer than
    # asked (three of 666 ms measured 2.43 s), and the server's CPU is read around the
    # whole run, so the rate times the windows asked for (2.0 s) counted a fifth too few
    # requests and read the CPU per request a fifth high.
    counted = re.search(r"Client:\s*Request count: (\d+)", out.stdout)
    requests = int(counted.group(1)) if counted else int(rate * 3 * window_ms / 1000)
    return {
        "requests": requests,
        "errors": 0,  # perf_analyzer stops with a non-zero exit on a failed request
        "ok": requests,
        "throughput": rate,
        "p50_ms": float(rec["p50 latency"]) / 1000,
        "p90_ms": float(rec["p90 latency"]) / 1000,
        "p99_ms": float(rec["p99 latency"]) / 1000,
        "seconds": requests / rate if rate > 0 else 3 * window_ms / 1000,
    }


# -- one system, one repetition --------------------------------------------------------------


def bench_system(
    system: System,
    model: str,
    rep: int,
    args: argparse.Namespace,
    inputs: dict[str, Path],
    wrk: str,
    tmp: Path,
    logs: Path,
    raw_run: dict | None = None,
) -> list[dict]:
    """Every concurrency point of one system; ``raw_run``: the raw model's run of this
    repetition (its best batch size is what resnet50 throughput is judged against)."""
    seconds = point_seconds(model, args)
    port = free_port()
    launch = system.launch(model, port, args, tmp)
    url = f"http://127.0.0.1:{port}{launch.path}"
    log_path = logs / f"{system.key}-{model}-rep{rep}.log"
    rows: list[dict] = []
    # ringserve's resnet50 points are judged against the raw model timed in turns with
    # them: loaded once, idle (blocked on its stdin) while the server runs.
    judged = system.key in RESNET_JUDGED
    probe = RawProbe(model, args) if model != "identity" and judged else None
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if probe is not None:
            stack.callback(probe.close)
        pid = stack.enter_context(running(launch, port, log_path, args.ready_timeout))
        startup_s = time.monotonic() - t_start
        # (ready: the profile, where one ran, is in the log)
        chosen = profile_choice(log_path.read_text(errors="replace")) if judged else None
        time.sleep(args.settle)
        procs = tree(pid)
        c0, t0 = tree_cpu(pid), time.monotonic()
        time.sleep(args.idle_window)
        idle_pct = 100 * cpu_since(pid, c0) / (time.monotonic() - t0)
        pss_idle, fe_idle = memory(procs)
        # A separate warm-up run leaves its in-flight requests behind; with a slow model
        # (resnet50 on a CPU) they would eat into the measured run, so its runs warm up
        # inside the run and count a window after it (``run_wrk``). Identity answers in
        # microseconds, so its warm-up run leaves nothing behind, and its points keep
        # wrk's count (55,000 answers in 5 s: no batch to cut off).
        warmup_s = WINDOW_WARMUP_S if args.warmup > 0 and model != "identity" else 0.0
        for conc in args.concurrency or CONCURRENCY[model]:
            if args.warmup > 0 and launch.driver == "wrk" and model == "identity":
                run_wrk(wrk, url, conc, args.warmup, inputs[launch.body], launch.content_type)
            procs = tree(pid)
            # Throughput is judged against the raw best batch timed right before and right
            # after the point, not a run a minute earlier (the host drifts by more than 5%).
            best = around_batch(raw_run, conc) if probe else 0
            raw_around = [probe.run(RAW_AROUND_S, best)["items_per_s"]] if best else []
            c0, host0 = tree_cpu(pid), host_cpu_ticks()
            sliced: dict = {}
            body, ctype = inputs[launch.body], launch.content_type
            if probe is not None and conc == 1:
                # Judged against the raw batch-1 time: a 3 ms budget on a host whose speed
                # drifts by more than that within a minute, so the two take turns.
                r, cpu, sliced = run_c1_between_raw(probe, seconds, procs, wrk, url, body, ctype)
            else:
                if launch.driver == "pa":
                    r = run_pa(port, model, conc, seconds, tmp)
                elif launch.driver == "pa-grpc":
                    r = run_pa(launch.grpc_port, model, conc, seconds, tmp, "grpc")
                else:
                    r = run_wrk(wrk, url, conc, seconds, body, ctype, warmup_s)
                cpu = cpu_since(pid, c0)
            steal = steal_pct(host0, host_cpu_ticks())
            procs = tree(pid)  # (as it is now: PSS of the processes that served the point)
            pss, fe = memory(procs)
            if best:
                settle(procs)  # what was in flight when wrk stopped finishes first
                raw_around.append(probe.run(RAW_AROUND_S, best)["items_per_s"])
                sliced = {
                    "raw_best_batch": best,
                    "raw_around_items_per_s": raw_around,
                    "vs_raw_around": r["throughput"] / statistics.fmean(raw_around),
                }
            rows.append(
                {
                    "model": model,
                    "system": system.key,
                    "rep": rep,
                    "concurrency": conc,
                    **r,
                    "cpu_ms_per_req": 1000 * cpu / max(1, r["ok"]),
                    "cpu_cores": cpu / r["seconds"],
                    "pss_mb": pss,
                    "frontend_pss_mb": fe,
                    "idle_pss_mb": pss_idle,
                    "idle_frontend_pss_mb": fe_idle,
                    "idle_cpu_pct": idle_pct,
                    "processes": len(procs),
                    "startup_s": startup_s,
                    "loadavg_1m": os.getloadavg()[0],
                    "steal_pct": steal,
                    "preferred_batch": chosen,
                    **sliced,
                }
            )
            log(
                f"{model:8s} {system.key:13s} rep {rep} c={conc:<3d} "
                f"{r['throughput']:9.1f}/s p50 {r['p50_ms']:8.2f} ms p99 {r['p99_ms']:8.2f} ms "
                f"err {r['errors']} cpu {rows[-1]['cpu_ms_per_req']:.2f} ms/req pss {pss:.0f} MB "
                f"steal {steal:.1f} %"
            )
    return rows


def _repo_module(module: str, *argv: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that run ``python -m module argv`` from this checkout."""
    return [sys.executable, "-m", module, *argv], {**os.environ, "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    """This checkout first, then whatever PYTHONPATH already holds (packages installed
    beside the interpreter's, as ``.ci/gpu_check`` does on a GPU host)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _raw_model(model: str, args: argparse.Namespace, *argv: str) -> tuple[list[str], dict]:
    common = ["--model", model, "--threads", str(args.threads), "--device", args.device]
    if args.compile and model != "identity":
        common.append("--compile")
    return _repo_module("bench.raw_model", *common, *argv)


def bench_raw(model: str, args: argparse.Namespace, inputs: dict[str, Path], tmp: Path) -> dict:
    out = tmp / f"raw-{model}.json"
    sizes = ",".join(str(b) for b in RAW_SIZES[model])
    argv = ["--batch-sizes", sizes, "--duration", str(args.raw_duration), "--json", str(out)]
    if model != "identity":
        argv += ["--image", str(inputs["jpeg"])]
    cmd, env = _raw_model(model, args, *argv)
    subprocess.run(cmd, cwd=REPO, check=True, timeout=600, env=env)
    return json.loads(out.read_text())


C1_SLICES = 4


class RawProbe:
    """The raw batch-1 loop kept loaded in its own process (``raw_model --serve``), timed
    on request; it waits on its stdin in between, so the server under test runs alone."""

    def __init__(self, model: str, args: argparse.Namespace, ready_s: float = 120) -> None:
        cmd, env = _raw_model(model, args, "--serve")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            self._answer(ready_s)
        except BaseException:
            self.close()  # (the caller never got it to close: it stayed, with its model)
            raise

    def run(self, seconds: float, batch: int = 1) -> dict:
        """The loop at ``batch`` for ``seconds``: {"p50_ms", "items_per_s", ...}."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seconds} {batch}\n")
        self.proc.stdin.flush()
        return self._answer(seconds + 120)

    def _answer(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"raw probe gave no answer within {timeout_s:.0f} s")
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def run_c1_between_raw(
    probe: RawProbe,
    seconds: float,
    procs: list[psutil.Process],
    wrk: str,
    url: str,
    body: Path,
    content_type: str,
) -> tuple[dict, float, dict]:
    """c=1 in ``C1_SLICES`` slices of wrk, each between two slices of the raw batch-1 loop:
    (the wrk result over all slices, the server's CPU seconds during them, the slices).

    Each slice's p50 is compared with the mean of the raw p50s on either side of it, and
    the point's figure is the median of those differences. p50/p90/p99 of the point are
    medians over the slices.
    """
    slice_s = max(1.0, round(seconds / C1_SLICES))
    raw = [probe.run(slice_s)["p50_ms"]]
    parts, cpu = [], 0.0
    for _ in range(C1_SLICES):
        c0 = cpu_seconds(procs)
        parts.append(run_wrk(wrk, url, 1, slice_s, body, content_type))
        cpu += cpu_seconds(procs) - c0
        raw.append(probe.run(slice_s)["p50_ms"])
    diffs = [p["p50_ms"] - (a + b) / 2 for p, a, b in zip(parts, raw, raw[1:], strict=False)]
    total = {k: sum(p[k] for p in parts) for k in ("requests", "errors", "ok", "seconds")}
    merged = {
        **total,
        "throughput": total["ok"] / total["seconds"],
        **{k: statistics.median(p[k] for p in parts) for k in ("p50_ms", "p90_ms", "p99_ms")},
    }
    sliced = {
        "raw_b1_slices_ms": raw,
        "c1_slices_p50_ms": [p["p50_ms"] for p in parts],
        "c1_minus_raw_ms": statistics.median(diffs),
    }
    return merged, cpu, sliced


RAW_AROUND_S = 5.0  # the raw best-batch loop right before and right after a point
SETTLE_MAX_S = 20.0


def settle(procs: list[psutil.Process], max_s: float = SETTLE_MAX_S) -> None:
    """Wait until the process tree stops using CPU (under a tenth of a core over 0.25 s),
    at most ``max_s``."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        c0 = cpu_seconds(procs)
        time.sleep(0.25)
        if cpu_seconds(procs) - c0 < 0.025:
            return


def point_seconds(model: str, args: argparse.Namespace) -> float:
    return args.duration or POINT_S[model]


def bench_ipc(iterations: int, tmp: Path) -> list[dict]:
    out = tmp / "ipc.json"
    cmd, env = _repo_module(
        "bench.ipc_roundtrip", "--iterations", str(iterations), "--json", str(out)
    )
    subprocess.run(cmd, cwd=REPO, check=True, timeout=600, env=env)
    return json.loads(out.read_text())


# -- aggregation, targets, report ------------------------------------------------------------


def medians(rows: list[dict]) -> list[dict]:
    """Per (model, system, concurrency), the median of each numeric key over the
    repetitions that have it (``reps`` counts them all); errors are summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["system"], r["concurrency"]), []).append(r)
    out = []
    for (model, system, conc), rs in groups.items():
        agg = {"model": model, "system": system, "concurrency": conc, "reps": len(rs)}
        # Keys in the order first seen; a key some repetitions lack (a raw slice that
        # did not run) is the median of those that have it.
        for k in dict.fromkeys(k for r in rs for k in r):
            values = [r[k] for r in rs if isinstance(r.get(k), int | float)]
            if k not in agg and k != "rep" and values:
                agg[k] = statistics.median(values)
        agg["errors"] = sum(r["errors"] for r in rs)  # any error in any repetition counts
        out.append(agg)
    return out


def _find(med: list[dict], model: str, system: str, conc: int) -> dict | None:
    for r in med:
        if (r["model"], r["system"], r["concurrency"]) == (model, system, conc):
            return r
    return None


def _shown(value: float | int | None) -> str:
    """A measured value as the targets table shows it: a count as an integer, others to
    three significant digits with their trailing zeros (dropped, an idle CPU of 1.998 %
    read "2" against "< 2" and PASS), thousands without decimals."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) < 1000:
        return f"{value:#.3g}".rstrip(".")
    return f"{value:,.0f}"


def evaluate_targets(res: dict, n: int) -> list[dict]:
    """The issue's targets, each with the measured value and PASS/FAIL (or n/a)."""
    med, raw, ipc = res["medians"], res["raw"], res["ipc"]
    targets: list[dict] = []

    def add(
        name: str, value: float | int | None, limit: str, ok: bool | None, note: str = ""
    ) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        targets.append(
            {
                "target": name,
                "value": _shown(value),
                "limit": limit,
                "result": verdict,
                "note": note,
            }
        )

    rs = _find(med, "identity", "ringserve", 64)
    for key, factor, label in (
        (f"inline-{n}", 0.7, f"(b) {n} procs"),
        ("fastapi", 1.5, "(c)"),
        ("litserve", 4.0, "(d)"),
    ):
        other = _find(med, "identity", key, 64)
        if not (rs and other and other["throughput"] > 0):
            add(f"identity c=64: ringserve req/s vs {label}", None, f">= {factor}x", None)
            continue
        ratio = rs["throughput"] / other["throughput"]
        medians = f"{rs['throughput']:,.0f} vs {other['throughput']:,.0f} req/s"
        note = medians
        paired = paired_ratios(res, "identity", key, 64) if key.startswith("inline") else []
        if paired:
            # The inline server runs right before ringserve in each repetition: judged,
            # like the resnet50 targets, on the median of the per-repetition ratios.
            note = (
                f"per repetition (run just before): {', '.join(f'{q:.2f}x' for q in paired)}; "
                f"ratio of run medians {ratio:.2f}x ({medians})"
            )
            ratio = statistics.median(paired)
        add(
            f"identity c=64: ringserve req/s vs {label}",
            ratio,
            f">= {factor}x",
            ratio >= factor,
            note,
        )
    errs = sum(
        r["errors"] for r in med if r["system"].startswith("ringserve") and r["model"] == "identity"
    )
    errs = int(errs) if float(errs).is_integer() else errs  # medians of counts
    have = any(r["system"].startswith("ringserve") and r["model"] == "identity" for r in med)
    add(
        "identity: ringserve errors (all points)",
        errs if have else None,
        "= 0",
        (errs == 0) if have else None,
    )
    r1 = _find(med, "identity", "ringserve", 1)
    inline1 = _find(med, "identity", "inline-1", 1)  # the HTTP stack alone, same run
    for key, limit in (("p50_ms", 0.5), ("p99_ms", 2.0)):
        value = r1[key] if r1 else None
        note = (
            f"one inline uvicorn process in the same run: {inline1[key]:.2f} ms" if inline1 else ""
        )
        add(
            f"identity c=1: ringserve {key[:3]} ms", value, f"<= {limit:g}", _le(value, limit), note
        )

    rraw = raw.get("resnet50")
    for key in RESNET_JUDGED:
        if key != "ringserve" and not any(r["system"] == key for r in res["rows"]):
            continue  # a variant that did not run (GPU, one thread, --systems)
        who = "ringserve" if key == "ringserve" else f"{key} ({_SHARED})"
        for conc in (8, 32):
            # Judged against the raw best batch of at most ``conc`` (``_best_row``) timed
            # right before and after the point (see ``bench_system``); the repetition's own
            # earlier raw run, and its best batch of any size, in the note.
            around = per_repetition(res, key, conc, vs_raw_best)
            earlier = per_repetition(res, key, conc, vs_raw_run)
            value = statistics.median(around) if around else None
            note = ""
            if around:
                note = (
                    "per repetition, against the raw best batch timed around it: "
                    + ", ".join(f"{q:.2f}x" for q in around)
                    + "; against the repetition's raw run: "
                    + ", ".join(f"{q:.2f}x" for q in earlier)
                )
                larger = [
                    f"{vs_raw_any_size(r, x):.2f}x (b{_best_row(x)['batch_size']})"
                    for r, x in _rows_and_raw(res, key, conc)
                    if _best_row(x)["batch_size"] > conc
                ]
                if larger:
                    note += "; against its best batch of any size: " + ", ".join(larger)
                chosen = [r.get("preferred_batch") for r, _ in _rows_and_raw(res, key, conc)]
                if any(c is not None for c in chosen):
                    note += "; batch size its profile chose: " + ", ".join(map(str, chosen))
            add(
                f"resnet50 c={conc}: {who} img/s vs raw best batch of <= {conc}",
                value,
                ">= 0.95x",
                None if value is None else value >= 0.95,
                note,
            )
        # Judged against the raw batch-1 loop timed in turns with the point (see
        # ``run_c1_between_raw``); the repetition's own earlier raw run, in the note.
        around = per_repetition(res, key, 1, c1_minus_raw)
        earlier = per_repetition(res, key, 1, lambda r, x: r["p50_ms"] - _batch(x, 1)["p50_ms"])
        value = statistics.median(around) if around else None
        add(
            f"resnet50 c=1: {who} p50 - raw batch-1 ms",
            value,
            "<= 3",
            _le(value, 3),
            f"per repetition, against the raw loop in turns with it: "
            f"{', '.join(f'{d:+.1f}' for d in around)} ms; against the repetition's raw run: "
            f"{', '.join(f'{d:+.1f}' for d in earlier)} ms"
            f" (JPEG decode alone {rraw.get('decode_ms', 0):.1f} ms)"
            if around and rraw
            else "",
        )
    fe = [r["frontend_pss_mb"] for r in med if r["system"] == "ringserve"]
    fe_max = max(fe) if fe else None
    add("ringserve frontend PSS MB (max)", fe_max, "<= 60", _le(fe_max, 60))
    idle = [r["idle_cpu_pct"] for r in med if r["system"] == "ringserve"]
    idle_max = max(idle) if idle else None
    add(
        "ringserve idle CPU % of a core",
        idle_max,
        "< 2",
        None if idle_max is None else idle_max < 2,
        "server tree, after ready, no traffic",
    )
    from bench.ipc_roundtrip import PLACEMENTS

    for placement in PLACEMENTS:
        rows = [x for x in ipc if x.get("placement", PLACEMENTS[0]) == placement]
        floors = [x for x in rows if x["wait"].endswith("(floor)")]
        floor_note = (
            "eventfd ping-pong with no work: "
            + " / ".join(f"{x['p50_us']:.0f}" for x in floors)
            + " µs (back to back / after idle)"
            if floors
            else ""
        )
        for label, limit in (("600KB", 100), ("1KB", 30)):
            row = next((x for x in rows if x["payload"] == label and x["wait"] == "poll"), None)
            value = row["p50_us"] if row else None
            add(
                f"ipc round trip {label} p50 µs, {placement}",
                value,
                f"<= {limit}",
                _le(value, limit),
                floor_note,
            )
    return targets


def per_repetition(
    res: dict, system: str, conc: int, compare: Callable[[dict, dict], float]
) -> list[float]:
    """``compare(row of system, raw run)`` for each resnet50 repetition, against the raw
    model measured in that same repetition before the servers.

    The host's speed drifts by up to 2x within minutes (other tenants), so a ratio of
    two run-wide medians mixes moments; a per-repetition ratio of adjacent runs does not.
    """
    return [compare(r, raw) for r, raw in _rows_and_raw(res, system, conc)]


def _rows_and_raw(res: dict, system: str, conc: int) -> list[tuple[dict, dict]]:
    """Each resnet50 point of ``system`` at ``conc`` that served, with its repetition's
    raw run."""
    raws = res["raw_reps"].get("resnet50", [])
    return [
        (r, raws[r["rep"]])
        for r in res["rows"]
        if (r["model"], r["system"], r["concurrency"]) == ("resnet50", system, conc)
        and r["rep"] < len(raws)
        and r["throughput"] > 0
    ]


def paired_ratios(res: dict, model: str, other: str, conc: int) -> list[float]:
    """ringserve's throughput over ``other``'s in each repetition (``other`` runs right
    before ringserve: see the order in ``run``)."""
    by_rep: dict[int, dict[str, float]] = {}
    for r in res["rows"]:
        if r["model"] == model and r["concurrency"] == conc:
            by_rep.setdefault(r["rep"], {})[r["system"]] = r["throughput"]
    return [
        runs["ringserve"] / runs[other]
        for _, runs in sorted(by_rep.items())
        if runs.get(other, 0) > 0 and "ringserve" in runs
    ]


def vs_raw_best(row: dict, raw_run: dict) -> float:
    """A throughput point over the raw best batch's items/s: timed right before and
    after it, or (an older results file) the repetition's raw run."""
    if "vs_raw_around" in row:
        return row["vs_raw_around"]
    return vs_raw_run(row, raw_run)


def vs_raw_run(row: dict, raw_run: dict) -> float:
    """A throughput point over the best batch (of at most its concurrency) of the
    repetition's raw run."""
    return row["throughput"] / _best_row(raw_run, row["concurrency"])["items_per_s"]


def vs_raw_any_size(row: dict, raw_run: dict) -> float:
    """A throughput point over the repetition's raw best batch of any size."""
    return row["throughput"] / _best_row(raw_run)["items_per_s"]


def c1_minus_raw(row: dict, raw_run: dict) -> float:
    """A c=1 point's p50 over the raw batch-1 p50: by the slices timed in turns, or (an
    older results file) against the repetition's raw run."""
    if "c1_minus_raw_ms" in row:
        return row["c1_minus_raw_ms"]
    return row["p50_ms"] - _batch(raw_run, 1)["p50_ms"]


def around_batch(raw_run: dict | None, conc: int) -> int:
    """The raw batch size a throughput point of ``conc`` clients is timed against right
    before and after it: the repetition's best of at most ``conc`` (0: none, at c=1)."""
    return _best_row(raw_run, conc)["batch_size"] if raw_run and conc > 1 else 0


def _best_row(raw_run: dict, most: int = 0) -> dict:
    """The raw run's row at its fastest batch size (items/s), of the sizes up to ``most``
    (0: any). A point of c clients, each waiting for its answer before it sends again,
    never has more than c requests to batch: batch c is the largest any server can run
    there, so the raw loop at a larger size is no ceiling for it."""
    rows = [x for x in raw_run["rows"] if not most or x["batch_size"] <= most]
    return max(rows or raw_run["rows"], key=lambda x: x["items_per_s"])


def _batch(raw_run: dict, size: int) -> dict:
    return next(x for x in raw_run["rows"] if x["batch_size"] == size)


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _durations(meta: dict) -> str:
    """ "5.0 s", or per model (results since the per-model defaults): "identity 5 s, ..."."""
    d = meta["duration"]
    if isinstance(d, dict):
        return ", ".join(f"{m} {s:g} s" for m, s in d.items())
    return f"{d} s"


def render_markdown(res: dict) -> str:
    meta = res["meta"]
    lines = [
        "# ringserve benchmark results",
        "",
        f"{meta['date']} · {meta['cpu']} · {meta['cpus']} CPUs"
        + (f" · {meta['halt_poll']}" if meta.get("halt_poll") else "")
        + f" · torch {meta['torch']} · "
        f"device {meta['device']} · "
        + ("resnet50 compiled in (a) and (e), eager in (b)-(d) · " if meta.get("compiled") else "")
        + f"{meta['repeats']} repetition(s) x {_durations(meta)} "
        f"per point (medians) · load generator: {meta['wrk']} · load average "
        f"{meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end "
        "(1 min; other tenants share the CPUs)",
        "",
        "Systems: (a) raw model loop; (b) uvicorn running the model inline, 1 and N "
        "processes; (c) FastAPI + asyncio.Queue batcher (batch 32, wait 100 ms); (d) LitServe "
        "(batch 32, timeout 5 ms, 2 API processes); (e) ringserve; (f) MLServer (adaptive "
        "batching, batch 32, 100 ms; identity, KServe v2 JSON). "
        "CPU = server CPU seconds per request (whole process tree); PSS = sum over the tree."
        + (
            ""
            if meta.get("quick")
            else " resnet50 req/s at c>1: the rate answers come in the point's window, after "
            f"{WINDOW_WARMUP_S:g} s of warm-up in the same wrk run (bench/post.lua)."
        ),
        "",
    ]
    for s in res["skipped"]:
        lines += [f"- **{s['system']}: skipped** — {s['reason']}", ""]
    labels = {s["key"]: s["label"] for s in res["systems"]}
    for model in res["models"]:
        lines += [
            f"## {model}",
            "",
            "| system | c | req/s | p50 ms | p90 ms | p99 ms | errors | CPU ms/req | PSS MB "
            "| idle CPU % | load 1m | steal % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for sysd in res["systems"]:
            rows = sorted(
                (r for r in res["medians"] if r["model"] == model and r["system"] == sysd["key"]),
                key=lambda r: r["concurrency"],
            )
            skipped = next((s for s in res["skipped"] if s["system"] == sysd["key"]), None)
            if model not in sysd["models"]:
                continue
            if not rows:
                why = skipped["reason"] if skipped else "no result"
                lines.append(f"| {sysd['label']} | — | skipped: {why} | | | | | | | | | |")
            for r in rows:
                lines.append(
                    f"| {labels[r['system']]} | {r['concurrency']} | {r['throughput']:,.1f} "
                    f"| {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} "
                    f"| {r['errors']} | {r['cpu_ms_per_req']:.3f} | {r['pss_mb']:,.0f} "
                    f"| {r['idle_cpu_pct']:.1f} | {r.get('loadavg_1m', 0):.1f} "
                    f"| {r.get('steal_pct', 0):.1f} |"
                )
        raw = res["raw"].get(model)
        if raw:
            lines += [
                "",
                f"(a) raw model, {raw['threads']} thread(s), {raw['device']} (median of "
                f"{len(res['raw_reps'].get(model, [])) or 1} repetition(s)):",
                "",
                "| batch | items/s | batch p50 ms | batch p99 ms |",
                "| ---: | ---: | ---: | ---: |",
            ]
            lines += [
                f"| {r['batch_size']} | {r['items_per_s']:,.1f} | {r['p50_ms']:.3f} "
                f"| {r['p99_ms']:.3f} |"
                for r in raw["rows"]
            ]
            if "decode_ms" in raw:
                lines += [
                    "",
                    f"JPEG decode + resize + crop of one input: {raw['decode_ms']:.2f} ms",
                ]
        fe = [
            r["frontend_pss_mb"]
            for r in res["medians"]
            if r["model"] == model and r["system"] == "ringserve"
        ]
        if fe:
            lines += [
                "",
                f"ringserve frontend PSS (largest frontend, after load): {max(fe):.1f} MB",
            ]
        lines.append("")
    if res["ipc"]:
        from bench.ipc_roundtrip import table

        lines += ["## ipc round trip (no HTTP, no torch)", "", table(res["ipc"]), ""]
    lines += [
        "## Targets",
        "",
        "| target | measured | limit | result | note |",
        "| --- | ---: | --- | --- | --- |",
    ]
    lines += [
        f"| {t['target']} | {t['value']} | {t['limit']} | {t['result']} | {t['note']} |"
        for t in res["targets"]
    ]
    lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no plot"
    models = res["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    labels = {s["key"]: s["label"] for s in res["systems"]}
    for ax, model in zip(axes[0], models, strict=True):
        for key, label in labels.items():
            rows = sorted(
                (r for r in res["medians"] if r["model"] == model and r["system"] == key),
                key=lambda r: r["concurrency"],
            )
            if not rows:
                continue
            x = [r["throughput"] for r in rows]
            (line,) = ax.plot(x, [r["p50_ms"] for r in rows], marker="o", label=f"{label} p50")
            ax.plot(x, [r["p99_ms"] for r in rows], ls=":", marker=".", color=line.get_color())
            for r in rows:
                ax.annotate(f"c{r['concurrency']}", (r["throughput"], r["p50_ms"]), fontsize=7)
        raw = res["raw"].get(model)
        if raw:
            ax.plot(
                [r["items_per_s"] for r in raw["rows"]],
                [r["p50_ms"] for r in raw["rows"]],
                marker="s",
                color="black",
                ls="--",
                label="(a) raw model (batch p50)",
            )
            for r in raw["rows"]:
                ax.annotate(f"b{r['batch_size']}", (r["items_per_s"], r["p50_ms"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s; raw: items/s)")
        ax.set_ylabel("latency ms (solid p50, dotted p99)")
        ax.set_title(f"{model} on {res['meta']['device']}, {res['meta']['cpus']} CPUs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0].strip()
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke: one short point per system")
    ap.add_argument("--models", default="identity,resnet50")
    ap.add_argument(
        "--concurrency",
        default="",
        help="comma list (default: identity 1,8,32,64; resnet50 1,8,32)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds per point (default: identity 5, resnet50 8)",
    )
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for resnet50")
    ap.add_argument("--frontends", type=int, default=2, help="ringserve frontends (= N for b)")
    ap.add_argument("--systems", default="", help="comma list of system keys or roles a..f")
    ap.add_argument("--raw-duration", type=float, default=3.0)
    ap.add_argument("--ipc-iterations", type=int, default=20000, help="0: skip the ipc bench")
    ap.add_argument("--idle-window", type=float, default=3.0, help="seconds of idle CPU sampling")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after ready before idle")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--no-litserve", action="store_true", help="skip (d)")
    ap.add_argument("--no-mlserver", action="store_true", help="skip (f)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="resnet50 compiled in the raw loop and in ringserve (compile = true); the "
        "other systems run it eager, as their users would by default",
    )
    ap.add_argument("--no-install", action="store_true", help="never pip/apt install anything")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument(
        "--report-only", action="store_true", help="re-render OUT/results.json, measure nothing"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.concurrency, args.repeats = "identity", "1", 1
        args.duration, args.warmup, args.raw_duration = 1.0, 0.0, 0.2
        args.ipc_iterations, args.idle_window, args.settle = 200, 0.5, 0.2
        args.ready_timeout = min(args.ready_timeout, 60.0)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODEL_NAMES:
            ap.error(f"unknown model {m!r}: choose from {', '.join(MODEL_NAMES)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return report(json.loads((out / "results.json").read_text()), out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    missing = ensure_bench_deps(not args.no_install)
    wrk = ensure_wrk() if not args.no_install else shutil.which("wrk")
    if not wrk:
        log("wrk is not installed (Debian package `wrk`)")
        return 2
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout
    inputs = make_inputs(out)
    skipped: list[dict] = []
    build = not args.quick and not args.no_install
    lit = (None, "--no-litserve") if args.no_litserve else LITSERVE.python(build)
    if args.no_mlserver:
        ml: tuple[Path | None, str] = (None, "--no-mlserver")
    elif "identity" not in args.models:
        ml = (None, "serves identity only")  # (so a resnet50 run does not build it)
    else:
        ml = MLSERVER.python(build)
    all_systems = systems(args, *lit, *ml)
    for s in all_systems:
        if s.skip:
            skipped.append({"system": s.key, "reason": s.skip})
        elif s.key == "fastapi" and "fastapi" in missing:
            s.skip = "fastapi is not installed (bench/requirements.txt)"
            skipped.append({"system": s.key, "reason": s.skip})
    active = [s for s in all_systems if not s.skip]
    import torch

    res: dict = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "compiled": args.compile,
            "repeats": args.repeats,
            "duration": {m: point_seconds(m, args) for m in args.models},
            "concurrency": {m: args.concurrency or CONCURRENCY[m] for m in args.models},
            "wrk": " ".join(wrk_version.split()[:2]),
            "quick": args.quick,
            "loadavg_start": os.getloadavg(),
            "halt_poll": guest_halt_poll(),
        },
        "models": args.models,
        "systems": [
            {"key": s.key, "label": s.label, "role": s.role, "models": list(s.models)}
            for s in all_systems
        ],
        "skipped": skipped,
        "rows": [],
        "raw": {},
        "raw_reps": {},
        "ipc": [],
        "failures": [],
    }
    with contextlib.suppress(Exception):
        res["meta"]["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    log(f"systems: {[s.key for s in active]}; skipped: {[s['system'] for s in skipped]}")
    with tempfile.TemporaryDirectory(prefix="ringserve-bench-") as tmpd:
        tmp = Path(tmpd)
        if args.ipc_iterations > 0:
            res["ipc"] = bench_ipc(args.ipc_iterations, tmp)
        for model in args.models:
            for rep in range(args.repeats):
                raw_run = None
                for system in repetition_order(active, model, rep, args.frontends):
                    if system is None:
                        host0 = host_cpu_ticks()
                        raw_run = bench_raw(model, args, inputs, tmp)
                        raw_run["steal_pct"] = steal_pct(host0, host_cpu_ticks())
                        res["raw_reps"].setdefault(model, []).append(raw_run)
                        continue
                    try:
                        res["rows"] += bench_system(
                            system, model, rep, args, inputs, wrk, tmp, logs, raw_run
                        )
                    except Exception as e:  # (odd load-generator output too: the run goes on)
                        msg = f"{system.key}/{model}/rep {rep}: {type(e).__name__}: {e}"
                        log(f"FAILED {msg}")
                        res["failures"].append(msg)
    res["meta"]["loadavg_end"] = os.getloadavg()
    res["meta"]["frontends"] = args.frontends
    return report(res, out)


def repetition_order(
    active: list[System], model: str, rep: int, frontends: int
) -> list[System | None]:
    """The order in which repetition ``rep`` runs the systems that serve ``model``, the
    raw model as None.

    Interleaved: every system once per repetition, the order rotated each time. What
    ringserve's targets are ratios against runs right before it, as one block that
    rotates with the others: the inline server with as many processes, then the raw
    model, then ringserve's configurations side by side, so each repetition's ratio
    compares two moments a minute apart, not the two ends of a repetition on a host
    whose speed drifts (see ``per_repetition``). (Rotating every system and then moving
    the block's members together undid the rotation: with the full set, repetitions 1
    and 2 ran in the same order.)
    """
    served = [s for s in active if model in s.models]
    judged = [s for s in served if s.key in RESNET_JUDGED]
    block: list[System | None] = [None, *judged]
    peer = next((s for s in served if s.key == f"inline-{frontends}"), None)
    if peer is not None and any(s.key == "ringserve" for s in judged):
        block.insert(0, peer)
    units = [[s] for s in served if s not in block]
    # The block where ringserve stands among the others (first without a ringserve).
    at = len([s for s in served[: served.index(judged[0])] if s not in block]) if judged else 0
    units.insert(at, block)
    k = rep % len(units)
    return [s for unit in units[k:] + units[:k] for s in unit]


def _middle(items: list[T], key: Callable[[T], float]) -> T:
    """The median item itself (the lower one of an even count), not an average of two."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def report(res: dict, out: Path) -> int:
    """Aggregate, judge the targets, write results.json, results.md and the plot."""
    for model, reps in res["raw_reps"].items():
        # The median repetition of each batch size, like every other system: the targets
        # compare medians from the same run. (Taking the raw model's best repetition
        # would judge the servers' medians against the quietest moment of the run.)
        rows = []
        for i, first in enumerate(reps[0]["rows"]):
            runs = [r["rows"][i] for r in reps]
            mid = _middle(runs, lambda row: row["items_per_s"])
            best = max(row["items_per_s"] for row in runs)
            rows.append({"batch_size": first["batch_size"], **mid, "best": best, "reps": len(reps)})
        res["raw"][model] = {**reps[0], "rows": rows}
        if "decode_ms" in reps[0]:
            res["raw"][model]["decode_ms"] = _middle([r["decode_ms"] for r in reps], float)
    res["medians"] = medians(res["rows"])
    res["targets"] = evaluate_targets(res, res["meta"].get("frontends", 2))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    note = plot(res, out / "latency_throughput.png")
    md = render_markdown(res)
    if note:
        md += f"\n{note}\n"
    if res["failures"]:
        md += "\n## Failures\n\n" + "\n".join(f"- {f}" for f in res["failures"]) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results.md'}, results.json, latency_throughput.png")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
