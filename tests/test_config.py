"""Settings resolution: defaults < TOML file < RINGSERVE_* environment < flags; bad values
fail fast naming the key, in the library and through the ``ringserve serve`` CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ringserve.ipc.config import (
    BatchingSettings,
    MemorySettings,
    ModelSettings,
    Settings,
    field_docs,
    load_settings,
    model_set,
    settings_changes,
)
from ringserve.ipc.errors import ConfigError, RingserveError


def write(tmp_path: Path, body: str, name: str = "ringserve.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


FULL = """
    [server]
    host = "0.0.0.0"
    port = 9100
    frontends = 3
    access_log = true
    drain_timeout_s = 12

    [arena]
    slots = 64
    slot_bytes = 65536

    [memory]
    uss_limit_mb = 2048
    max_requests = 1000
    max_requests_jitter = 100

    [batching]
    max_batch_size = 16
    max_queue_delay_ms = 5

    [models.a]
    handler = "identity"
    workers = 2
    threads = 2
    options = { scale = 2.5, tags = ["x", "y"] }

    [models.a.batching]
    max_batch_size = 8
    preferred_batch_size = 4

    [models.b]
    handler = "torchvision:resnet18"
    device = "cuda:1"
    weights = "/srv/w.pth"
"""


# -- sources and precedence ------------------------------------------------------------------


def test_defaults_serve_digits_on_localhost_8000():
    s = load_settings(environ={})
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 8000
    assert s.models == (ModelSettings(name="digits", handler="digits"),)
    assert s.instance == "p8000"
    assert s.memory == MemorySettings()
    assert s.model_index("digits") == 0
    with pytest.raises(KeyError):
        s.model_index("nope")


def test_toml_file_values(tmp_path):
    s = load_settings(write(tmp_path, FULL), environ={})
    assert (s.server.host, s.server.port, s.server.frontends) == ("0.0.0.0", 9100, 3)
    assert s.server.access_log is True
    assert s.server.drain_timeout_s == 12.0 and isinstance(s.server.drain_timeout_s, float)
    assert (s.arena.slots, s.arena.slot_bytes) == (64, 65536)
    assert s.memory.uss_limit_mb == 2048.0
    assert (s.memory.max_requests, s.memory.max_requests_jitter) == (1000, 100)
    assert [m.name for m in s.models] == ["a", "b"]
    a, b = s.models
    assert (a.handler, a.workers, a.threads) == ("identity", 2, 2)
    assert a.options == {"scale": 2.5, "tags": ["x", "y"]}
    # per-model batching overrides the [batching] section, which fills in the rest
    assert a.batching == BatchingSettings(8, 5.0, 4)
    assert b.batching == BatchingSettings(16, 5.0, 0)
    assert (b.handler, b.device, b.weights, b.workers) == (
        "torchvision:resnet18",
        "cuda:1",
        "/srv/w.pth",
        1,
    )


def test_env_overrides_file(tmp_path):
    path = write(tmp_path, FULL)
    env = {
        "RINGSERVE_SERVER_PORT": "9200",
        "RINGSERVE_SERVER_ACCESS_LOG": "off",
        "RINGSERVE_MEMORY_USS_LIMIT_MB": "512",
        "RINGSERVE_ARENA_SLOT_BYTES": "8192",
        "RINGSERVE_BATCHING_MAX_BATCH_SIZE": "12",
        "PATH": "/usr/bin",  # not ours: ignored
        "RINGSERVE_NOTASECTION_X": "1",  # not a section: ignored
    }
    s = load_settings(path, environ=env)
    assert s.server.port == 9200
    assert s.server.access_log is False
    assert s.memory.uss_limit_mb == 512.0
    assert s.arena.slot_bytes == 8192
    assert s.server.host == "0.0.0.0"  # untouched keys keep the file's value
    assert s.batching.max_batch_size == 12
    assert s.models[1].batching.max_batch_size == 12  # models inherit the resolved default


def test_env_sets_one_models_keys_below_the_flags():
    models = [("digits", "digits"), ("res_net", "torchvision:resnet18")]
    env = {
        "RINGSERVE_MODELS_DIGITS_WORKERS": "2",
        "RINGSERVE_MODELS_RES_NET_THREADS": "3",  # "_" in the name and in keys
        "RINGSERVE_MODELS_RES_NET_BATCHING_MAX_QUEUE_DELAY_MS": "7.5",
        # a handler option, read as --set reads it (a TOML value, else text)
        "RINGSERVE_MODELS_RES_NET_OPTIONS_IMAGE_SIZE": "64",
        "RINGSERVE_MODELS_RES_NET_OPTIONS_LABELS_FILE": "/srv/labels.txt",
    }
    s = load_settings(models=models, environ=env)
    assert s.models[0].workers == 2 and s.models[1].threads == 3
    assert s.models[1].batching.max_queue_delay_ms == 7.5
    assert s.models[1].options == {"image_size": 64, "labels_file": "/srv/labels.txt"}
    flagged = load_settings(models=models, environ=env, model_sets={"digits": {"workers": 4}})
    assert flagged.models[0].workers == 4
    fails(
        "RINGSERVE_MODELS_NOPE_WORKERS",
        models=models,
        environ={"RINGSERVE_MODELS_NOPE_WORKERS": "2"},
    )
    fails("models.digits.wrokers", models=models, environ={"RINGSERVE_MODELS_DIGITS_WROKERS": "2"})


def test_unused_env_is_reported_for_a_warning():
    from ringserve.ipc.config import unused_env

    env = {
        "RINGSERVE_SERVRE_FRONTENDS": "3",
        "RINGSERVE_SERVER_PORT": "1",
        "RINGSERVE_MODELS_X_WORKERS": "1",
        "RINGSERVE_CHILD": "1",
        "HOME": "/root",
    }
    assert unused_env(env) == ["RINGSERVE_SERVRE_FRONTENDS"]


def test_env_read_from_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("RINGSERVE_SERVER_PORT", "9300")
    assert load_settings().server.port == 9300


def test_flags_override_env_and_file(tmp_path):
    path = write(tmp_path, FULL)
    s = load_settings(
        path,
        overrides={"server": {"port": 9400}, "memory": {"max_requests": "77"}},
        environ={"RINGSERVE_SERVER_PORT": "9200", "RINGSERVE_MEMORY_MAX_REQUESTS": "5"},
    )
    assert s.server.port == 9400
    assert s.memory.max_requests == 77
    assert s.server.frontends == 3  # from the file


def test_model_list_replaces_file_models_keeping_their_settings(tmp_path, caplog):
    path = write(tmp_path, FULL)
    s = load_settings(path, models=[("a", "python:mymod:Cls"), ("c", "identity")], environ={})
    assert [m.name for m in s.models] == ["a", "c"]  # b dropped, c added
    # ... and said so: a user adding one model with --model lost the file's others silently.
    assert "--model replaces the models of the config file: b not served" in caplog.text
    a, c = s.models
    assert a.handler == "python:mymod:Cls"  # the flag's handler wins
    assert (a.workers, a.threads, a.batching.max_batch_size) == (2, 2, 8)  # file settings kept
    assert a.options == {"scale": 2.5, "tags": ["x", "y"]}
    assert (c.workers, c.batching) == (1, BatchingSettings(16, 5.0, 0))


def test_a_model_named_with_dash_or_dot_is_set_by_env_and_by_set(tmp_path):
    """Model names may hold '-' and '.' ("resnet-50", "bert.v2"), but a variable name
    cannot, and --set split the name at its dot: neither override reached such a model
    (new-user probe). In variables '-' and '.' are '_'; --set takes the name up to the
    key."""
    path = write(
        tmp_path,
        '[models."resnet-50"]\nhandler = "identity"\n[models."bert.v2"]\nhandler = "identity"\n',
    )
    sets: dict = {}
    model_set("bert.v2.workers", "3", sets)
    model_set("bert.v2.batching.max_batch_size", "4", sets)
    s = load_settings(path, model_sets=sets, environ={"RINGSERVE_MODELS_RESNET_50_WORKERS": "2"})
    by_name = {m.name: m for m in s.models}
    assert by_name["resnet-50"].workers == 2
    assert (by_name["bert.v2"].workers, by_name["bert.v2"].batching.max_batch_size) == (3, 4)


def test_model_list_without_file_replaces_the_default_model():
    s = load_settings(models=[("echo", "identity")], environ={})
    assert s.models == (ModelSettings(name="echo", handler="identity"),)


def test_model_overrides_apply_to_every_model(tmp_path):
    s = load_settings(write(tmp_path, FULL), model_overrides={"workers": 4}, environ={})
    assert [m.workers for m in s.models] == [4, 4]
    s = load_settings(
        models=[("x", "identity"), ("y", "digits")],
        model_overrides={"workers": 3, "device": "cpu", "threads": 2},
        environ={},
    )
    assert [(m.workers, m.threads) for m in s.models] == [(3, 2), (3, 2)]
    assert load_settings(model_overrides={"workers": 5}, environ={}).models[0].workers == 5


def test_share_threads_flag_reaches_every_model():
    from ringserve.supervisor.cli import _serve_parser, settings_from_args

    ns = _serve_parser().parse_args(["--model", "a=identity", "--threads", "2", "--share-threads"])
    m = settings_from_args(ns).models[0]
    assert (m.threads, m.threads_shared) == (2, True)
    plain = settings_from_args(_serve_parser().parse_args(["--model", "a=identity"]))
    assert plain.models[0].threads_shared is False


def test_set_one_models_key_over_the_file_and_the_every_model_flags(tmp_path):
    """``--set models.NAME.KEY=VALUE``: one model's setting, as ``serve --help`` lists
    them; it wins over the file and over a flag for every model (``--workers``)."""
    from ringserve.supervisor.cli import _serve_parser, settings_from_args

    write(tmp_path, FULL)
    ns = _serve_parser().parse_args(
        [
            *("--config", str(tmp_path / "ringserve.toml"), "--workers", "3"),
            *("--set", "models.b.workers=1", "--set", "models.a.weights=/w/a.pt"),
            *("--set", "models.a.batching.max_batch_size=4"),
            *("--set", "models.a.options.size=300", "--set", "models.a.options.labels=l.txt"),
        ]
    )
    a, b = settings_from_args(ns).models
    assert (a.workers, a.weights, a.batching.max_batch_size) == (3, "/w/a.pt", 4)
    assert a.batching.max_queue_delay_ms == 5  # the rest of [batching] as before
    assert a.options == {"scale": 2.5, "tags": ["x", "y"], "size": 300, "labels": "l.txt"}
    assert (b.workers, b.weights, b.batching.max_batch_size) == (1, "/srv/w.pth", 16)


def test_json_round_trip(tmp_path):
    for s in (
        load_settings(environ={}),
        load_settings(write(tmp_path, FULL), environ={}),
        load_settings(
            write(tmp_path, FULL),
            overrides={"server": {"instance": "blue", "admin_socket": "/tmp/a.sock"}},
            environ={"RINGSERVE_MEMORY_TREND_MIN_MB_PER_MIN": "2.5"},
        ),
    ):
        back = Settings.from_json(s.to_json())
        assert back == s
        assert back.to_json() == s.to_json()
        assert isinstance(back.models, tuple)
        assert all(isinstance(m.batching, BatchingSettings) for m in back.models)


def test_bool_spellings():
    for text, value in [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("NO", False),
        ("off", False),
    ]:
        s = load_settings(environ={"RINGSERVE_SERVER_ACCESS_LOG": text})
        assert s.server.access_log is value, text


def test_config_error_is_a_ringserve_error():
    assert issubclass(ConfigError, RingserveError)


# -- every invalid value fails naming its key ----------------------------------------------


def fails(key: str, path: str | None = None, **kw) -> str:
    kw.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_settings(path, **kw)
    message = str(info.value)
    assert key in message, message
    return message


BAD_FILES = [
    ("server.port", "[server]\nport = 70000\n"),
    ("server.port", "[server]\nport = -1\n"),
    ("server.port", '[server]\nport = "eighty"\n'),  # string for int
    ("server.port", "[server]\nport = 80.5\n"),  # float for int
    ("server.port", "[server]\nport = true\n"),  # bool for int
    ("server.host", "[server]\nhost = 5\n"),  # int for string
    ("server.drain_timeout_s", '[server]\ndrain_timeout_s = "soon"\n'),
    ("server.drain_timeout_s", "[server]\ndrain_timeout_s = -1\n"),
    ("server.access_log", '[server]\naccess_log = "maybe"\n'),
    ("server.access_log", "[server]\naccess_log = 1\n"),
    ("server.frontends", "[server]\nfrontends = 0\n"),
    ("server.log_format", '[server]\nlog_format = "xml"\n'),
    ("server.max_body_bytes", "[server]\nmax_body_bytes = 0\n"),
    ("server.request_timeout_s", "[server]\nrequest_timeout_s = 0\n"),
    ("server.colour", "[server]\ncolour = 1\n"),  # unknown key in a section
    ("arena.slotz", "[arena]\nslotz = 1\n"),
    ("arena.slots", "[arena]\nslots = 1\n[server]\nfrontends = 2\n"),
    ("arena.slot_bytes", "[arena]\nslot_bytes = 100\n"),
    ("arena.max_queue_depth", "[arena]\nmax_queue_depth = -1\n"),
    ("arena.max_queue_depth", "[arena]\nslots = 64\nmax_queue_depth = 65\n"),  # never binds
    ("bogus", "[bogus]\nx = 1\n"),  # unknown section
    ("server", "server = 3\n"),  # a section that is not a table
    ("memory", 'memory = "lots"\n'),
    (
        "worker.heartbeat_timeout_s",
        "[worker]\nheartbeat_interval_s = 2.0\nheartbeat_timeout_s = 4.0\n",
    ),  # not > 2x
    ("worker.heartbeat_interval_s", "[worker]\nheartbeat_interval_s = 0\n"),
    ("worker.stop_timeout_s", "[worker]\nstop_timeout_s = -1\n"),
    ("worker.stop_timeout_s", "[worker]\nstop_timeout_s = 0\n"),  # every stop a SIGKILL
    ("memory.uss_limit_mb", "[memory]\nuss_limit_mb = -5\n"),
    ("memory.uss_limit_samples", "[memory]\nuss_limit_samples = 0\n"),
    ("memory.max_requests_jitter", "[memory]\nmax_requests_jitter = -1\n"),
    ("memory.sample_interval_s", "[memory]\nsample_interval_s = 0\n"),
    ("memory.trend_window_s", "[memory]\ntrend_window_s = 0\n"),
    ("memory.max_requests", "[memory]\nmax_requests = 1.5\n"),
    ("batching.max_batch_size", '[batching]\nmax_batch_size = "big"\n'),
    ("models", "models = 3\n"),
    ("models.a", "[models]\na = 3\n"),
    ("models.a.colour", '[models.a]\nhandler = "identity"\ncolour = "red"\n'),  # unknown model key
    ("models.a.name", '[models.a]\nhandler = "identity"\nname = "b"\n'),
    ("models.a.handler", '[models.a]\nhandler = "tensorflow:x"\n'),  # bad handler kind
    ("models.a.handler", '[models.a]\nhandler = "torchscript:"\n'),  # no path
    ("models.a.handler", '[models.a]\nhandler = "torchvision:"\n'),  # no architecture
    ("models.a.handler", "[models.a]\nworkers = 1\n"),  # no handler at all
    ("models.a.handler", "[models.a]\nhandler = 3\n"),
    ("models.a.workers", '[models.a]\nhandler = "identity"\nworkers = 0\n'),
    ("models.a.workers", '[models.a]\nhandler = "identity"\nworkers = "two"\n'),
    ("models.a.workers", '[models.a]\nhandler = "identity"\nworkers = 1.5\n'),
    ("models.a.threads", '[models.a]\nhandler = "identity"\nthreads = 0\n'),
    ("models.a.device", '[models.a]\nhandler = "identity"\ndevice = "tpu"\n'),
    ("models.a.device", '[models.a]\nhandler = "identity"\ndevice = "cuda:"\n'),
    ("models.a.device", '[models.a]\nhandler = "identity"\ndevice = "cudax"\n'),
    ("models.a.options", '[models.a]\nhandler = "identity"\noptions = 3\n'),
    ("models.a.batching", '[models.a]\nhandler = "identity"\nbatching = 3\n'),
    (
        "models.a.batching.max_batch_size",
        '[models.a]\nhandler = "identity"\n[models.a.batching]\nmax_batch_size = 0\n',
    ),
    (
        "models.a.batching.max_queue_delay_ms",
        '[models.a]\nhandler = "identity"\n[models.a.batching]\nmax_queue_delay_ms = -1\n',
    ),
    (
        "models.a.batching.preferred_batch_size",
        '[models.a]\nhandler = "identity"\n[models.a.batching]\n'
        "max_batch_size = 8\npreferred_batch_size = 9\n",
    ),
    (
        "batching.preferred_batch_size",  # the section default, reported per model
        "[batching]\nmax_batch_size = 4\npreferred_batch_size = 8\n",
    ),
    ("models.a.batching.size", '[models.a]\nhandler = "identity"\n[models.a.batching]\nsize = 1\n'),
    ("models.a b", '[models."a b"]\nhandler = "identity"\n'),
]


@pytest.mark.parametrize(
    ("key", "body"), BAD_FILES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_FILES)]
)
def test_invalid_file_value_names_the_key(tmp_path, key, body):
    fails(key, write(tmp_path, body))


def test_valid_edges_are_accepted(tmp_path):
    body = """
        [server]
        port = 0
        [worker]
        heartbeat_interval_s = 2.0
        heartbeat_timeout_s = 4.01
        [memory]
        uss_limit_samples = 1
        [models.a]
        handler = "identity"
        [models.a.batching]
        max_batch_size = 8
        preferred_batch_size = 8
    """
    s = load_settings(write(tmp_path, body), environ={})
    assert s.server.port == 0 and s.models[0].batching.preferred_batch_size == 8
    assert load_settings(overrides={"server": {"port": 65535}}, environ={}).server.port == 65535


def test_invalid_env_values_name_the_key():
    fails("server.port", environ={"RINGSERVE_SERVER_PORT": "notanumber"})
    fails("server.port", environ={"RINGSERVE_SERVER_PORT": "8000.5"})
    fails("server.access_log", environ={"RINGSERVE_SERVER_ACCESS_LOG": "maybe"})
    fails("server.bogus", environ={"RINGSERVE_SERVER_BOGUS": "1"})
    fails("memory.uss_limit_mb", environ={"RINGSERVE_MEMORY_USS_LIMIT_MB": "4G"})


def test_an_invalid_environment_value_names_its_variable():
    """A bad line of /etc/default/ringserve: the error names the variable to fix, not
    only the key (the TOML file and the flags have none of it)."""
    message = fails("server.frontendz", environ={"RINGSERVE_SERVER_FRONTENDZ": "2"})
    assert message.startswith("RINGSERVE_SERVER_FRONTENDZ: server.frontendz: unknown key")
    message = fails("server.port", environ={"RINGSERVE_SERVER_PORT": "eighty"})
    assert message.startswith("RINGSERVE_SERVER_PORT: server.port: expected an integer")
    # A flag over the variable: the flag's value is the one refused, named as a key only.
    message = fails(
        "server.port",
        environ={"RINGSERVE_SERVER_PORT": "8000"},
        overrides={"server": {"port": "eighty"}},
    )
    assert "RINGSERVE_SERVER_PORT" not in message, message


def test_plain_messages_for_common_mistakes():
    assert "expected an integer" in fails(
        "server.frontends", overrides={"server": {"frontends": "two"}}
    )
    assert "expected a number" in fails(
        "server.drain_timeout_s", overrides={"server": {"drain_timeout_s": "x"}}
    )
    # inf passed every "> 0" check, and turned memory sampling or hang detection off
    for key, value in (("sample_interval_s", "inf"), ("uss_limit_mb", float("inf"))):
        assert "expected a finite number" in fails(
            f"memory.{key}", overrides={"memory": {key: value}}
        )
    assert "expected a finite number" in fails(
        "worker.heartbeat_timeout_s", overrides={"worker": {"heartbeat_timeout_s": "Infinity"}}
    )
    fails("server.log_level", overrides={"server": {"log_level": "loud"}})
    fails("server.startup_timeout_s", overrides={"server": {"startup_timeout_s": -1}})
    fails("server.metrics_port", overrides={"server": {"metrics_port": 70000}})
    fails("server.metrics_port", overrides={"server": {"metrics_port": 8000}})  # = port
    assert "given more than once" in fails("--model a", models=[("a", "identity"), ("a", "digits")])
    assert "required" in fails("models.a.handler", models=[("a", "")])


def test_invalid_flag_values_name_the_key():
    fails("server.port", overrides={"server": {"port": "x"}})
    fails("server.port", overrides={"server": {"port": 99999}})
    fails("bogus", overrides={"bogus": {"x": 1}})
    fails("arena.nope", overrides={"arena": {"nope": 1}})
    fails("models.digits.workers", model_overrides={"workers": 0})
    fails("models.digits.colour", model_overrides={"colour": "red"})
    fails("models.a.handler", models=[("a", "nope:x")])
    fails("models.a!", models=[("a!", "identity")])


@pytest.mark.parametrize(
    "handler",
    [
        "python:some.module",  # no class
        "python:",  # nothing
        "python",
        "python::Cls",  # no module
        "python:some.module:",
        "python:some..module:Cls",
        "python:some.module:Cls:extra",
    ],
)
def test_python_handlers_need_a_module_and_a_class(handler):
    """Refused at start, not when a worker fails to import it."""
    message = fails("models.a.handler", models=[("a", handler)])
    assert f"python handlers are python:MODULE:CLASS, not {handler!r}" in message
    assert load_settings(models=[("a", "python:some.module:Cls")], environ={})


def test_flags_fix_a_bad_env_value():
    # later sources win before validation: a bad env port is replaced by the flag
    s = load_settings(
        overrides={"server": {"port": "9001"}}, environ={"RINGSERVE_SERVER_PORT": "99999"}
    )
    assert s.server.port == 9001


def test_missing_config_file(tmp_path):
    msg = fails("does not exist", str(tmp_path / "nope.toml"))
    assert "nope.toml" in msg


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[server\nport = \n")
    msg = fails("ringserve.toml", path)
    assert "config file" in msg


def test_every_field_is_documented():
    docs = "\n".join(field_docs())
    for section in ("server", "arena", "worker", "memory", "batching"):
        cls = type(getattr(Settings(), section))
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} = " in docs
    for name in ("handler", "workers", "device", "threads", "weights"):
        assert f"models.NAME.{name} = " in docs


# -- the CLI ---------------------------------------------------------------------------------

RINGSERVE = Path(sys.executable).with_name("ringserve")


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``ringserve`` with none of the caller's settings: no RINGSERVE_ variables, and no
    runtime directory to put the admin socket in (the default path is then the same
    on every machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run(
        [str(RINGSERVE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--port", "notanumber"], "--port"),
        (["--workers", "two"], "--workers"),
        (["--set", "server.port=x"], "server.port"),
        (["--set", "server.port=70000"], "server.port"),
        (["--set", "memory.uss_limit_samples=0"], "memory.uss_limit_samples"),
        (["--set", "nosuch.key=1"], "nosuch"),
        (["--set", "server.nosuch=1"], "server.nosuch"),
        (["--set", "noequals"], "--set"),
        (["--set", "models.nosuch.workers=2"], "models.nosuch: no such model"),
        (["--set", "models.digits=2"], "--set models.digits"),
        (
            ["--set", "models.digits.nosuch.key=1"],
            "models.digits.nosuch: no such model (models: "
            "digits); --set takes models.NAME.KEY, models.NAME.batching.KEY",
        ),
        (["--set", "models.digits.nosuch=1"], "models.digits.nosuch"),
        (["--set", "models.digits.workers=x"], "models.digits.workers"),
        (["--set", "models.digits.batching.max_batch_size=0"], "models.digits.batching"),
        (["--workers", "0"], "models.digits.workers"),
        (["--model", "a=tensorflow:x"], "models.a.handler"),
        (["--model", "a=python:some.module"], "python handlers are python:MODULE:CLASS"),
        (["--model", "justaname"], "--model"),
        (
            ["--max-batch-size", "4", "--set", "batching.preferred_batch_size=8"],
            "batching.preferred_batch_size",
        ),
        (["--config", "missing.toml"], "missing.toml"),
        # One it may not read (a directory here; the service's user outside the file's
        # group under systemd): was an OSError traceback, exit 1, which a SIGHUP that
        # reads it again must not raise in the supervisor either.
        (["--config", "."], "config file .: cannot read it: Is a directory"),
        (["--instance", "a b"], "server.instance"),  # was a ValueError traceback, exit 1
        (["--instance", "../etc"], "server.instance"),
    ],
)
def test_cli_rejects_bad_values_with_exit_2(tmp_path, args, key):
    r = cli("serve", *args, tmp_path=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_rejects_a_bad_config_file(tmp_path):
    write(tmp_path, "[arena]\nslots = 64\nslot_size = 10\n")
    r = cli("serve", "--config", "ringserve.toml", tmp_path=tmp_path)
    assert r.returncode == 2
    assert "arena.slot_size" in r.stderr and "invalid configuration" in r.stderr
    write(tmp_path, "[server]\nport = 8000\n[models.a]\nhandler = 'identity'\nbatching = 2\n")
    r = cli("serve", "--config", "ringserve.toml", tmp_path=tmp_path)
    assert r.returncode == 2 and "models.a.batching" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_serve_help_lists_every_config_key(tmp_path):
    r = cli("serve", "--help", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    for key in (
        "arena.slots",
        "memory.uss_limit_mb",
        "memory.trend_window_s",
        "server.port",
        "worker.heartbeat_timeout_s",
        "batching.max_queue_delay_ms",
        "models.NAME.workers",
        "--set",
        "RINGSERVE_",
    ):
        assert key in r.stdout, key
    for line in field_docs():
        assert line in r.stdout, line


def test_settings_changes_name_each_changed_key(tmp_path):
    """What a reload that keeps the running configuration says it did not apply."""
    old = load_settings(write(tmp_path, '[models.a]\nhandler = "identity"\n'), environ={})
    body = "[server]\nfrontends = 1\n"
    body += '[models.a]\nhandler = "identity"\n[models.a.batching]\nmax_batch_size = 4\n'
    body += '[models.b]\nhandler = "identity"\n'
    new = load_settings(write(tmp_path, body, "new.toml"), environ={})
    assert settings_changes(old, new) == [
        "server.frontends: 2 -> 1",
        "models.a.batching.max_batch_size: 32 -> 4",
        "models.b: added",
    ]
    assert settings_changes(new, old)[-1] == "models.b: removed"
    assert settings_changes(old, old) == []
    assert settings_changes(old, new, limit=1) == ["server.frontends: 2 -> 1", "and 2 more"]
