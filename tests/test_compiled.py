"""``models.NAME.compile``: a model served through torch.compile, a graph per batch size
compiled at start (``gpu_worker/compiled.py``). A batch between two sizes is padded up,
so a request never waits for a compile, and answers as the eager model does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Server, shm_segments
from test_e2e_core import digit_requests, fire
from torch._dynamo.utils import counters

from ringserve.gpu_worker.compiled import Bucketed, compilable_module
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
    model = Bucketed(torch.compile(eager, dynamic=False), [1, 2, 4], "m")
    # Made outside inference mode, as a pool thread's preprocessed image is: the worker
    # compiles (and mostly runs) on inference tensors, which the graphs' guards tell apart.
    rows = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for size in (1, 2, 4):
            model(rows[:size].clone(memory_format=torch.channels_last))
        compiled = _graphs()
        assert compiled == 3
        model.compiled_all()
        for batch in (rows[:3].clone(memory_format=torch.channels_last), rows[:1], rows[:3]):
            got = model(batch)
            assert _graphs() == compiled, batch.shape  # no compile while a request waits
            assert got.shape == (len(batch), 4)
            torch.testing.assert_close(got, eager(batch), rtol=1e-4, atol=1e-5)
        assert "compiled again" not in caplog.text
        model(rows[:2].contiguous())  # another layout: the graph's guards refuse it
        assert _graphs() == compiled + 1
    assert "model m: compiled again while a batch waited (float32 [2, 3, 8, 8]" in caplog.text


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
    env = child_environment(worker, {"HOME": "/home/u"})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/home/u/.cache/ringserve/inductor"
    own = {"TORCHINDUCTOR_CACHE_DIR": "/fast/disk", "XDG_CACHE_HOME": "/var/cache/rs"}
    assert child_environment(worker, own)["TORCHINDUCTOR_CACHE_DIR"] == "/fast/disk"
    frontend = ChildSpec("frontend", 0, 0, "/dev/shm/x", "{}", 1)
    assert "TORCHINDUCTOR_CACHE_DIR" not in child_environment(frontend, {})


def test_a_compiled_model_answers_as_the_eager_one(start_server, monkeypatch) -> None:
    """The default model compiled for batches of 1, 2 and 4 before it is ready; a request
    of 3 rows (padded up to 4 inside) gets the eager model's answers, images batched
    from two preprocess threads get theirs, nothing compiles again while requests wait,
    and the kernels are in the server's cache for the next start."""
    # Set in this process by inductor itself once a test above compiled here.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    server: Server = start_server(
        *("--compile", "--max-batch-size", "4", "--threads", "2"),
        env={"TORCH_LOGS": "recompiles"},  # each compile after the first logs why
        frontends=1,
    )
    log = server.log()
    assert "model digits: compiled for batches of [1, 2, 4] rows" in log, log[-2000:]
    [model] = server.ctl("status")["models"]
    assert model["compiled"] is True and model["preferred_batch_size"] in (1, 2, 4)
    compiles = log.count("Recompiling function")
    assert compiles == 2, log[-3000:]  # for 2 and for 4 rows, at start
    cases = digit_requests(40)
    answers = fire(server.url, [req for req, _ in cases], concurrency=8)
    for resp, (_, label) in zip(answers, cases, strict=True):
        assert resp.status_code == 200 and resp.json()["result"]["label"] == label
    rows = np.random.default_rng(0).uniform(0, 16, (3, 8, 8)).astype(np.float32)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 8, 8]}]}
    body["inputs"][0]["data"] = rows.ravel().tolist()
    with server.client() as c:
        r = c.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["shape"] == [3, 10]
    eager = create_handler(ModelSettings(name="digits", handler="digits"))
    eager.load(torch.device("cpu"))
    with torch.inference_mode():
        want = eager.infer(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), want, atol=1e-5)
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
