"""The Kubernetes example (systemd/k8s/ringserve.yaml) agrees with ringserve itself.

No cluster here: the manifest is parsed with ``yaml.safe_load_all`` and its numbers are
checked against ringserve's settings as the server would resolve them from the
ConfigMap (``load_settings``), against the defaults in ``ringserve.ipc.config`` and
against the routes the frontend serves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from ringserve.ipc.arena import ArenaGeometry
from ringserve.ipc.config import ArenaSettings, ServerSettings, Settings, load_settings

MANIFEST = REPO / "systemd" / "k8s" / "ringserve.yaml"
FRONTEND_APP = REPO / "frontend" / "app.py"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(value: str | int) -> int:
    """A Kubernetes memory quantity in bytes (``512Mi``, ``1G``, ``1048576``)."""
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", str(value))
    assert m, f"unsupported quantity {value!r}"
    return int(m.group(1)) * UNITS.get(m.group(2) or "", 1)


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc:
            assert doc["kind"] not in out, f"two {doc['kind']} documents"
            out[doc["kind"]] = doc
    assert set(out) == {"ConfigMap", "Deployment", "Service"}
    return out


@pytest.fixture(scope="module")
def settings(docs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """What ``ringserve serve --config /etc/ringserve/ringserve.toml`` resolves in the pod."""
    toml = docs["ConfigMap"]["data"]["ringserve.toml"]
    path = tmp_path_factory.mktemp("cfg") / "ringserve.toml"
    path.write_text(toml)
    return load_settings(str(path), environ={})


@pytest.fixture(scope="module")
def pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["containers"]
    return c


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return match


def test_config_is_valid_and_listens_on_the_default_port(settings: Settings) -> None:
    assert settings.server.port == ServerSettings().port
    assert settings.server.host == "0.0.0.0", "in a pod, loopback is unreachable from probes"
    assert settings.models, "the ConfigMap serves no model"


def test_command_reads_the_mounted_config(docs, container) -> None:
    cmd = container["command"]
    assert cmd[:2] == ["ringserve", "serve"]
    config = cmd[cmd.index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config == f"{mount['mountPath']}/ringserve.toml"
    volume = next(
        v
        for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "config"
    )
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]


def test_probes_hit_ringserves_routes_and_port(container, settings: Settings) -> None:
    routes = set(re.findall(r'Route\("([^"]+)"', FRONTEND_APP.read_text()))
    assert {"/health", "/readiness"} <= routes
    probes = {
        k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/readiness"
    for name, probe in probes.items():
        assert container_port(container, probe["port"]) == settings.server.port, name
        assert container_port(container, probe["port"]) == ServerSettings().port, name
    # No liveness verdict while the model may still be loading.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.worker.start_timeout_s
    assert (
        settings.server.startup_timeout_s <= startup["periodSeconds"] * startup["failureThreshold"]
    )


def test_grace_period_covers_prestop_drain_and_stop(pod, container, settings: Settings) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop_s + ServerSettings().drain_timeout_s
    from ringserve.frontend.process import STOP_GRACE_S

    stop_s = settings.server.drain_timeout_s + STOP_GRACE_S + settings.worker.stop_timeout_s
    assert grace > pre_stop_s + stop_s


def test_orphans_are_reaped_by_the_pods_pause_process(pod) -> None:
    """ringserve reaps its own children, not the orphans of a replaced worker (a
    compile worker, a handler's subprocess): as the container's PID 1 it left each one a
    zombie. With the process namespace shared, the pause process is PID 1 and reaps them."""
    assert pod.get("shareProcessNamespace") is True


def test_dev_shm_holds_the_arena(pod, container, settings: Settings) -> None:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == settings.arena.shm_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = quantity(volume["emptyDir"]["sizeLimit"])
    defaults = ArenaSettings()
    assert size >= defaults.slots * defaults.slot_bytes
    # The arena as the supervisor creates it: slots, slot headers, rings, control blocks.
    s = settings
    workers = sum(m.workers for m in s.models)
    geometry = ArenaGeometry(
        n_slots=s.arena.slots,
        slot_bytes=s.arena.slot_bytes,
        n_models=len(s.models),
        n_procs=s.server.frontends + 2 * workers + 64,
        n_frontends=s.server.frontends,
    )
    assert size >= geometry.offsets()["total"]
    # The tmpfs counts against the container's memory limit.
    assert quantity(container["resources"]["limits"]["memory"]) > size


def test_gpu_is_requested_and_matches_the_devices(container, settings: Settings) -> None:
    res = container["resources"]
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(res["requests"]["nvidia.com/gpu"]) == gpus  # extended resources: equal
    for m in settings.models:
        assert m.device.startswith("cuda"), f"model {m.name} does not use the GPU"
        index = int(m.device.partition(":")[2] or 0)
        assert index < gpus, f"model {m.name} wants {m.device} but the pod gets {gpus} GPU(s)"


def test_service_and_selector_reach_the_pods(docs, container, settings: Settings) -> None:
    dep, svc = docs["Deployment"], docs["Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    served = {"http": ServerSettings().port, "grpc": settings.server.grpc_port}
    assert served["grpc"], "the ConfigMap serves no gRPC"
    for port in svc["spec"]["ports"]:
        assert container_port(container, port["targetPort"]) == served[port["name"]]
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not drop below capacity"


def test_every_mount_has_a_volume(pod, container) -> None:
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    # readOnlyRootFilesystem: everything ringserve writes is a mounted volume.
    if container["securityContext"].get("readOnlyRootFilesystem"):
        paths = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= paths
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("XDG_CACHE_HOME") in paths


def test_manifest_file_is_where_the_docs_say(tmp_path: Path) -> None:
    assert "systemd/k8s/ringserve.yaml" in (REPO / "docs" / "deployment.md").read_text()
