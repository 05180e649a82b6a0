"""Models served on a device, end to end: on the CPU (every run, CI included) and on a
GPU where torch sees one (``.ci/gpu_check`` runs them on a GPU host). On the GPU the
batches go through the pinned staging buffer, the workers report their GPU memory
(torch's allocator and NVML), and one that leaks GPU memory is recycled with nothing
lost; those checks exist only there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, wait_until
from support.load import DIGIT3, load_during
from test_e2e_core import HANDLER_ENV, PNGS
from test_v2_protocol import binary_body

pytestmark = pytest.mark.e2e

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = pytest.param("cuda", marks=NEEDS_CUDA)


def resnet18_weights(path: Path) -> torch.nn.Module:
    """A resnet18 with seeded random weights, saved to ``path`` for the server; returned
    in eval mode on the CPU as the reference."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save(model.state_dict(), path)
    return model


def v2_infer(client: httpx.Client, model: str, x: np.ndarray) -> np.ndarray:
    """One v2 binary request; the output as a float32 array."""
    body, headers = binary_body(
        x, outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    )
    r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    head_len = int(r.headers["Inference-Header-Content-Length"])
    out = json.loads(r.content[:head_len])["outputs"][0]
    return np.frombuffer(r.content[head_len:], np.float32).reshape(out["shape"])


def queue_depth(server: Server, model: str) -> int:
    (m,) = [m for m in server.ctl("status")["models"] if m["name"] == model]
    return m["queue_depth"]


def worker_records(server: Server, model: str) -> list[dict]:
    return [p for p in server.children() if p["role"] == "worker" and p["model"] == model]


def queued_behind_a_stopped_worker(server: Server, model: str, xs: list[np.ndarray]) -> list:
    """Send every ``xs[i]`` (one v2 request each) while ``model``'s only worker is
    stopped, resume it once all are queued (so it takes them in batches of its preferred
    size, gathered through the pinned staging buffer on a GPU); the outputs in order."""

    async def all_at_once() -> list[np.ndarray]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:

            async def one(x: np.ndarray) -> np.ndarray:
                body, headers = binary_body(x)
                r = await ac.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                assert r.status_code == 200, r.text
                out = r.json()["outputs"][0]
                return np.array(out["data"], np.float32).reshape(out["shape"])

            return await asyncio.gather(*(one(x) for x in xs))

    (worker,) = worker_records(server, model)
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            answers = pool.submit(asyncio.run, all_at_once())
            wait_until(lambda: queue_depth(server, model) == len(xs), 30, "queued requests")
            os.kill(worker["pid"], signal.SIGCONT)
            return answers.result(120)
    finally:
        os.kill(worker["pid"], signal.SIGCONT)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_models_answer_on_the_device_as_on_the_cpu(
    start_server, tmp_path: Path, device: str
) -> None:
    """digits (JSON and a PNG), identity and a resnet18 (v2 binary, batched) on
    ``device`` give the answers the same weights give in this process; on a GPU the
    workers then report their GPU memory."""
    weights = tmp_path / "resnet18.pt"
    reference = resnet18_weights(weights)
    server: Server = start_server(
        *("--device", device, "--model", "digits=digits", "--model", "id=identity"),
        *("--model", "r=torchvision:resnet18", "--set", f"models.r.weights={weights}"),
        *("--set", "batching.preferred_batch_size=8", "--set", "memory.sample_interval_s=0.5"),
    )
    with server.client(timeout=60) as c:
        r = c.post("/predict", json=DIGIT3)
        assert r.status_code == 200, r.text
        assert r.json()["result"]["label"] == "3" and r.json()["result"]["score"] > 0.99
        r = c.post(
            "/v1/models/digits/predict",
            content=PNGS["7"],
            headers={"Content-Type": "image/png"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["result"]["label"] == "7"

    # Identity, exactly: each row comes back from the device as it went, to its sender.
    rows = [np.arange(1000, dtype=np.float32).reshape(1, -1) + 1000 * i for i in range(16)]
    for got, sent in zip(queued_behind_a_stopped_worker(server, "id", rows), rows, strict=True):
        np.testing.assert_array_equal(got, sent)
    (rec,) = worker_records(server, "id")
    assert (rec["requests"], rec["batches"]) == (16, 2), rec  # 8 + 8

    # resnet18: one request, then sixteen batched (a slot holds 1 MiB: one image each).
    # cuDNN runs convolutions in TF32 unless told not to: close to the CPU, not equal.
    xs = [np.random.default_rng(i).standard_normal((1, 3, 224, 224), np.float32) for i in range(17)]
    with server.client(timeout=60) as c:
        got = [v2_infer(c, "r", xs[0])]
    got += queued_behind_a_stopped_worker(server, "r", xs[1:])
    with torch.inference_mode():
        want = reference(torch.from_numpy(np.concatenate(xs))).softmax(dim=1).numpy()
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0.1, atol=1e-4)
    (rec,) = worker_records(server, "r")
    assert (rec["requests"], rec["batches"]) == (17, 3), rec  # 1, then 8 + 8

    if device == "cuda":
        # Read between batches: what each worker keeps on the device (identity: nothing).
        for model, weights in (("digits", True), ("id", False), ("r", True)):
            (rec,) = worker_records(server, model)
            assert rec["device"] == "cuda:0", rec  # (the worker's own word: "cuda" is 0)
            assert (rec["gpu_allocated_bytes"] > 0) == weights, rec
            assert rec["gpu_allocated_bytes"] <= rec["gpu_reserved_bytes"], rec
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'ringserve_worker_gpu_allocated_bytes{model="r"' in metrics, metrics[-2000:]
        try:
            import pynvml  # noqa: F401  (nvidia-ml-py: the supervisor's NVML watch)
        except ImportError:
            print("nvidia-ml-py not installed: NVML's per-process reading not checked")
        else:
            wait_until(
                lambda: all(w["gpu_nvml_used_bytes"] > 0 for w in worker_records(server, "r")),
                30,
                "NVML's reading of the worker's GPU memory",
            )
            assert (
                "ringserve_worker_gpu_nvml_used_bytes{" in httpx.get(f"{server.url}/metrics").text
            )
    assert server.stop() == 0


@NEEDS_CUDA
def test_several_inputs_and_outputs_on_the_gpu(start_server) -> None:
    """A model of two inputs and one of three outputs on the GPU: the inputs' dict goes
    to the device tensor by tensor, and each output comes back to the host (the CPU's
    runs are tests/test_several_inputs.py and tests/test_several_outputs.py)."""
    fake = "python:support.fake_handlers"
    server: Server = start_server(
        *("--device", "cuda", "--model", f"masked={fake}:MaskedSum"),
        *("--model", f"multi={fake}:SeveralOutputs", "--max-queue-delay-ms", "20"),
        env=HANDLER_ENV,
    )
    cases = [([i, 2, 3], [1, 0, 1]) for i in range(24)]
    bodies = [{"data": {"IDS": ids, "MASK": mask}} for ids, mask in cases]
    with ThreadPoolExecutor(8) as pool, server.client(timeout=60) as c:
        answers = list(pool.map(lambda b: c.post("/v1/models/masked/predict", json=b), bodies))
        for r, (ids, _) in zip(answers, cases, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"SUM": [ids[0] + 3], "KEPT": [2]}
        r = c.post("/v1/models/multi/predict", json={"data": [[1.0, -3.0]]})
        assert r.status_code == 200, r.text
        want = {"DOUBLED": [[2.0, -6.0]], "TOTAL": [[-2]], "SIGN": [["neg"]]}
        assert r.json()["result"] == want
    for model in ("masked", "multi"):
        (rec,) = worker_records(server, model)
        assert rec["device"] == "cuda:0", rec
    assert server.stop() == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")
def test_a_model_spread_over_two_gpus_serves_from_both_and_recycles_in_place(
    start_server,
) -> None:
    """``device = "cuda:0,cuda:1"``: worker-0 runs on GPU 0 and worker-1 on GPU 1, both
    take requests from the model's one queue, the v2 configuration lists a group per GPU,
    and a recycled worker's replacement runs on its GPU."""
    server: Server = start_server(
        *("--model", "id=identity", "--set", "models.id.device=cuda:0,cuda:1"),
        *("--set", "models.id.workers=2"),
    )
    by_id = {p["id"]: p["device"] for p in worker_records(server, "id")}
    assert by_id == {"worker-0": "cuda:0", "worker-1": "cuda:1"}, by_id
    rows = [np.full((1, 64), i, np.float32) for i in range(64)]
    with ThreadPoolExecutor(8) as pool, server.client(timeout=60) as c:
        got = list(pool.map(lambda x: v2_infer(c, "id", x), rows))
    for g, x in zip(got, rows, strict=True):
        np.testing.assert_array_equal(g, x)
    assert all(p["requests"] > 0 for p in worker_records(server, "id")), server.children()
    groups = httpx.get(f"{server.url}/v2/models/id/config").json()["instance_group"]
    assert [(g["count"], g["gpus"]) for g in groups] == [(1, [0]), (1, [1])], groups
    old = {p["pid"] for p in worker_records(server, "id") if p["id"] == "worker-1"}
    server.ctl("recycle", "worker-1")

    def replaced() -> bool:
        status = server.ctl("status")
        pids = {p["pid"] for p in status["processes"] if p["id"] == "worker-1"}
        return not status["server"]["recycles_in_progress"] and not pids & old

    wait_until(replaced, 60, "worker-1 replaced")
    by_id = {p["id"]: p["device"] for p in worker_records(server, "id")}
    assert by_id == {"worker-0": "cuda:0", "worker-1": "cuda:1"}, by_id
    assert server.stop() == 0


@NEEDS_CUDA
def test_worker_leaking_device_memory_is_recycled_with_nothing_lost(start_server) -> None:
    """32 MiB kept on the GPU per batch: past ``gpu_allocated_limit_mb`` the supervisor
    recycles the worker under load, and every request is answered, by the old worker or
    its replacement. (On the CPU the same is ``test_uss_limit_recycles``.)"""
    server: Server = start_server(
        "--device",
        "cuda",
        "--model",
        "leak=python:support.fake_handlers:DeviceLeaky",
        "--set",
        "memory.gpu_allocated_limit_mb=1024",
        "--set",  # no warm-up profile: it would leak too, before the first request
        "batching.preferred_batch_size=8",
        "--set",
        "memory.sample_interval_s=0.5",
        env=HANDLER_ENV,
    )
    before = server.pids("worker")

    def recycled() -> None:
        wait_until(
            lambda: server.ctl("status")["server"]["totals"].get("recycles:gpu_limit"),
            120,
            "a gpu_limit recycle",
        )
        wait_until(lambda: not set(server.pids("worker")) & set(before), 60, "the old worker to go")
        server.wait_workers_ready(1)

    result = load_during(
        server.url,
        recycled,
        path="/v1/models/leak/predict",
        payload={"data": [1.0, 2.0]},
        expect_label=None,
        rate=60,
        max_requests=6000,
    )
    print(f"[gpu] gpu_limit recycle under load: {result.summary()}")
    assert not result.exhausted, result.summary()
    assert result.ok == result.total and result.wrong == 0, result.summary()
    (rec,) = worker_records(server, "leak")
    # The replacement starts from nothing: the leak went with the old process.
    assert rec["gpu_allocated_bytes"] < 1024 * 2**20, rec
    assert server.stop() == 0
