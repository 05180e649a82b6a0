"""Values that passed the config's checks and broke the server later (a traceback, every
request a 500, a worker restarted until the start-up timeout), and the merging of one
model's tables across sources: each is refused at start naming its key, or merged."""

from __future__ import annotations

import errno
import socket
import textwrap
from pathlib import Path

import pytest
from test_config import cli

from ringserve.ipc.config import load_settings
from ringserve.ipc.errors import ConfigError


def fails(key: str, path: str | None = None, **kw) -> str:
    kw.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_settings(path, **kw)
    message = str(info.value)
    assert message.startswith(key), message
    return message


def write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "ringserve.toml"
    path.write_text(textwrap.dedent(body))
    return str(path)


# -- one model's tables: batching and options ------------------------------------------------


@pytest.mark.parametrize("table", ["batching", "options"])
def test_a_table_set_to_a_plain_value_is_a_config_error(table):
    """``--set models.digits.batching=4`` raised "TypeError: 'str' object is not a
    mapping" (a traceback, exit 1)."""
    fails(f"models.digits.{table}: expected a table", model_sets={"digits": {table: "4"}})


def test_a_files_plain_batching_value_stays_an_error_under_an_env_key(tmp_path):
    """``batching = 3`` in the file and one batching key from the environment raised
    "TypeError: 'int' object is not a mapping"."""
    path = write(tmp_path, '[models.a]\nhandler = "identity"\nbatching = 3\n')
    env = {"RINGSERVE_MODELS_A_BATCHING_MAX_BATCH_SIZE": "4"}
    fails("models.a.batching: expected a table", path, environ=env)


def test_an_env_option_is_set_beside_the_files_other_options(tmp_path):
    """One ``RINGSERVE_MODELS_<NAME>_OPTIONS_<KEY>`` replaced the file's whole options
    table: the model lost every other option (``--set`` already merged)."""
    path = write(tmp_path, '[models.a]\nhandler = "identity"\n[models.a.options]\nx = 1\ny = 2\n')
    s = load_settings(path, environ={"RINGSERVE_MODELS_A_OPTIONS_Y": "5"})
    assert s.models[0].options == {"x": 1, "y": 5}


def test_an_env_override_goes_to_the_model_whose_key_it_names():
    """Models "a" and "a_batching": RINGSERVE_MODELS_A_BATCHING_MAX_BATCH_SIZE went to the
    longer name, whose key "max_batch_size" it is not, and stopped the start."""
    s = load_settings(
        models=[("a", "identity"), ("a_batching", "identity")],
        environ={
            "RINGSERVE_MODELS_A_BATCHING_MAX_BATCH_SIZE": "4",
            "RINGSERVE_MODELS_A_BATCHING_WORKERS": "3",
        },
    )
    assert [(m.name, m.workers, m.batching.max_batch_size) for m in s.models] == [
        ("a", 1, 4),
        ("a_batching", 3, 32),
    ]


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("a-b", "a_b"), ("A", "a"), ("r.v2", "r-v2")])
def test_two_names_with_one_env_spelling_are_refused(first, second):
    """Their ``RINGSERVE_MODELS_<NAME>_<KEY>`` variables were one: an override went to
    whichever came first."""
    message = fails(f"models.{second}:", models=[(first, "identity"), (second, "identity")])
    assert f"also model {first}'s" in message


@pytest.mark.parametrize("name", ["é", "a²", "модель", ".", "..", "a" * 129])
def test_a_model_name_is_ascii_not_dots_alone_and_short(name):
    """``str.isalnum`` passed any script's letters and digits, which the shared memory's
    and the metrics directory's names do not match; "." and ".." are path segments
    every HTTP client normalises away (``/v1/models/../predict``)."""
    fails(f"models.{name}: model names use ASCII", models=[(name, "identity")])


@pytest.mark.parametrize("instance", ["é", "..", "x" * 129])
def test_an_instance_name_is_ascii_and_not_dots_alone(instance):
    fails("server.instance", overrides={"server": {"instance": instance}})
    assert load_settings(overrides={"server": {"instance": "a-b_c.1"}}, environ={})


# -- values the server could not run with ----------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:01", "cuda:\u0663", "cuda:99999999999999999999"])
def test_a_device_index_is_one_torch_parses(device):
    """``\\d+`` took these; torch.device refused them in the worker, outside its error
    handling: a traceback each try, retried until the start-up timeout (exit 3)."""
    fails("models.digits.device", model_overrides={"device": device})
    for good in ("cuda", "cuda:0", "cuda:12"):
        assert load_settings(model_overrides={"device": good}, environ={})


@pytest.mark.parametrize(
    "device", ["cuda:0,cuda:0", "cuda,cuda:0", "cpu,cuda:1", "cpu,cpu", "cuda:0,", "cuda:0, cuda:1"]
)
def test_a_list_of_devices_names_distinct_cuda_devices(device):
    """A model's workers may take several GPUs in turn (``cuda:0,cuda:1``); a list that
    names one twice, a CPU, or an empty entry is refused at start, naming the key."""
    fails("models.digits.device", model_overrides={"device": device})
    settings = load_settings(model_overrides={"device": "cuda:1,cuda:0", "workers": 3}, environ={})
    [model] = settings.models
    assert model.devices == ("cuda:1", "cuda:0")
    assert [model.worker_device(rank) for rank in range(3)] == ["cuda:1", "cuda:0", "cuda:1"]


def test_a_toml_list_of_devices_reads_as_the_comma_spelling(tmp_path: Path) -> None:
    """In the file a list is the natural spelling; it means what ``--device
    cuda:0,cuda:1`` and ``RINGSERVE_MODELS_DIGITS_DEVICE=cuda:0,cuda:1`` mean."""
    body = '[models.digits]\nhandler = "digits"\ndevice = ["cuda:0", "cuda:1"]\n'
    [model] = load_settings(write(tmp_path, body), environ={}).models
    assert model.device == "cuda:0,cuda:1" and model.devices == ("cuda:0", "cuda:1")
    for bad in ("[]", '["cuda:0", 1]', '["cuda:0", "cuda:0"]'):
        body = f'[models.digits]\nhandler = "digits"\ndevice = {bad}\n'
        fails("models.digits.device", write(tmp_path, body))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server.request_timeout_s", "1e300"),  # every request a 500 (OverflowError)
        ("server.drain_timeout_s", "1e300"),
        ("worker.heartbeat_timeout_s", "1e300"),
        ("memory.max_age_s", "1e300"),
        ("batching.max_queue_delay_ms", "1e300"),
        ("arena.slot_bytes", str(2**62)),  # OverflowError in posix_fallocate, exit 1
        ("arena.slots", str(2**33)),
        ("worker.start_timeout_s", "0"),  # every worker killed as it started
        ("worker.heartbeat_interval_s", "1e-9"),  # a busy loop in every process
        ("memory.sample_interval_s", "1e-9"),
        ("server.max_image_pixels", "0"),  # every image a 413
        ("server.max_image_pixels", "-1"),
        ("server.frontends", "100000"),  # started processes until the host gave out
    ],
)
def test_a_value_the_server_cannot_run_with_is_refused(key, value):
    section, _, name = key.partition(".")
    message = fails(key, overrides={section: {name: value}})
    assert "must be" in message, message


def test_a_models_workers_are_bounded_as_ctl_scale_bounds_them():
    fails("models.digits.workers: must be from 1 to 64", model_overrides={"workers": 100000})
    assert load_settings(model_overrides={"workers": 64}, environ={}).models[0].workers == 64


def test_a_models_queue_delay_is_bounded_too():
    fails(
        "models.digits.batching.max_queue_delay_ms: must be at most",
        model_sets={"digits": {"batching": {"max_queue_delay_ms": "1e300"}}},
    )


def test_large_but_sane_values_are_accepted():
    s = load_settings(
        overrides={
            "server": {"request_timeout_s": 86400, "drain_timeout_s": 3600},
            "arena": {"slots": 65536, "slot_bytes": 2**30},
            "worker": {"heartbeat_interval_s": 0.01, "heartbeat_timeout_s": 600},
            "memory": {"max_age_s": 30 * 86400},
        },
        environ={},
    )
    assert s.arena.slots == 65536 and s.server.request_timeout_s == 86400


@pytest.mark.parametrize("handler", ["identity:x", "digits:/srv/digits.pt"])
def test_a_built_in_handler_that_takes_no_argument_refuses_one(handler):
    """The argument was dropped without a word (``digits:PATH`` served the packaged
    weights, not PATH)."""
    fails("models.a.handler: ", models=[("a", handler)])


# -- the CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--set", "models.digits.batching=4"], "models.digits.batching: expected a table"),
        (["--instance", "i" * 100], "server.instance: the admin socket path is"),
        (["--admin-socket", "/tmp/" + "s" * 110], "server.admin_socket: the admin socket path"),
    ],
)
def test_cli_refuses_with_exit_2_and_no_traceback(tmp_path, args, says):
    """The first was a traceback (exit 1); the socket paths were refused after the port
    was bound (exit 1), not as the invalid configuration they are."""
    r = cli("serve", "--port", "0", *args, tmp_path=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_address_this_host_does_not_have_names_server_host():
    """It named ``server.port``, which was not what to change."""
    from ringserve.supervisor.cli import bind_socket

    probe = socket.socket()
    try:
        probe.bind(("192.0.2.1", 0))  # TEST-NET-1: no host has it
    except OSError as e:
        assert e.errno == errno.EADDRNOTAVAIL
    else:  # pragma: no cover - a host configured with it
        pytest.skip("this host has 192.0.2.1")
    finally:
        probe.close()
    with pytest.raises(ConfigError, match=r"^server\.host: cannot listen on 192\.0\.2\.1:0"):
        bind_socket("192.0.2.1", 0, "server.port")


def test_the_restart_back_off_cannot_top_out_below_where_it_starts():
    fails(
        "worker.restart_backoff_max_s: must be at least",
        overrides={"worker": {"restart_backoff_s": "5", "restart_backoff_max_s": "1"}},
    )
