"""A real Prometheus on 127.0.0.1 scrapes a running ringserve under load and through a
worker recycle: the contract's series exist, counters grow and never go backwards."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server, free_port, wait_until
from test_alert_rules import EXPORTED_METRICS, HISTOGRAMS
from test_e2e_core import _fire, digit_requests

pytestmark = pytest.mark.e2e

# Only present on GPU hosts (CUDA workers / NVML) or after the event they count.
GPU_ONLY = {
    "ringserve_worker_gpu_allocated_bytes",
    "ringserve_worker_gpu_reserved_bytes",
    "ringserve_worker_gpu_nvml_used_bytes",
}
EVENT_ONLY: set[str] = set()  # every counter is created at zero (increase() needs it)


def scrape_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def documented_labels() -> dict[str, frozenset[str]]:
    """The label names of every metric in docs/observability.md's metric table."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    lines = text.split("| metric | type | labels | meaning |", 1)[1].splitlines()[2:]
    out: dict[str, frozenset[str]] = {}
    for line in lines:
        if not line.startswith("| `"):
            break
        name, _, labels = (cell.strip() for cell in line.split("|")[1:4])
        names = {x.strip() for x in labels.split(",")} - {"—", ""}
        out[name.strip("`")] = frozenset(names)
    return out


def scraped_labels(text: str) -> dict[str, set[frozenset[str]]]:
    """Each metric base name in a scrape, with the label-name sets of its samples (a
    histogram's ``le`` left out)."""
    out: dict[str, set[frozenset[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series = line.rsplit(" ", 1)[0]
        name, _, rest = series.partition("{")
        base = re.sub(r"_(bucket|sum|count|created)$", "", name)
        keys = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest)) - {"le"}
        out.setdefault(base, set()).add(keys)
    return out


def test_every_contract_metric_is_exported(start_server) -> None:
    server: Server = start_server("--frontends", "2")
    asyncio.run(_fire(server.url, [c for c, _ in digit_requests(20)]))
    server.ctl("recycle", "worker-0")
    wait_until(
        lambda: server.ctl("status")["server"]["totals"].get("recycles:admin"), 60, "the recycle"
    )
    scrape = httpx.get(f"{server.url}/metrics", headers={"X-Request-ID": "scrape-1"})
    assert scrape.headers["X-Request-ID"] == "scrape-1"  # as on every other route
    names = scrape_names(scrape.text)
    for metric in sorted(EXPORTED_METRICS - GPU_ONLY - EVENT_ONLY):
        if metric in HISTOGRAMS:
            assert f"{metric}_bucket" in names, metric
        else:
            assert metric in names, metric
    # ...and nothing is exposed that the contract (docs/observability.md) does not name.
    bases = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in names}
    assert bases - EXPORTED_METRICS == set()
    # Each series carries exactly the labels the contract's table names: a renamed or
    # dropped label breaks every query and alert that selects by it.
    documented = documented_labels()
    assert set(documented) == EXPORTED_METRICS
    for base, label_sets in scraped_labels(scrape.text).items():
        assert label_sets == {documented[base]}, (base, label_sets, documented[base])
    # The supervisor's own memory, which nothing else watches.
    assert re.search(
        r'ringserve_process_unique_memory_bytes\{id="0",model="",role="supervisor"\} [1-9]',
        scrape.text,
    )
    # Start times are the kernel's: the same at every scrape, whichever frontend answers.
    starts = [
        sorted(x for x in httpx.get(f"{server.url}/metrics").text.splitlines()
               if x.startswith("ringserve_process_start_time_seconds{"))
        for _ in range(4)
    ]  # fmt: skip
    assert len(starts[0]) == 4 and all(s == starts[0] for s in starts), starts
    assert server.stop() == 0


def test_every_counter_is_there_before_its_first_event(start_server) -> None:
    """increase() and rate() cannot see a series' first sample: counters a start had not
    created yet hid the first 504s, refusals and 5xx of each model from graphs and alerts."""
    server: Server = start_server("--frontends", "2")
    text = httpx.get(f"{server.url}/metrics").text
    for series in (
        'ringserve_requests_total{code="504",model="digits"} 0.0',
        'ringserve_requests_total{code="503",model="digits"} 0.0',
        'ringserve_requests_total{code="500",model="digits"} 0.0',
        'ringserve_rejected_requests_total{model="digits"} 0.0',
        'ringserve_deadline_expired_total{model="digits"} 0.0',
        'ringserve_cancelled_requests_total{model="digits"} 0.0',
        'ringserve_failed_request_seconds_total{model="digits"} 0.0',
        'ringserve_poison_requests_total{model="digits"} 0.0',
        'ringserve_process_restarts_total{model="digits",reason="killed by SIGKILL",role="worker"} 0.0',
    ):
        assert series in text, series
    assert server.stop() == 0


def test_real_prometheus_scrapes_through_a_recycle(start_server, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is required (CI installs it)"
    server: Server = start_server("--frontends", "4", "--workers", "2")
    server.wait_workers_ready(2)
    # Scrape cost with 4 frontends and 2 workers (reported in the closing note).
    with httpx.Client() as c:
        c.get(f"{server.url}/metrics")
        t0 = time.perf_counter()
        sizes = [len(c.get(f"{server.url}/metrics").content) for _ in range(20)]
        per_scrape_ms = (time.perf_counter() - t0) / 20 * 1000
    print(
        f"/metrics: {max(sizes)} bytes, {per_scrape_ms:.1f} ms per scrape (4 frontends, 2 workers)"
    )

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ringserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> list:
        try:
            r = httpx.get(api, params={"query": expr}, timeout=5)
        except httpx.HTTPError:
            return []
        return r.json()["data"]["result"] if r.status_code == 200 else []

    def value(expr: str) -> float:
        res = query(expr)
        return float(res[0]["value"][1]) if res else 0.0

    try:
        wait_until(lambda: value('up{job="ringserve"}') == 1, 60, "the first scrape")
        asyncio.run(_fire(server.url, [c for c, _ in digit_requests(200)]))
        wait_until(
            lambda: value('sum(ringserve_requests_total{code="200"})') >= 200,
            30,
            "request counters in Prometheus",
        )
        before = value("sum(ringserve_batches_total)")
        server.ctl("recycle", "worker-0")
        wait_until(
            lambda: server.ctl("status")["server"]["totals"].get("recycles:admin"),
            60,
            "the recycle",
        )
        asyncio.run(_fire(server.url, [c for c, _ in digit_requests(200)]))
        wait_until(
            lambda: value('sum(ringserve_requests_total{code="200"})') >= 400, 30, "more requests"
        )
        wait_until(
            lambda: value('sum(ringserve_worker_recycles_total{reason="admin"})') == 1,
            30,
            "the recycle counted with its reason",
        )
        # The series existed at 0 before it (scraped above), so even the first recycle
        # after a start is an increase, as dashboards and alerts read it.
        increase = 'sum(increase(ringserve_worker_recycles_total{reason="admin"}[5m]))'
        assert value(increase) > 0
        assert value("sum(ringserve_batches_total)") > before
        # No counter went backwards across the recycle (a reset would show here).
        for counter in (
            "ringserve_requests_total",
            "ringserve_batches_total",
            "ringserve_request_duration_seconds_count",
        ):
            assert value(f"sum(resets({counter}[5m]))") == 0, counter
        assert value('ringserve_workers_ready{model="digits"}') == 2
        assert len(query('ringserve_process_unique_memory_bytes{role="worker"}')) >= 2
        assert value("ringserve_build_info") == 1
    finally:
        prom.terminate()
        prom.wait(30)
    assert server.stop() == 0


def test_a_frozen_workers_heartbeat_age_grows(start_server) -> None:
    """A frozen worker stays ready until the supervisor kills it at
    worker.heartbeat_timeout_s (minutes, for a model with long batches): its heartbeat
    age shows the stall before that."""
    server: Server = start_server("--set", "worker.heartbeat_timeout_s=60", frontends=1)
    pattern = re.compile(
        r'ringserve_process_heartbeat_age_seconds\{id="0",model="digits",role="worker"\} (\S+)'
    )

    def age() -> float:
        match = pattern.search(httpx.get(f"{server.url}/metrics").text)
        assert match, "no heartbeat age for the worker"
        return float(match.group(1))

    assert age() < 5  # an idle worker beats at every wake (worker.heartbeat_interval_s)
    [worker] = [p["pid"] for p in server.children() if p["role"] == "worker"]
    os.kill(worker, signal.SIGSTOP)
    try:
        time.sleep(4)
        assert age() >= 3.5
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_until(lambda: age() < 3, 10, "the worker beating again")
    assert server.stop() == 0
