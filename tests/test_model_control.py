"""Triton's model control with --allow-model-control, against a real server and
NVIDIA's clients: unload stops a model's workers (what they hold is answered) and the
rest of the server keeps serving; load starts its configured workers and answers once
the model serves; over HTTP, gRPC and ``ringserve ctl``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import Server, wait_until
from test_v2_protocol import serve
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.e2e

SLOW = "python:support.fake_handlers:Slow"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grpc_port: int) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("control")
    models = ("--model", "id=identity", "--model", f"slow={SLOW}")
    with serve(tmp, *models, "--allow-model-control", "--grpc-port", str(grpc_port)) as s:
        yield s


def _workers(server: Server, model: str) -> list[int]:
    return [p["pid"] for p in server.children() if p["role"] == "worker" and p["model"] == model]


def _infer(c: httpclient.InferenceServerClient, model: str, first: float = 1.0) -> np.ndarray:
    x = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[first, 2.0]], np.float32))
    return c.infer(model, [x]).as_numpy("OUTPUT0")


def test_unload_then_load_over_http(server: Server) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    (old,) = _workers(server, "id")
    c.unload_model("id")
    # Answered once no worker takes the model's requests; its process then exits.
    assert not c.is_model_ready("id")
    wait_until(lambda: not psutil.pid_exists(old) or not _workers(server, "id"), 30, "exit")
    with pytest.raises(InferenceServerException, match="no worker") as e:
        _infer(c, "id")
    assert e.value.status() == "503"
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["id"]["state"] == "UNAVAILABLE" and "unloaded" in index["id"]["reason"]
    assert c.is_server_ready()  # the other model serves: the server stays ready
    assert _infer(c, "slow").tolist() == [[1.0, 2.0]]

    c.load_model("id")  # returns once the model serves
    assert c.is_model_ready("id")
    assert _infer(c, "id").tolist() == [[1.0, 2.0]]
    assert len(_workers(server, "id")) == 1
    c.load_model("id")  # loaded already: nothing changes
    assert len(_workers(server, "id")) == 1
    c.close()


def test_unload_lets_the_batch_in_hand_finish(server: Server) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
    answers: list = []
    t = threading.Thread(target=lambda: answers.append(_infer(c, "slow", first=1500.0)))
    t.start()
    wait_until(lambda: server.ctl("status")["models"][1]["queue_depth"] == 0, 10, "taken")

    time.sleep(0.3)  # (running by now: a worker popped it)
    other = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    other.unload_model("slow")
    t.join(30)
    assert [a.tolist() for a in answers] == [[[1500.0, 2.0]]]
    other.load_model("slow")
    assert _infer(other, "slow").tolist() == [[1.0, 2.0]]
    c.close()
    other.close()


def test_refusals(server: Server) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        c.unload_model("nope")
    with pytest.raises(InferenceServerException, match="load parameters are not supported"):
        c.load_model("id", config='{"max_batch_size": 4}')
    assert c.is_model_ready("id")
    c.close()


def test_unload_then_load_over_grpc(server: Server, grpc_port: int) -> None:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    c.unload_model("id")
    assert not c.is_model_ready("id")
    c.load_model("id")
    assert c.is_model_ready("id")
    with pytest.raises(InferenceServerException) as e:
        c.unload_model("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    c.close()


def test_ctl_unload_and_load(server: Server) -> None:
    assert server.ctl("unload", "id")["stopping"]
    wait_until(lambda: not _workers(server, "id"), 30, "the workers to stop")
    assert server.ctl("status")["models"][0]["workers"] == 0
    assert server.ctl("load", "id")["workers"] == 1
    server.wait_workers_ready(1)
