"""The one frozen settings tree, shared by every process.

Sources, later wins: defaults < TOML file < ``RINGSERVE_<SECTION>_<KEY>`` (and
``RINGSERVE_MODELS_<NAME>_<KEY>``) environment variables < command-line flags. Every value is checked once, at start, and a bad one
raises ``ConfigError`` naming its key. Children get the resolved tree as JSON
(``to_json``/``from_json``), never by re-reading sources, so all processes agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ringserve.ipc.errors import ConfigError

HANDLER_KINDS = ("identity", "digits", "torchvision", "torchscript", "python")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    frontends: int = 2
    instance: str = ""  # names the shared memory and default admin socket; "" = from the port
    admin_socket: str = ""  # "" = <runtime dir>/ringserve-<instance>.sock
    admin_socket_group: str = ""  # "" = mode 0600 for the owner only; else 0660 and this group
    metrics_port: int = 0  # 0 = /metrics on the main port only
    # KServe v2 over gRPC (Triton's GRPCInferenceService) on this port too; 0 = off.
    # Triton's default is 8001.
    grpc_port: int = 0
    drain_timeout_s: float = 30.0
    request_timeout_s: float = 30.0  # default deadline; header X-Request-Timeout-Ms overrides
    read_timeout_s: float = 30.0  # a client must send its whole request (head + body) in this
    # An idle keep-alive connection is closed after this. A proxy or load balancer in
    # front must give up its idle connections first (nginx site: 4 s; raise both
    # together, e.g. above an AWS ALB's 60 s idle timeout when it talks to us directly).
    keep_alive_s: float = 5.0
    max_body_bytes: int = 8 * 2**20
    max_image_pixels: int = 40_000_000  # decoded-size cap against image bombs
    startup_timeout_s: float = 180.0
    log_format: str = "text"  # text | json
    log_level: str = "info"
    access_log: bool = False
    # Triton's system shared-memory extension: clients on this host may have the server
    # map shared memory they name (frontend/client_shm.py). Off unless trusted, as in
    # Triton (--allow-client-shm).
    allow_client_shm: bool = False
    # Triton's model control (--model-control-mode=explicit): clients may unload a model
    # (its workers stop) and load it again (its configured workers start), over v2's
    # repository routes. Off: anyone who reaches the port could stop a model.
    allow_model_control: bool = False
    # A v2 infer response over 1 KiB is compressed (gzip or deflate) when the request's
    # Accept-Encoding asks, as Triton does; off spares the CPU where the client is a
    # proxy on the same host (python's requests and httpx ask by default).
    compress_responses: bool = True


@dataclass(frozen=True)
class ArenaSettings:
    slots: int = 256
    slot_bytes: int = 1 * 2**20
    max_queue_depth: int = 0  # per model; 0 = no limit beyond the slots themselves
    shm_dir: str = "/dev/shm"  # where the arena file lives (a tmpfs)


@dataclass(frozen=True)
class WorkerSettings:
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 15.0  # a worker silent this long is killed and replaced
    start_timeout_s: float = 180.0  # model load bound; raise it for huge models
    stop_timeout_s: float = 30.0  # finish the current batch and exit, else SIGKILL
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0


@dataclass(frozen=True)
class MemorySettings:
    sample_interval_s: float = 3.0
    uss_limit_mb: float = 0.0  # 0 = off
    uss_limit_samples: int = 3
    warmup_s: float = 60.0
    trend_window_s: float = 300.0
    trend_min_mb_per_min: float = 0.0  # 0 = trend rule off
    gpu_allocated_limit_mb: float = 0.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_age_s: float = 0.0
    min_recycle_interval_s: float = 30.0


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    preferred_batch_size: int = 0  # 0 = profile at warm-up and pick the fastest size


def cuda_index(device: str) -> int:
    """The GPU a valid ``cuda[:N]`` names: ``cuda`` is ``cuda:0``, as torch reads it."""
    return int(device.partition(":")[2] or 0)


@dataclass(frozen=True)
class ModelSettings:
    name: str
    handler: str
    workers: int = 1
    device: str = "cpu"
    threads: int = 1
    # CPU: the workers of this model share ``threads``: alone, a worker uses them all;
    # k workers running batches at once use threads // k each (gpu_worker/cpu_share.py)
    threads_shared: bool = False
    weights: str = ""
    # Serve the handler's ``model`` through torch.compile, a graph per batch size compiled
    # at start (gpu_worker/compiled.py)
    compile: bool = False
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices the model's workers take in turn: ``device`` split at commas. With
        ``cuda:0,cuda:1`` its first worker position runs on GPU 0, the second on GPU 1,
        the third on GPU 0 again: one model name and one queue over several GPUs (what
        Triton's ``instance_group`` with ``gpus`` does)."""
        return tuple(self.device.split(","))

    def worker_device(self, rank: int) -> str:
        """The device of the model's ``rank``-th worker position (0 = its first)."""
        devices = self.devices
        return devices[rank % len(devices)]


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    arena: ArenaSettings = field(default_factory=ArenaSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    models: tuple[ModelSettings, ...] = ()

    @property
    def instance(self) -> str:
        return self.server.instance or f"p{self.server.port}"

    def model_index(self, name: str) -> int:
        for i, m in enumerate(self.models):
            if m.name == name:
                return i
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        models = tuple(
            ModelSettings(**{**m, "batching": BatchingSettings(**m["batching"])})
            for m in raw.pop("models")
        )
        return cls(
            server=ServerSettings(**raw["server"]),
            arena=ArenaSettings(**raw["arena"]),
            worker=WorkerSettings(**raw["worker"]),
            memory=MemorySettings(**raw["memory"]),
            batching=BatchingSettings(**raw["batching"]),
            models=models,
        )


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "arena": ArenaSettings,
    "worker": WorkerSettings,
    "memory": MemorySettings,
    "batching": BatchingSettings,
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSettings)} - {"name"}

DEFAULT_MODEL = ModelSettings(name="digits", handler="digits")

# Names that become file names, URL path segments, Prometheus labels and environment
# variable names: ASCII only ("é".isalnum() is true, and the arena's and the metrics
# directory's names are matched as ASCII), not made of dots alone ("/v1/models/../predict"
# is normalised away by every HTTP client), and short enough for a socket path.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME = 128
# Durations: a deadline is written as CLOCK_MONOTONIC nanoseconds in an int64 (1e300 s
# made every request a 500); nothing here needs more than about four months.
MAX_SECONDS = 10_000_000.0
# The arena: a slot count past this is no in-flight bound, and slots x slot_bytes must fit
# the file offsets of the shared memory (2**62 overflowed posix_fallocate: a traceback).
MAX_SLOTS = 2**20
MAX_SLOT_BYTES = 2**40
# Processes: a model's workers as ``ctl scale`` takes them, frontends one a core of the
# largest hosts. (--workers 100000 passed, and started processes until the host gave out.)
MAX_WORKERS = 64
MAX_FRONTENDS = 256
# A heartbeat or memory sample more often than this is a busy loop, not a check.
MIN_INTERVAL_S = 0.01
# A device index torch parses (it refuses "cuda:01", "cuda:\u0663", and past int32).
_DEVICE = re.compile(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?")


def valid_name(name: str) -> bool:
    """A model or instance name: see ``_NAME``."""
    return len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None and name.strip(".") != ""


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a TOML/env/flag value into the field's type, or fail naming the key."""
    if isinstance(typ, str):  # annotations are strings under `from __future__ import annotations`
        typ = _SCALARS.get(typ, typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                return int(value)
            except ValueError:
                raise ValueError("expected an integer") from None
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            try:
                number = float(value)
            except ValueError:
                raise ValueError("expected a number") from None
            if not math.isfinite(number):  # inf passed every "> 0" check and turned
                raise ValueError("expected a finite number")  # sampling or hang checks off
            return number
        if typ is str:
            if key.endswith(".device") and isinstance(value, list):
                # TOML's own spelling of several devices: ["cuda:0", "cuda:1"]
                if not value or not all(isinstance(v, str) for v in value):
                    raise ValueError("expected a device or a list of devices")
                return ",".join(value)
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e} (got {value!r})") from None
    return value


def _section(
    cls: type,
    key_prefix: str,
    values: Mapping[str, Any],
    base: Any = None,
    origins: Mapping[str, str] | None = None,
) -> Any:
    """``origins``: the environment variable each key's value came from, if it did, so
    that an error names the line of ``/etc/default/ringserve`` to fix, not only the key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = dataclasses.asdict(base) if base is not None else {}
    origins = origins or {}
    for k, v in values.items():
        try:
            if k not in known:
                raise ConfigError(
                    f"{key_prefix}{k}: unknown key (known: {', '.join(sorted(known))})"
                )
            kwargs[k] = _coerce(f"{key_prefix}{k}", v, known[k].type)
        except ConfigError as e:
            if k in origins:
                raise ConfigError(f"{origins[k]}: {e}") from None
            raise
    return cls(**kwargs)


def _model(
    name: str, values: Mapping[str, Any], default_batching: BatchingSettings
) -> ModelSettings:
    values = dict(values)
    unknown = set(values) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"models.{name}.{sorted(unknown)[0]}: unknown key")
    if not isinstance(values.get("batching", {}), Mapping):
        raise ConfigError(f"models.{name}.batching: expected a table")
    batching = _section(
        BatchingSettings, f"models.{name}.batching.", values.pop("batching", {}), default_batching
    )
    options = values.pop("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"models.{name}.options: expected a table")
    base = ModelSettings(name=name, handler=str(values.get("handler", "")))
    kwargs = {
        k: _coerce(f"models.{name}.{k}", v, type(getattr(base, k))) for k, v in values.items()
    }
    return dataclasses.replace(base, **kwargs, batching=batching, options=dict(options))


def _validate(s: Settings) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(0 <= s.server.port <= 65535, "server.port", "must be 0..65535")
    need(
        0 <= s.server.metrics_port <= 65535,
        "server.metrics_port",
        "must be 0..65535 (0 = /metrics on the main port only)",
    )
    need(
        not s.server.metrics_port or s.server.metrics_port != s.server.port,
        "server.metrics_port",
        "must differ from server.port",
    )
    need(0 <= s.server.grpc_port <= 65535, "server.grpc_port", "must be 0..65535 (0 = no gRPC)")
    need(
        not s.server.grpc_port or s.server.grpc_port not in (s.server.port, s.server.metrics_port),
        "server.grpc_port",
        "must differ from server.port and server.metrics_port",
    )
    need(s.server.startup_timeout_s >= 0, "server.startup_timeout_s", "must be >= 0 (0 = no limit)")
    need(
        1 <= s.server.frontends <= MAX_FRONTENDS,
        "server.frontends",
        f"must be from 1 to {MAX_FRONTENDS}",
    )
    need(s.server.log_format in ("text", "json"), "server.log_format", "must be text or json")
    need(
        s.server.log_level in LOG_LEVELS,
        "server.log_level",
        f"must be one of {', '.join(LOG_LEVELS)}",
    )
    need(s.server.max_body_bytes > 0, "server.max_body_bytes", "must be positive")
    need(s.server.request_timeout_s > 0, "server.request_timeout_s", "must be positive")
    need(s.server.read_timeout_s > 0, "server.read_timeout_s", "must be positive")
    need(s.server.keep_alive_s > 0, "server.keep_alive_s", "must be positive")
    need(s.server.drain_timeout_s >= 0, "server.drain_timeout_s", "must be >= 0")
    need(s.server.max_image_pixels >= 1, "server.max_image_pixels", "must be at least 1")
    need(s.arena.slots >= s.server.frontends, "arena.slots", "must be at least server.frontends")
    need(s.arena.slots <= MAX_SLOTS, "arena.slots", f"must be at most {MAX_SLOTS}")
    need(s.arena.slot_bytes >= 4096, "arena.slot_bytes", "must be at least 4096")
    need(
        s.arena.slot_bytes <= MAX_SLOT_BYTES,
        "arena.slot_bytes",
        f"must be at most {MAX_SLOT_BYTES} (1 TiB)",
    )
    need(s.arena.max_queue_depth >= 0, "arena.max_queue_depth", "must be >= 0")
    # A depth the slots can never hold never binds: the 503s would come at arena.slots.
    need(
        s.arena.max_queue_depth <= s.arena.slots,
        "arena.max_queue_depth",
        f"must be at most arena.slots ({s.arena.slots}), which bound every queue first; "
        "raise arena.slots for a deeper queue (0: no limit beyond the slots)",
    )
    need(
        s.worker.heartbeat_timeout_s > 2 * s.worker.heartbeat_interval_s,
        "worker.heartbeat_timeout_s",
        "must exceed twice worker.heartbeat_interval_s",
    )
    need(
        s.worker.heartbeat_interval_s >= MIN_INTERVAL_S,
        "worker.heartbeat_interval_s",
        f"must be at least {MIN_INTERVAL_S} s",
    )
    # 0 killed every worker as it started, and the start retried until startup_timeout_s
    need(s.worker.start_timeout_s > 0, "worker.start_timeout_s", "must be positive")
    # 0 SIGKILLed every recycled or drained worker mid-batch: its requests ran again, and
    # one caught in two such kills failed as poison
    need(
        s.worker.stop_timeout_s > 0,
        "worker.stop_timeout_s",
        "must be positive (the seconds a stopping worker has to finish its batch)",
    )
    for k in ("restart_backoff_s", "restart_backoff_max_s"):
        need(getattr(s.worker, k) >= 0, f"worker.{k}", "must be >= 0")
    need(
        s.worker.restart_backoff_max_s >= s.worker.restart_backoff_s,
        "worker.restart_backoff_max_s",
        "must be at least worker.restart_backoff_s (the back-off starts there and grows)",
    )
    need(
        s.memory.sample_interval_s >= MIN_INTERVAL_S,
        "memory.sample_interval_s",
        f"must be at least {MIN_INTERVAL_S} s",
    )
    need(s.memory.trend_window_s > 0, "memory.trend_window_s", "must be positive")
    need(s.memory.uss_limit_samples >= 1, "memory.uss_limit_samples", "must be at least 1")
    for f in dataclasses.fields(MemorySettings):
        need(getattr(s.memory, f.name) >= 0, f"memory.{f.name}", "must be >= 0")
    _check_durations(s)
    # It names the shared memory, the admin socket and the metrics directory: checked
    # here, a config error, not a traceback from the first path made of it.
    need(
        not s.server.instance or valid_name(s.server.instance),
        "server.instance",
        f"use ASCII letters, digits, '-', '_' and '.' (not dots alone; at most {MAX_NAME})",
    )
    need(len(s.models) >= 1, "models", "at least one model is required")
    names = [m.name for m in s.models]
    need(len(set(names)) == len(names), "models", "model names must be unique")
    _check_env_spellings(names)
    for m in s.models:
        key = f"models.{m.name}"
        need(
            valid_name(m.name),
            key,
            "model names use ASCII letters, digits, '-', '_' and '.' (not dots alone; at "
            f"most {MAX_NAME} characters)",
        )
        need(
            bool(m.handler), f"{key}.handler", "required (identity, digits, torchvision:ARCH, ...)"
        )
        kind = m.handler.split(":", 1)[0]
        need(
            kind in HANDLER_KINDS,
            f"{key}.handler",
            f"unknown handler {m.handler!r} (one of: identity, digits, torchvision:ARCH, "
            "torchscript:PATH, python:MODULE:CLASS)",
        )
        need(
            kind not in ("torchscript", "torchvision") or bool(m.handler.partition(":")[2]),
            f"{key}.handler",
            f"{kind} needs what to serve: {kind}:{'PATH' if kind == 'torchscript' else 'ARCH'}",
        )
        need(
            kind not in ("identity", "digits") or ":" not in m.handler,
            f"{key}.handler",
            f"{kind} takes no argument (it was ignored): {kind!r}, not {m.handler!r}",
        )
        need(
            kind != "python" or _is_python_handler(m.handler),
            f"{key}.handler",
            f"python handlers are python:MODULE:CLASS, not {m.handler!r}",
        )
        need(
            1 <= m.workers <= MAX_WORKERS,
            f"{key}.workers",
            f"must be from 1 to {MAX_WORKERS} (as ctl scale takes)",
        )
        need(m.threads >= 1, f"{key}.threads", "must be at least 1")
        devices = m.devices
        need(
            all(_DEVICE.fullmatch(d) is not None for d in devices),
            f"{key}.device",
            "must be cpu or cuda[:N] (N a device index: 0, 1, ...), or CUDA devices "
            "separated by commas (cuda:0,cuda:1) for workers taking them in turn",
        )
        need(  # (the devices are valid from here: the check above raised otherwise)
            len(devices) == 1
            or ("cpu" not in devices and len({cuda_index(d) for d in devices}) == len(devices)),
            f"{key}.device",
            f"a list of devices names distinct CUDA devices, not {m.device!r}",
        )
        need(
            not (m.compile and m.threads_shared and m.device == "cpu"),
            f"{key}.compile",
            "cannot go with threads_shared on a CPU: a compiled model's thread count is "
            "fixed when it compiles, so it could not give threads up",
        )
        need(
            not m.compile or kind != "torchscript",
            f"{key}.compile",
            "a TorchScript archive cannot be compiled (serve its eager model through a "
            "python: handler to compile it)",
        )
        b = m.batching
        need(b.max_batch_size >= 1, f"{key}.batching.max_batch_size", "must be at least 1")
        need(b.max_queue_delay_ms >= 0, f"{key}.batching.max_queue_delay_ms", "must be >= 0")
        need(
            0 <= b.preferred_batch_size <= b.max_batch_size,
            f"{key}.batching.preferred_batch_size",
            "must be 0..max_batch_size",
        )


def _check_durations(s: Settings) -> None:
    """Every duration at most ``MAX_SECONDS`` (finite ones only come this far)."""
    sections = [(k, getattr(s, k)) for k in SECTIONS]
    sections += [(f"models.{m.name}.batching", m.batching) for m in s.models]
    for prefix, section in sections:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            limit = MAX_SECONDS * (1000 if f.name.endswith("_ms") else 1)
            if f.name.endswith(("_s", "_ms")) and value > limit:
                unit = "ms" if f.name.endswith("_ms") else "s"
                raise ConfigError(f"{prefix}.{f.name}: must be at most {limit:.0f} {unit}")


def _check_env_spellings(names: Sequence[str]) -> None:
    """Two models whose ``RINGSERVE_MODELS_<NAME>_`` is the same variable prefix ("a-b"
    and "a_b", "A" and "a") could not be told apart by an environment override."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(_env_name(name), name)
        if other != name:
            raise ConfigError(
                f"models.{name}: its environment variables (RINGSERVE_MODELS_"
                f"{_env_name(name).upper()}_<KEY>) are also model {other}'s: rename one "
                "(a variable name has no '-' or '.' and no case)"
            )


def _is_python_handler(handler: str) -> bool:
    """``python:MODULE:CLASS`` with a dotted module path and a class name: checked here,
    so a missing part is a config error at start, not a worker failing to load it."""
    module, _, cls = handler.removeprefix("python:").partition(":")
    return all(p.isidentifier() for p in module.split(".")) and cls.isidentifier()


def _env_origins(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{section: {key: variable}}`` for the ``RINGSERVE_<SECTION>_<KEY>`` variables."""
    out: dict[str, dict[str, str]] = {}
    for name in environ:
        if not name.startswith("RINGSERVE_"):
            continue
        rest = name[len("RINGSERVE_") :].lower()
        section, _, key = rest.partition("_")
        if section in SECTIONS and key:
            out.setdefault(section, {})[key] = name
    return out


def _env_name(model: str) -> str:
    return model.lower().replace("-", "_").replace(".", "_")


def _env_model_sets(environ: Mapping[str, str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``RINGSERVE_MODELS_<NAME>_<KEY>`` (or ``..._BATCHING_<KEY>``, or ``..._OPTIONS_<KEY>``
    for a handler option, read as ``--set`` reads it) for the served models,
    matched case-insensitively (the longest name first: names and keys may hold "_"; a
    shorter name whose key that leaves is one, when the longer one's is not: models "a"
    and "a_batching"). A variable that names no model or key is an error, not silently
    dropped."""
    out: dict[str, dict[str, Any]] = {}
    batching_keys = {f.name for f in dataclasses.fields(BatchingSettings)}

    def kind(key: str) -> str | None:
        if key in MODEL_KEYS - {"batching", "options"}:
            return "model"
        if key.startswith("batching_") and key[len("batching_") :] in batching_keys:
            return "batching"
        if key.startswith("options_") and len(key) > len("options_"):
            return "options"
        return None

    for var, value in environ.items():
        if not var.startswith("RINGSERVE_MODELS_"):
            continue
        rest = var[len("RINGSERVE_MODELS_") :].lower()
        # A variable name cannot hold '-' or '.': model "resnet-50" is RESNET_50 there.
        matches = sorted(
            (n for n in names if rest.startswith(_env_name(n) + "_")), key=len, reverse=True
        )
        if not matches:
            raise ConfigError(f"{var}: names no served model (models: {', '.join(names)})")
        name = next((n for n in matches if kind(rest[len(n) + 1 :]) is not None), matches[0])
        key = rest[len(name) + 1 :]
        what = kind(key)
        if what == "model":
            out.setdefault(name, {})[key] = value
        elif what == "batching":
            out.setdefault(name, {}).setdefault("batching", {})[key[len("batching_") :]] = value
        elif what == "options":
            model_set(f"{name}.options.{key[len('options_') :]}", value, out)
        else:
            raise ConfigError(f"{var}: models.{name}.{key.replace('_', '.', 1)}: unknown key")
    return out


INTERNAL_ENV = ("RINGSERVE_CHILD", "RINGSERVE_TEST_", "RINGSERVE_PERF_ANALYZER")


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """ringserve's directory in the user's cache: the batch profiles and compiled models
    (systemd sets ``XDG_CACHE_HOME=/var/cache/ringserve``)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME", "~"), ".cache")
    return os.path.join(os.path.expanduser(base), "ringserve")


def unused_env(environ: Mapping[str, str]) -> list[str]:
    """``RINGSERVE_*`` variables that configure nothing (a misspelt section, say), for a
    warning: they cannot be errors, since other tools may use the prefix."""
    return sorted(
        var
        for var in environ
        if var.startswith("RINGSERVE_")
        and not var.startswith(INTERNAL_ENV)
        and var[len("RINGSERVE_") :].lower().partition("_")[0] not in (*SECTIONS, "models")
    )


def load_settings(
    path: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    models: list[tuple[str, str]] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    model_sets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Resolve defaults < file < environment < ``overrides`` (flags) into Settings.

    ``models`` (from ``--model NAME=HANDLER``) replaces the file's model list;
    ``model_overrides`` (``--workers``, ``--device``, ...) applies to every model, and
    ``model_sets`` (``--set models.NAME.KEY=VALUE``, see ``model_set``) to one, over
    everything else.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:  # not readable by this user, a directory: was a traceback
            raise ConfigError(f"config file {path}: cannot read it: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    unknown = set(raw) - set(SECTIONS) - {"models"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section")
    for k in SECTIONS:
        if not isinstance(raw.get(k, {}), Mapping):
            raise ConfigError(f"{k}: expected a table")
    layered: dict[str, dict[str, Any]] = {k: dict(raw.get(k, {})) for k in SECTIONS}
    # The variable each key's value came from, for as long as no flag overrides it.
    origins = _env_origins(environ)
    for section, keys in origins.items():
        layered[section].update({key: environ[var] for key, var in keys.items()})
    for section, values in (overrides or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section")
        layered[section].update(values)
        for key in values:
            origins.get(section, {}).pop(key, None)
    built = {
        k: _section(cls, f"{k}.", layered[k], origins=origins.get(k)) for k, cls in SECTIONS.items()
    }
    file_models = raw.get("models", {})
    if not isinstance(file_models, Mapping):
        raise ConfigError("models: expected a table of tables")
    if models:
        named = [name for name, _ in models]
        if dup := next((n for n in named if named.count(n) > 1), None):
            raise ConfigError(f"--model {dup}: given more than once")
        table = {name: {**file_models.get(name, {}), "handler": h} for name, h in models}
        if dropped := [name for name in file_models if name not in table]:
            logging.getLogger("ringserve.supervisor").warning(
                "--model replaces the models of the config file: %s not served (give "
                "each with --model too to keep it)",
                ", ".join(dropped),
            )
    else:
        table = dict(file_models) or {DEFAULT_MODEL.name: {"handler": DEFAULT_MODEL.handler}}
    model_sets = model_sets or {}
    for name in model_sets:
        if name not in table:
            raise ConfigError(
                f"models.{name}: no such model (models: {', '.join(table)}); --set takes "
                "models.NAME.KEY, models.NAME.batching.KEY or models.NAME.options.KEY"
            )
    env_sets = _env_model_sets(environ, list(table))
    model_list = []
    for name, values in table.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"models.{name}: expected a table")
        merged = {**values}
        # Environment < flags, as for sections; one key of a table (batching, options)
        # is set over the others, not in place of them (an environment option dropped
        # the file's other options). A table given as a plain value ("--set
        # models.a.batching=4", or in the file) stays so, for ``_model`` to refuse.
        for source in (env_sets.get(name, {}), model_overrides or {}, model_sets.get(name, {})):
            for k, v in source.items():
                if k in ("batching", "options") and isinstance(v, Mapping):
                    if not isinstance(merged.get(k, {}), Mapping):
                        continue  # the file's is no table: refused below, naming it
                    v = {**merged.get(k, {}), **v}
                merged[k] = v
        model_list.append(_model(name, merged, built["batching"]))
    settings = Settings(**built, models=tuple(model_list))
    _validate(settings)
    return settings


def settings_changes(old: Settings, new: Settings, limit: int = 8) -> list[str]:
    """What differs from ``old`` in ``new``, one ``key: old -> new`` line per setting
    (``models.NAME: added``/``removed`` for a whole model), at most ``limit`` lines and
    then how many more: what a SIGHUP, which keeps the configuration the supervisor
    started with, tells an operator who edited the file that it did not apply."""
    out: list[str] = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in [*a, *(k for k in b if k not in a)]:
                walk(f"{prefix}{key}.", a.get(key, "(unset)"), b.get(key, "(unset)"))
        elif a != b:
            out.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    old_models = {m.pop("name"): m for m in a.pop("models")}
    new_models = {m.pop("name"): m for m in b.pop("models")}
    walk("", a, b)
    for name, model in old_models.items():
        if name not in new_models:
            out.append(f"models.{name}: removed")
        else:
            walk(f"models.{name}.", model, new_models[name])
    out += [f"models.{name}: added" for name in new_models if name not in old_models]
    if len(out) > limit:
        out[limit:] = [f"and {len(out) - limit} more"]
    return out


def model_set(path: str, value: str, into: dict[str, dict[str, Any]]) -> None:
    """File ``--set models.PATH=VALUE`` into ``into`` (``load_settings``'s ``model_sets``):
    PATH is ``NAME.KEY``, ``NAME.batching.KEY`` or ``NAME.options.KEY``. A handler option
    is read as a TOML value when it is one (``224``, ``true``, ``"a b"``), else as text."""
    # Keys hold no '.', a model name may ("resnet.v2"): the name is what comes before.
    parts = path.split(".")
    if len(parts) >= 3 and parts[-2] in ("batching", "options") and all(parts):
        name, table, key = ".".join(parts[:-2]), parts[-2], parts[-1]
        if table == "options":
            with contextlib.suppress(tomllib.TOMLDecodeError):  # else plain text
                value = tomllib.loads(f"v = {value}")["v"]
        into.setdefault(name, {}).setdefault(table, {})[key] = value
        return
    if len(parts) >= 2 and all(parts):
        into.setdefault(".".join(parts[:-1]), {})[parts[-1]] = value
        return
    raise ConfigError(
        f"--set models.{path}: expected models.NAME.KEY, models.NAME.batching.KEY "
        "or models.NAME.options.KEY"
    )


def field_docs() -> list[str]:
    """``section.key = default`` lines for ``serve --help``."""
    lines = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else ""
            lines.append(f"{section}.{f.name} = {default!r}")
    for f in dataclasses.fields(ModelSettings):
        if f.name not in ("name", "batching", "options"):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            lines.append(f"models.NAME.{f.name} = {default!r}")
    lines.append(
        "models.NAME.batching.* = as [batching]; models.NAME.options = {...} for the handler"
    )
    return lines
