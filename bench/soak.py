"""Soak: hours of open-loop load with faults, and a summary that says whether anything
was lost and whether memory stayed put. Not part of CI.

Runs ``ringserve serve`` with two models, ``id`` (identity) and ``leak`` (the test
suite's ``Leaky`` handler: 1 MiB kept per batch, so the memory policy must recycle it),
``--workers`` of each, and drives them at ``--rate`` requests/s (a ``--leak-share`` of
them to ``leak``) for ``--duration`` seconds while it

- SIGKILLs a random worker every ``--kill-every`` seconds,
- sends the supervisor SIGHUP (rolling restart) every ``--hup-every`` seconds,
- samples every process's USS (the supervisor's own sampler, read over the admin
  socket, plus psutil for the supervisor) every ``--sample-every`` seconds.

Every request is checked by ``tests/support/load.py``: its own answer (the echo of its
unique input and request id), or a fast 503 with Retry-After. A request that gets no
response at all is sent once more, as nginx does with the shipped site config
(``proxy_next_upstream error ... non_idempotent``); such retries are counted apart. Lost
= no answer after that, a wrong or malformed answer, or any other status. It must be 0.

    python -m bench.soak --duration 3600            # the real soak (about an hour)
    python -m bench.soak --duration 180             # a smoke run

Prints a summary (requests, lost, recycles and restarts by reason from ``ringserve ctl
status --json``, USS trend per process, p50/p99 latency per window) and writes
``summary.json`` and ``soak.png`` (matplotlib, a bench-only dependency) to ``--out``.
Exit status 1 when anything was lost or the server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from support.load import LOST, OK, REFUSED, DriveResult, drive, echo_request  # noqa: E402

from ringserve.supervisor.admin_protocol import AdminClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = args.port or free_port()
        self.instance = f"soak{self.port}"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.admin_socket = str(self.out / "admin.sock")
        self.log_path = self.out / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[dict] = []  # {"t", "procs": {id: uss}, "totals"}
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.t0 = 0.0
        self.proc: subprocess.Popen | None = None

    # -- the server ---------------------------------------------------------------------

    def start(self) -> None:
        a = self.args
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MALLOC_ARENA_MAX": "2",  # as in the shipped systemd unit
        }
        env.pop("NOTIFY_SOCKET", None)
        memory = {
            "memory.sample_interval_s": 2,
            "memory.warmup_s": 15,
            "memory.trend_window_s": 30,
            "memory.trend_min_mb_per_min": 60,
            "memory.uss_limit_mb": 1500,
            "memory.min_recycle_interval_s": 30,
        }
        cmd = [
            sys.executable,
            "-m",
            "ringserve.supervisor.cli",
            "serve",
            "--port",
            str(self.port),
            "--instance",
            self.instance,
            "--admin-socket",
            self.admin_socket,
            "--workers",
            str(a.workers),
            "--model",
            "id=identity",
            "--model",
            "leak=python:support.fake_handlers:Leaky",
            "--max-batch-size",
            "8",
        ]
        for key, value in memory.items():
            cmd += ["--set", f"{key}={value}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readiness", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)  # start-up poll (a bench, not a test)
        raise SystemExit(f"server not ready in 180 s; see {self.log_path}")

    def status(self) -> dict:
        return AdminClient(self.admin_socket, timeout_s=10).call("status")

    def ctl_status_json(self) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ringserve.supervisor.cli",
                "ctl",
                "--socket",
                self.admin_socket,
                "--json",
                "status",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)

    def shutdown(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                return -9
        return self.proc.returncode

    # -- the chaos (runs in a thread while the load runs) --------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str) -> None:
        self.events.append((round(self.now(), 2), what))
        print(f"[{self.now():7.1f} s] {what}", flush=True)

    def sample(self) -> None:
        try:
            st = self.status()
        except Exception as e:  # the sampler must not end the soak
            self.event(f"status failed: {e}")
            return
        # uss_bytes is 0 until the supervisor's sampler has seen a (new) process
        procs = {p["id"]: p["uss_bytes"] for p in st["processes"] if p["uss_bytes"]}
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            procs["supervisor"] = psutil.Process(self.proc.pid).memory_full_info().uss
        self.samples.append(
            {"t": round(self.now(), 2), "procs": procs, "totals": st["server"]["totals"]}
        )

    def chaos(self) -> None:
        a = self.args
        rng = random.Random(a.seed)
        next_kill, next_hup, next_sample = a.kill_every, a.hup_every / 2 + 7, 0.0
        while (now := self.now()) < a.duration:
            if now >= next_sample:
                self.sample()
                next_sample += a.sample_every
            if a.kill_every and now >= next_kill:
                next_kill += a.kill_every
                st = self.status()
                if st["server"]["rolling_restart_pending"] or st["server"]["recycles_in_progress"]:
                    self.event("kill skipped: a restart is in progress")
                else:
                    victim = rng.choice([p for p in st["processes"] if p["role"] == "worker"])
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim["pid"], signal.SIGKILL)
                    self.event(f"SIGKILL {victim['id']} (pid {victim['pid']}, {victim['model']})")
            if a.hup_every and now >= next_hup:
                next_hup += a.hup_every
                assert self.proc is not None
                self.proc.send_signal(signal.SIGHUP)
                self.event("SIGHUP (rolling restart)")
            wait = min(
                next_sample, next_kill if a.kill_every else 1e9, next_hup if a.hup_every else 1e9
            )
            time.sleep(max(0.0, min(wait, a.duration) - self.now()))  # the soak's own clock
        self.sample()

    # -- the run --------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.t0 = time.monotonic()
        try:
            self.start()
        except BaseException:
            # A server that never got ready (or exited) is not left running with its
            # shared memory: it was started in a session of its own, out of reach of ^C.
            if self.proc is not None:
                self.shutdown()
            raise
        self.event(f"server ready on {self.url} (instance {self.instance})")
        leak_every = max(1, round(1 / a.leak_share)) if a.leak_share > 0 else 0

        def make(i: int):  # type: ignore[no-untyped-def]
            model = "leak" if leak_every and i % leak_every == 0 else "id"
            return echo_request(f"/v1/models/{model}/predict", i)

        self.t0 = time.monotonic()
        try:
            result = drive(
                self.url,
                make,
                self.chaos,
                rate=a.rate,
                max_requests=int(a.rate * (a.duration + 120)),
                max_duration_s=a.duration + 120,
                warmup=0,
                tail=int(a.rate),
                max_inflight=256,
                timeout=60,
                retry_transport_errors=True,
            )
            final = self.ctl_status_json()
        finally:
            rc = self.shutdown()
        return self.report(result, final, rc)

    # -- the report ------------------------------------------------------------------------

    def report(self, result: DriveResult, final: dict, rc: int) -> int:
        a = self.args
        recs = result.records
        lost = result.by_verdict(LOST)
        retried = [r for r in recs if r.retried]
        lost_by = defaultdict(int)
        for r in lost:
            lost_by[r.why.split(":")[0]] += 1
        totals = final["server"]["totals"]
        window = max(15.0, a.duration / 24)
        windows = []
        for k in range(int((a.duration + 60) // window) + 1):
            lat = sorted(
                r.latency_s
                for r in recs
                if r.verdict == OK and k * window <= r.sent_s < (k + 1) * window
            )
            if lat:
                windows.append(
                    {
                        "start_s": k * window,
                        "n": len(lat),
                        "p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
                    }
                )
        uss = defaultdict(list)  # id -> [(t, MiB)]
        for s in self.samples:
            for pid_name, value in s["procs"].items():
                uss[pid_name].append((s["t"], value / 2**20))
        trend = {}
        for name, series in sorted(uss.items()):
            half = [v for t, v in series if t >= a.duration / 2] or [series[-1][1]]
            trend[name] = {
                "first_mib": round(series[0][1], 1),
                "last_mib": round(series[-1][1], 1),
                "max_mib": round(max(v for _, v in series), 1),
                "second_half_max_mib": round(max(half), 1),
            }
        summary = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "duration_s": a.duration,
            "rate": a.rate,
            "requests": len(recs),
            "ok": len(result.by_verdict(OK)),
            "refused_503": len(result.by_verdict(REFUSED)),
            "lost": len(lost),
            "lost_by_reason": dict(lost_by),
            "retried_after_transport_error": len(retried),
            "retried_reasons": sorted({r.retried.split(":")[0] for r in retried}),
            "p50_ms": round(result.percentile(0.5) * 1000, 1),
            "p99_ms": round(result.percentile(0.99) * 1000, 1),
            "recycles": {
                k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("recycles:")
            },
            "restarts": {
                k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("restarts:")
            },
            "requeued": totals.get("requeued", 0),
            "poisoned": totals.get("poisoned", 0),
            "events": self.events,
            "uss_trend": trend,
            "latency_windows": windows,
            "exit_code": rc,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.print_summary(summary)
        self.plot(uss, windows, result)
        return 0 if not lost and rc == 0 and not result.exhausted else 1

    def print_summary(self, s: dict) -> None:
        print("\n== soak summary ==")
        print(
            f"duration {s['duration_s']} s at {s['rate']} req/s; server exit code {s['exit_code']}"
        )
        print(
            f"requests {s['requests']}: ok {s['ok']}, fast 503 {s['refused_503']}, "
            f"LOST {s['lost']} {s['lost_by_reason'] or ''}"
        )
        print(
            f"sent again after a transport error (nginx would): {s['retried_after_transport_error']} "
            f"{s['retried_reasons']}"
        )
        print(f"latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")
        print(f"recycles by reason: {s['recycles']}; restarts: {s['restarts']}")
        print(f"requeued {s['requeued']}, poisoned {s['poisoned']}")
        print("USS per process (MiB): first / last / max / max in the second half")
        for name, t in s["uss_trend"].items():
            print(
                f"  {name:12s} {t['first_mib']:8.1f} {t['last_mib']:8.1f} {t['max_mib']:8.1f} "
                f"{t['second_half_max_mib']:8.1f}"
            )
        print("latency per window: start_s n p50_ms p99_ms")
        for w in s["latency_windows"]:
            print(f"  {w['start_s']:7.0f} {w['n']:6d} {w['p50_ms']:8.1f} {w['p99_ms']:8.1f}")
        print(f"results in {self.out}")

    def plot(self, uss: dict, windows: list, result: DriveResult) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
            return
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
        mids = [w["start_s"] for w in windows]
        ax1.plot(mids, [w["p50_ms"] for w in windows], label="p50")
        ax1.plot(mids, [w["p99_ms"] for w in windows], label="p99")
        ax1.set_ylabel("latency (ms)")
        ax1.set_yscale("log")
        for name, series in sorted(uss.items()):
            ax2.plot([t for t, _ in series], [v for _, v in series], label=name)
        ax2.set_ylabel("USS (MiB)")
        ax2.legend(fontsize=7, ncol=3)
        ok = [r.sent_s for r in result.records if r.verdict == OK]
        bad = [r.sent_s for r in result.records if r.verdict != OK]
        ax3.hist([ok, bad], bins=60, stacked=True, label=["ok", "503 / lost"])
        ax3.set_ylabel("requests")
        ax3.set_xlabel("seconds")
        for ax in (ax1, ax2, ax3):
            for t, what in self.events:
                if what.startswith(("SIGKILL", "SIGHUP")):
                    ax.axvline(t, color="red" if what.startswith("SIGKILL") else "green", lw=0.6)
        ax1.legend()
        ax3.legend()
        fig.suptitle("ringserve soak (red: worker SIGKILL, green: SIGHUP)")
        fig.tight_layout()
        fig.savefig(self.out / "soak.png", dpi=110)
        print(f"plot: {self.out / 'soak.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (open loop)")
    p.add_argument("--leak-share", type=float, default=0.2, help="share of requests to 'leak'")
    p.add_argument("--workers", type=int, default=2, help="workers per model")
    p.add_argument("--kill-every", type=float, default=45.0, help="SIGKILL a worker (0: never)")
    p.add_argument("--hup-every", type=float, default=120.0, help="SIGHUP (0: never)")
    p.add_argument("--sample-every", type=float, default=5.0, help="USS sampling period")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"soak-{stamp}"))
    args = p.parse_args(argv)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
