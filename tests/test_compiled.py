"""``models.NAME.compile``: a model served through torch.compile, a graph per batch size
compiled at start (``gpu_worker/compiled.py``). A batch between two sizes is padded up,
so a request never waits for a compile, and answers as the eager model does."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, shm_segments
from support.fake_handlers import CompiledOutOfMemoryFrom4
from test_e2e_core import HANDLER_ENV, digit_requests, fire
from torch._dynamo.utils import counters

from ringserve.gpu_worker.compiled import (
    Bucketed,
    _check_padding,
    compilable_module,
    compile_handler,
)
from ringserve.gpu_worker.handlers import Handler, TensorSpec, create_handler
from ringserve.ipc.child import ChildSpec
from ringserve.ipc.config import ConfigError, ModelSettings, load_settings
from ringserve.supervisor.children import child_environment
from ringserve.supervisor.exits import ServeExit


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_batch_between_sizes_is_padded_not_compiled_and_answers_as_eager(caplog) -> None:
    torch.manual_seed(0)
    eager = _Conv().eval().to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    model = Bucketed(torch.compile(eager, dynamic=False), [1, 2, 4, 8], "m")
    with torch.inference_mode():  # as the worker makes every batch (pool threads too)
        rows = torch.randn(8, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        for size in (1, 2, 4, 8):
            model(rows[:size].clone(memory_format=torch.channels_last))
        compiled = _graphs()
        assert compiled == 4
        model.compiled_all()
        nhwc = [rows[:n].clone(memory_format=torch.channels_last) for n in (3, 5, 0)]
        for batch in (*nhwc, rows[:1], rows[:3], rows[:5]):
            got = model(batch)
            assert _graphs() == compiled, batch.shape  # no compile while a request waits
            assert got.shape == (len(batch), 4)
            torch.testing.assert_close(got, eager(batch), rtol=1e-4, atol=1e-5)
        assert "compiled again" not in caplog.text
        model(rows[:2].contiguous())  # another layout: the graph's guards refuse it
        assert _graphs() == compiled + 1
    assert "model m: compiled again while a batch waited (float32 [2, 3, 8, 8]" in caplog.text


class _Pair(torch.nn.Module):
    """Answers a named tuple: each row doubled, and one number for the whole batch."""

    Out = collections.namedtuple("Out", "rows total")

    def forward(self, x: torch.Tensor) -> Out:
        return self.Out(x * 2, x.sum())


def test_a_padded_answer_is_cut_back_in_every_tensor_of_its_rows() -> None:
    out = Bucketed(_Pair(), [1, 4])(torch.ones(3, 2))
    assert type(out) is _Pair.Out and out.rows.shape == (3, 2)
    assert out.total.item() == 8.0  # of the padded batch: not a tensor of rows, kept whole


class _RowsLast(torch.nn.Module):
    """Takes its rows in the last dimension (as a sequence-first model takes its batch
    in dimension 1): padding rows in dimension 0 changes its answers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=0)


class _Model(Handler):
    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        self.model = _RowsLast()

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)


class _CentresRows(torch.nn.Module):
    """Subtracts the batch's mean row: padding changes every answer, unless the rows are
    all alike (then every answer is 0 either way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x - x.mean(dim=0)


class _TokenModel(_Model):
    inputs = (TensorSpec("INPUT0", "int64", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        self.model = _CentresRows()


def refused_at_the_padding_check(handler_class: type[_Model]) -> tuple[_Model, Bucketed]:
    """A loaded ``handler_class`` whose model is bucketed at [1, 2, 4], after the check of
    a batch of 3 refused it."""
    handler = handler_class(ModelSettings(name="m", handler="python:x:Model"))
    handler.load(torch.device("cpu"))
    eager = handler.model
    handler.model = bucketed = Bucketed(eager, [1, 2, 4])
    with (
        torch.inference_mode(),
        pytest.raises(ConfigError, match=r"models\.m\.compile: a batch of 3"),
    ):
        _check_padding(handler, eager, bucketed, "m")
    return handler, bucketed


def test_a_model_whose_rows_are_not_dimension_0_is_refused_at_the_padding_check() -> None:
    handler, bucketed = refused_at_the_padding_check(_Model)
    assert handler.model is bucketed  # the eager model lent for the check is put back
    handler.model = bucketed = Bucketed(torch.nn.Softmax(dim=1), [1, 2, 4])
    with torch.inference_mode():
        _check_padding(handler, bucketed.compiled, bucketed, "m")  # rows first: fine


def test_the_padding_check_tells_rows_apart_for_an_integer_input_too() -> None:
    """Token ids: the check's rows were the profile's zeros, told apart only when they
    were floats, so identical integer rows hid a model whose rows are not dimension 0."""
    refused_at_the_padding_check(_TokenModel)


class _NoModel(Handler):
    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_what_cannot_be_compiled_is_refused_naming_the_key() -> None:
    handler = _NoModel(ModelSettings(name="m", handler="python:x:_NoModel"))
    with pytest.raises(ConfigError, match=r"models\.m\.compile: the handler has no torch"):
        compilable_module(handler, "m")
    handler.model = torch.jit.script(torch.nn.Linear(4, 4))  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="a TorchScript model cannot be compiled"):
        compilable_module(handler, "m")
    handler.model = torch.nn.Linear(4, 4)  # type: ignore[attr-defined]
    assert compilable_module(handler, "m") is handler.model  # type: ignore[attr-defined]
    handler.inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    with pytest.raises(ConfigError, match=r"INPUT0 has a dimension of any size \(\[-1\]\)"):
        compilable_module(handler, "m")
    handler.inputs = (TensorSpec("INPUT0", "bytes", (1,)),)
    with pytest.raises(ConfigError, match="INPUT0 is BYTES"):
        compilable_module(handler, "m")
    handler.inputs = (TensorSpec("A", "float32", (4,)), TensorSpec("B", "float32", (4,)))
    with pytest.raises(ConfigError, match="the model takes 2 inputs; compile buckets"):
        compilable_module(handler, "m")


def test_running_out_of_room_is_told_from_a_model_that_cannot_compile() -> None:
    """A compile that runs out of device memory (a sibling still loading) is a load
    failure, retried; dynamo hides it as BackendCompilerFailed(...) from None, which was
    taken for a model that cannot be compiled, and stopped the start with exit 2."""
    from torch._dynamo.exc import BackendCompilerFailed

    from ringserve.gpu_worker.compiled import ran_out_of_room

    def inductor() -> None: ...

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert ran_out_of_room(BackendCompilerFailed(inductor, oom, None))
    assert ran_out_of_room(OSError(28, "No space left on device"))
    assert not ran_out_of_room(BackendCompilerFailed(inductor, ValueError("bad op"), None))
    try:
        try:
            raise OSError(2, "a cache file the compiler looked for")
        except OSError:
            raise RuntimeError("unsupported operator") from None
    except RuntimeError as handled:
        assert not ran_out_of_room(handled)


def test_a_size_that_runs_out_of_device_memory_ends_the_compile_there() -> None:
    """Sizes from the first that runs out of device memory are dropped (batching stops
    below it, as the eager profile's cap does), not a load failure retried for ever;
    the smallest running out still is one (no batch fits)."""
    handler = CompiledOutOfMemoryFrom4(ModelSettings(name="m", handler="python:x:M"))
    handler.load(torch.device("cpu"))
    torch._dynamo.reset()

    def sample(n: int) -> torch.Tensor:
        return torch.ones(n, 4)

    took, compiled = compile_handler(handler, "m", [1, 2, 4, 8], sample, lambda: None)
    assert compiled == [1, 2] and took > 0
    assert handler.model.sizes == [1, 2]  # a batch of 2 is not padded up to 4
    with torch.inference_mode():
        torch.testing.assert_close(handler.infer(torch.ones(2, 4)), torch.full((2, 4), 2.0))

    class FromOne(CompiledOutOfMemoryFrom4):
        def infer(self, batch: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory")

    tiny = FromOne(ModelSettings(name="m", handler="python:x:M"))
    tiny.load(torch.device("cpu"))
    with pytest.raises(torch.OutOfMemoryError):
        compile_handler(tiny, "m", [1, 2], sample, lambda: None)


def test_a_worker_whose_compile_ran_out_of_memory_batches_below_it(start_server) -> None:
    """The worker serves the sizes that compiled: its profile and batcher are capped
    (as ``ctl status`` shows), and its log names the setting."""
    server: Server = start_server(
        *("--model", "m=python:support.fake_handlers:CompiledOutOfMemoryFrom4"),
        *("--set", "models.m.compile=true", "--max-batch-size", "8"),
        env=HANDLER_ENV,
        frontends=1,
    )
    log = server.log()
    assert "model m: compiled for batches of [1, 2] rows" in log, log[-3000:]
    assert "model m: batching up to 2 rows, not 8: a batch of 4 ran out of device" in log
    [model] = server.ctl("status")["models"]
    assert model["preferred_batch_size"] in (1, 2), model
    assert set(model["batch_profile"]) == {"1", "2"}, model  # profiled, and below the cap
    request = ("/v1/models/m/predict", {"json": {"data": [1.0, 2.0, 3.0, 4.0]}})
    answers = fire(server.url, [request] * 40, concurrency=8)
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["result"] == [2.0, 4.0, 6.0, 8.0] and r.json()["batch_size"] <= 2
    # A request above the cap (the frontends check the configured 8) is refused by the
    # worker, not compiled while it waits and run out of memory as the compile's batch did.
    four_rows = {"data": [[1.0, 2.0, 3.0, 4.0]] * 4}
    r = httpx.post(f"{server.url}/v1/models/m/predict", json=four_rows, timeout=30)
    assert r.status_code == 400, r.text
    assert "a request of 4 rows: model m runs at most 2 rows a batch here" in r.json()["error"]
    # Only the compile's batch of 4 ran out: no batch above the cap was ever run.
    assert server.log().count("rows ran out of device memory") == 1, server.log()[-3000:]
    assert server.stop() == 0


def test_the_built_in_models_keep_theirs_where_compile_looks() -> None:
    digits = create_handler(ModelSettings(name="d", handler="digits"))
    digits.load(torch.device("cpu"))
    assert isinstance(compilable_module(digits, "d"), torch.nn.Module)


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (
            {"handler": "digits", "compile": True, "threads_shared": True, "workers": 2},
            "models.m.compile: cannot go with threads_shared on a CPU",
        ),
        (
            {"handler": "torchscript:/m.pt", "compile": True},
            "models.m.compile: a TorchScript archive cannot be compiled",
        ),
    ],
)
def test_settings_compile_cannot_go_with(model: dict, error: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    config.write_text("[models.m]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        load_settings(str(config), environ={})


def test_a_worker_keeps_compiled_kernels_in_ringserves_cache_unless_told_otherwise() -> None:
    worker = ChildSpec("worker", 0, 0, "/dev/shm/x", "{}", 1)
    env = child_environment(worker, {"XDG_CACHE_HOME": "/var/cache/rs"})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/var/cache/rs/ringserve/inductor"
    assert env["TRITON_CACHE_DIR"] == "/var/cache/rs/ringserve/triton"
    env = child_environment(worker, {"HOME": "/home/u"})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/home/u/.cache/ringserve/inductor"
    own = {"TORCHINDUCTOR_CACHE_DIR": "/fast/disk", "XDG_CACHE_HOME": "/var/cache/rs"}
    assert child_environment(worker, own)["TORCHINDUCTOR_CACHE_DIR"] == "/fast/disk"
    own = {"TRITON_CACHE_DIR": "/var/cache/ringserve/triton"}  # as the systemd unit sets it
    assert child_environment(worker, own)["TRITON_CACHE_DIR"] == own["TRITON_CACHE_DIR"]
    frontend = ChildSpec("frontend", 0, 0, "/dev/shm/x", "{}", 1)
    assert "TORCHINDUCTOR_CACHE_DIR" not in child_environment(frontend, {})


def test_a_compiled_model_answers_as_the_eager_one(start_server, monkeypatch) -> None:
    """The default model compiled before it is ready, for batches of 1, 2, 4 and 8 rows
    and its preferred 3; a request of 5 rows (padded up to 8 inside) gets the eager
    model's answers, images batched
    from two preprocess threads get theirs, nothing compiles again while requests wait,
    and the kernels are in the server's cache for the next start."""
    # Set in this process by inductor itself once a test above compiled here.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    server: Server = start_server(
        *("--compile", "--max-batch-size", "8", "--threads", "2"),
        *("--set", "models.digits.batching.preferred_batch_size=3"),
        env={"TORCH_LOGS": "recompiles"},  # each compile after the first logs why
        frontends=1,
    )
    log = server.log()
    assert "model digits: compiled for batches of [1, 2, 3, 4, 8] rows" in log, log[-2000:]
    [model] = server.ctl("status")["models"]
    assert model["compiled"] is True and model["preferred_batch_size"] == 3
    compiles = log.count("Recompiling function")
    assert compiles == 4, log[-3000:]  # for 2, 3, 4 and 8 rows, at start
    cases = digit_requests(40)
    answers = fire(server.url, [req for req, _ in cases], concurrency=8)
    for resp, (_, label) in zip(answers, cases, strict=True):
        assert resp.status_code == 200 and resp.json()["result"]["label"] == label
    rows = np.random.default_rng(0).uniform(0, 16, (5, 8, 8)).astype(np.float32)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [5, 8, 8]}]}
    body["inputs"][0]["data"] = rows.ravel().tolist()
    with server.client() as c:
        r = c.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["shape"] == [5, 10]
    eager = create_handler(ModelSettings(name="digits", handler="digits"))
    eager.load(torch.device("cpu"))
    with torch.inference_mode():
        want = eager.infer(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.array(out["data"]).reshape(5, 10), want, atol=1e-5)
    assert server.log().count("Recompiling function") == compiles, server.log()[-3000:]
    cache = Path(server.env["XDG_CACHE_HOME"]) / "ringserve" / "inductor"
    assert any(cache.rglob("*")), f"nothing compiled under {cache}"


def test_a_model_that_cannot_be_compiled_stops_the_start_at_once(start_server) -> None:
    server: Server = start_server(
        *("--model", "bad=identity", "--model", "good=digits"),
        *("--set", "models.bad.compile=true"),
        ready=False,
    )
    rc = server.proc.wait(60)
    log = server.log()
    assert rc == ServeExit.CONFIG == 2, log[-3000:]
    assert "models.bad.compile: the handler has no torch.nn.Module in its 'model'" in log
    assert shm_segments(server.instance) == []
