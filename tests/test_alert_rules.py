"""Checks for the Prometheus rules, their unit tests and the Grafana dashboard.

Needs `promtool` (Debian: `apt-get install prometheus`; or set PROMTOOL=/path). A missing
promtool is a failure, not a skip: CI installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "systemd" / "prometheus"
RULES = PROM_DIR / "ringserve-alerts.yml"
RULE_TESTS = PROM_DIR / "ringserve-alerts.test.yml"
# Thresholds evaluated between the samples, as a real Prometheus evaluates them.
UNALIGNED_TESTS = PROM_DIR / "ringserve-alerts-unaligned.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "systemd" / "grafana" / "ringserve-dashboard.json"

# The metric contract: names as exposed on /metrics (counters with _total). Histograms
# are listed by base name; their _bucket/_sum/_count series are accepted.
HISTOGRAMS = frozenset(
    {
        "ringserve_request_duration_seconds",
        "ringserve_queue_wait_seconds",
        "ringserve_inference_duration_seconds",
        "ringserve_batch_size",
    }
)
EXPORTED_METRICS = HISTOGRAMS | frozenset(
    {
        "ringserve_requests_total",
        "ringserve_failed_request_seconds_total",
        "ringserve_batches_total",
        "ringserve_batch_runs_total",
        "ringserve_batch_stage_seconds_total",
        "ringserve_request_stage_seconds_total",
        "ringserve_computed_requests_total",
        "ringserve_ring_slots",
        "ringserve_queue_depth",
        "ringserve_queue_capacity",
        "ringserve_inflight_requests",
        "ringserve_intake_open",
        "ringserve_process_resident_memory_bytes",
        "ringserve_process_unique_memory_bytes",
        "ringserve_process_proportional_memory_bytes",
        "ringserve_process_open_fds",
        "ringserve_process_max_fds",
        "ringserve_process_start_time_seconds",
        "ringserve_process_heartbeat_age_seconds",
        "ringserve_worker_gpu_allocated_bytes",
        "ringserve_worker_gpu_reserved_bytes",
        "ringserve_worker_gpu_nvml_used_bytes",
        "ringserve_worker_memory_limit_bytes",
        "ringserve_worker_gpu_memory_limit_bytes",
        "ringserve_worker_recycles_total",
        "ringserve_process_restarts_total",
        "ringserve_requeued_requests_total",
        "ringserve_poison_requests_total",
        "ringserve_deadline_expired_total",
        "ringserve_cancelled_requests_total",
        "ringserve_http_refused_total",
        "ringserve_rejected_requests_total",
        "ringserve_last_batch_timestamp_seconds",
        "ringserve_workers_ready",
        "ringserve_workers_configured",
        "ringserve_worker_preferred_batch_size",
        "ringserve_profile_preferred_batch_size",
        "ringserve_build_info",
    }
)

REQUIRED_ALERTS = frozenset(
    {
        "RingserveWorkerMemoryLeak",
        "RingserveWorkerMemoryLimitSoon",
        "RingserveGpuMemoryLeak",
        "RingserveRecycleStorm",
        "RingserveCrashLoop",
        "RingserveNoReadyWorker",
        "RingserveHigh5xxRate",
        "RingserveP99LatencyHigh",
        "RingserveQueueSaturated",
        "RingserveRequestsRejected",
    }
)
SEVERITIES = frozenset({"critical", "warning", "info"})

# A full metric-name token: not part of a recording-rule name (level:metric:ops).
_METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])ringserve_[a-z0-9_]*[a-z0-9](?![A-Za-z0-9_:])")

# Grafana's built-in variables, replaced by what Grafana would put there.
_GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<query>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)


def _promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        pytest.fail(
            "promtool not found; install it (Debian: apt-get install -y prometheus) or set "
            "PROMTOOL=/path/to/promtool"
        )
    return path


def _run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [_promtool(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _rules() -> Iterator[dict]:
    for group in _load_yaml(RULES)["groups"]:
        yield from group["rules"]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


def _dashboard() -> dict:
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def _all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))  # collapsed rows nest panels


def _dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable."""
    found = []
    for panel in _all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            found.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(query)
        found.append((f"variable {var['name']!r}", m.group("query") if m else query))
    return found


def _substitute_grafana_vars(expr: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return _GRAFANA_BUILTINS.get(name, "x")

    return _GRAFANA_VAR.sub(repl, expr)


def _metric_names(text: str) -> set[str]:
    return set(_METRIC_TOKEN.findall(text))


def _unknown_metrics(names: set[str]) -> set[str]:
    unknown = set()
    for name in names:
        if name in EXPORTED_METRICS:
            continue
        base, _, suffix = name.rpartition("_")
        if suffix in {"bucket", "sum", "count"} and base in HISTOGRAMS:
            continue
        unknown.add(name)
    return unknown


# ---------------------------------------------------------------- promtool


def test_promtool_check_rules() -> None:
    proc = _run_promtool("check", "rules", RULES)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    proc = _run_promtool("test", "rules", RULE_TESTS)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_more_than_3_means_4_when_evaluations_fall_between_samples() -> None:
    """increase() extrapolates to its window's edges: exactly 3 crashes read 3.33 when
    the rule is evaluated between scrapes (a real Prometheus always is), and the alerts
    that say "more than 3" (> 3) paged on 3. promtool's own tests evaluate on the
    samples, where the extrapolation is nil."""
    proc = _run_promtool("test", "rules", UNALIGNED_TESTS)
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_example_config() -> None:
    # Also checks the rules file it loads.
    _run_promtool("check", "config", PROM_CONFIG)


# ---------------------------------------------------------------- rule structure


def test_required_alerts_are_complete() -> None:
    groups = {g["name"] for g in _load_yaml(RULES)["groups"]}
    assert "ringserve" in groups
    alerts = _alerts()
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    missing = REQUIRED_ALERTS - set(names)
    assert not missing, f"required alerts missing: {sorted(missing)}"
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("for"), f"{name}: needs a for: duration"
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: annotation {key} missing"


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in _load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"


def test_runbook_commands_name_real_targets() -> None:
    """Every ``ringserve ctl`` command a firing alert's runbook renders (promtool checks
    the rendering against the unit tests' expectations) parses, and names a process the
    way the admin socket does: ``ctl restart 0`` failed with "no worker '0'"."""
    from ringserve.supervisor.ctl import build_parser

    parser = build_parser()
    commands = []
    for case in _load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                runbook = alert.get("exp_annotations", {}).get("runbook", "")
                commands += re.findall(r"ringserve ctl ([a-z]+(?: [\w-]+){0,2})", runbook)
    assert commands, "no runbook renders a ctl command"
    placeholder = {"MODEL": "resnet", "N": "2"}  # as a reader fills them in
    for command in commands:
        ns = parser.parse_args([placeholder.get(w, w) for w in command.split()])
        if ns.command in ("drain", "restart", "recycle"):
            assert re.fullmatch(r"(worker|frontend)-\d+|all|server", ns.id), command


# ---------------------------------------------------------------- dashboard


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "instance"} <= variables.keys()

    panels = list(_all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]

    annotations = [a.get("expr", "") for a in dash["annotations"]["list"]]
    assert any(
        re.search(r"increase\(ringserve_worker_recycles_total\{[^}]*\}\[1m\]\)\)\s*>\s*0", e)
        for e in annotations
    ), "recycles must be marked by an annotation"


def test_dashboard_exprs_pass_promtool(tmp_path: Path) -> None:
    exprs = _dashboard_exprs(_dashboard())
    assert len(exprs) > 20
    rules = []
    for i, (where, expr) in enumerate(exprs):
        promql = _substitute_grafana_vars(expr)
        assert "$" not in promql, f"{where}: unknown Grafana variable in {promql!r}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": promql})
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    _run_promtool("check", "rules", path)


# ---------------------------------------------------------------- metric contract


def test_grafana_variable_substitution() -> None:
    got = _substitute_grafana_vars(
        'rate(m{a=~"$model", b=~"${instance:regex}", c="[[x]]"}[$__rate_interval])'
    )
    assert got == 'rate(m{a=~"x", b=~"x", c="x"}[1m])'


def test_metric_token_parser() -> None:
    text = (
        "instance_model:ringserve_requests:rate5m + "
        'rate(ringserve_requests_total{code="5.."}[5m]) ringserve_batch_size_bucket'
    )
    assert _metric_names(text) == {"ringserve_requests_total", "ringserve_batch_size_bucket"}
    assert _unknown_metrics({"ringserve_requests_total_count", "ringserve_batch_size_sum"}) == {
        "ringserve_requests_total_count"
    }


@pytest.mark.parametrize("path", [RULES, RULE_TESTS, DASHBOARD], ids=lambda p: p.name)
def test_referenced_metrics_are_exported(path: Path) -> None:
    names = _metric_names(path.read_text(encoding="utf-8"))
    assert names, f"no ringserve metrics found in {path.name}"
    unknown = _unknown_metrics(names)
    assert not unknown, f"{path.name} uses metrics outside the contract: {sorted(unknown)}"
