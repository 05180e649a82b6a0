"""Smoke test of the benchmark (not a measurement): ``python -m bench.run --quick`` runs
one short point per system with the identity model plus a few ipc round trips, exits 0
and writes a results table with a row per system. LitServe is skipped when its separate
venv is not built (the smoke never builds it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.timeout(170)
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, f"bench.run --quick failed:\n{proc.stdout[-6000:]}{proc.stderr}"
    md = (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    for system in res["systems"]:
        rows = [line for line in md.splitlines() if line.startswith(f"| {system['label']} |")]
        assert rows, f"no row for {system['label']} in results.md:\n{md}"
        skipped = {s["system"] for s in res["skipped"]}
        if system["key"] not in skipped:
            measured = [
                r for r in res["medians"] if r["system"] == system["key"] and r["requests"] > 0
            ]
            assert measured, f"{system['key']} served no request"
    assert res["ipc"], "the ipc round-trip bench did not run"
    assert res["raw"]["identity"]["rows"], "the raw model loop did not run"
    assert "## Targets" in md
