"""Triton's system shared-memory extension against a real ``ringserve serve
--allow-client-shm`` (2 frontends), with tritonclient's own shared-memory utilities,
and the same routes refused (403) by a server started without the flag.

Every refused request is followed by one that must still succeed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import Server, wait_until
from test_client_regions import freeze_holding_the_table
from test_ipc import FORK, _stopped
from test_v2_protocol import serve
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

pytestmark = pytest.mark.e2e

KEY = f"/ringserve_test_{os.getpid()}"  # not "ringserve-": that prefix is refused


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("v2shm")
    text = "text=python:support.fake_handlers:ByteLengths"
    with serve(tmp, "--model", "id=identity", "--model", text, "--allow-client-shm") as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.unregister_system_shared_memory()  # every region: the next test starts clean
    c.close()


@pytest.fixture
def regions() -> Iterator[dict[str, object]]:
    """Client-side shared-memory objects ``{suffix: handle}``, destroyed afterwards."""
    made: dict[str, object] = {}

    def make(suffix: str, byte_size: int) -> object:
        made[suffix] = shm.create_shared_memory_region(suffix, KEY + suffix, byte_size)
        return made[suffix]

    yield make  # type: ignore[misc]
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def shm_input(name: str, shape: list[int], dtype: str, region: str, size: int, offset: int = 0):
    i = httpclient.InferInput(name, shape, dtype)
    i.set_shared_memory(region, size, offset)
    return i


def shm_output(region: str, size: int, offset: int = 0) -> httpclient.InferRequestedOutput:
    o = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    o.set_shared_memory(region, size, offset)
    return o


def good(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    i = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    i.set_data_from_numpy(x)
    assert (client.infer("id", [i]).as_numpy("OUTPUT0") == x).all()


def test_metadata_lists_the_extension(client: httpclient.InferenceServerClient) -> None:
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]


def test_input_and_output_through_shared_memory_on_every_frontend(
    server: Server, client: httpclient.InferenceServerClient, regions
) -> None:
    """Registered through one connection, used through fresh ones: with two frontends,
    ten fresh connections all land on the registering frontend with odds of 1 in 1024,
    so the registration must be visible to both."""
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    hin, hout = regions("in", 256), regions("out", 512)
    shm.set_shared_memory_region(hin, [x], offset=64)
    client.register_system_shared_memory("in", KEY + "in", 192, offset=64)
    client.register_system_shared_memory("out", KEY + "out", 512)
    assert client.get_system_shared_memory_status() == [
        {"name": "in", "key": KEY + "in", "offset": 64, "byte_size": 192},
        {"name": "out", "key": KEY + "out", "offset": 0, "byte_size": 512},
    ]
    for n in range(10):
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as fresh:
            r = fresh.infer(
                "id",
                [shm_input("INPUT0", [2, 16], "FP32", "in", 128)],
                outputs=[shm_output("out", 256, offset=n * 16)],
            )
        entry = r.get_output("OUTPUT0")
        # The data is in the region, not the body (Triton's response says no more).
        assert entry == {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 16]}
        got = shm.get_contents_as_numpy(hout, np.float32, [2, 16], offset=n * 16)
        assert (got == x).all()


def test_shared_memory_input_with_an_inline_output(
    client: httpclient.InferenceServerClient, regions
) -> None:
    x = np.full((1, 8), 2.5, dtype=np.float32)
    shm.set_shared_memory_region(regions("in", 32), [x])
    client.register_system_shared_memory("in", KEY + "in", 32)
    r = client.infer("id", [shm_input("INPUT0", [1, 8], "FP32", "in", 32)])
    assert (r.as_numpy("OUTPUT0") == x).all()


def test_bytes_input_through_shared_memory(
    client: httpclient.InferenceServerClient, regions
) -> None:
    words = np.array([b"a", b"shared", b"memory"], dtype=np.object_).reshape(1, 3)
    packed = serialize_byte_tensor(words)  # length-prefixed, as the binary extension
    shm.set_shared_memory_region(regions("in", 64), [packed])
    nbytes = len(packed.item())
    client.register_system_shared_memory("in", KEY + "in", 64)
    r = client.infer("text", [shm_input("INPUT0", [1, 3], "BYTES", "in", nbytes)])
    assert r.as_numpy("OUTPUT0").tolist() == [[1, 6, 6]]


def test_registration_errors(client: httpclient.InferenceServerClient, regions) -> None:
    regions("in", 64)
    client.register_system_shared_memory("in", KEY + "in", 64)
    cases = [
        (("in", KEY + "in", 64), "already registered"),  # the same name twice
        (("b", "/no_such_object_here", 64), "cannot open"),
        (("b", KEY + "in", 65), "past the end"),  # larger than the object
        (("b", "/../etc/passwd", 8), "one object in /dev/shm"),
        (("b", "/ringserve-p1-1", 8), "one object in /dev/shm"),  # our own arenas
    ]
    for args, words in cases:
        with pytest.raises(InferenceServerException, match=words):
            client.register_system_shared_memory(*args)
        good(client)
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["in"]


def test_a_symlink_in_dev_shm_is_not_followed(
    client: httpclient.InferenceServerClient, tmp_path: Path
) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    link = f"/dev/shm{KEY}link"
    os.symlink(target, link)
    try:
        with pytest.raises(InferenceServerException, match="cannot open"):
            client.register_system_shared_memory("link", KEY + "link", 64)
    finally:
        os.unlink(link)
    good(client)


def test_infer_errors_name_the_problem(client: httpclient.InferenceServerClient, regions) -> None:
    shm.set_shared_memory_region(regions("in", 64), [np.zeros((1, 16), np.float32)])
    regions("out", 16)
    client.register_system_shared_memory("in", KEY + "in", 64)
    client.register_system_shared_memory("out", KEY + "out", 16)
    cases = [
        ([shm_input("INPUT0", [1, 16], "FP32", "nope", 64)], None, "not registered"),
        ([shm_input("INPUT0", [1, 16], "FP32", "in", 64, offset=8)], None, "past the end"),
        ([shm_input("INPUT0", [1, 8], "FP32", "in", 64)], None, "does not match shape"),
        ([shm_input("INPUT0", [1, 16], "FP32", "in", 64)], [shm_output("out", 16)], "needs 64"),
    ]
    for inputs, outputs, words in cases:
        with pytest.raises(InferenceServerException, match=words):
            client.infer("id", inputs, outputs=outputs)
        good(client)


def test_unregister_one_then_all(client: httpclient.InferenceServerClient, regions) -> None:
    for name in ("a", "b"):
        regions(name, 64)
        client.register_system_shared_memory(name, KEY + name, 64)
    client.unregister_system_shared_memory("a")
    client.unregister_system_shared_memory("never-registered")  # no error, as in Triton
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["b"]
    with pytest.raises(InferenceServerException, match="not registered"):
        client.infer("id", [shm_input("INPUT0", [1, 16], "FP32", "a", 64)])
    with pytest.raises(InferenceServerException, match="not registered") as e:
        client.get_system_shared_memory_status("a")
    assert e.value.status() == "404"  # as Triton (NOT_FOUND)
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    # A name registered again, over a different object, is mapped afresh.
    x = np.full((1, 16), 7.0, np.float32)
    shm.set_shared_memory_region(regions("c", 64), [x])
    client.register_system_shared_memory("a", KEY + "c", 64)
    r = client.infer("id", [shm_input("INPUT0", [1, 16], "FP32", "a", 64)])
    assert (r.as_numpy("OUTPUT0") == x).all()


def test_cuda_shared_memory_is_refused_clearly(
    server: Server, client: httpclient.InferenceServerClient
) -> None:
    with server.client() as c:
        assert c.get("/v2/cudasharedmemory/status").json() == []
        r = c.post("/v2/cudasharedmemory/region/g/register", json={"byte_size": 8})
        assert r.status_code == 400 and "system shared memory" in r.json()["error"]
        assert c.post("/v2/cudasharedmemory/unregister").status_code == 200
        # A region never registered: Triton's NOT_FOUND, a 404 as for system memory.
        r = c.get("/v2/cudasharedmemory/region/g/status")
        assert r.status_code == 404 and "'g'" in r.json()["error"]
    with pytest.raises(InferenceServerException) as e:
        client.get_cuda_shared_memory_status("g")
    assert e.value.status() == "404"
    good(client)


def test_bad_register_bodies(server: Server, client: httpclient.InferenceServerClient) -> None:
    with server.client() as c:
        for body, words in (
            (b"", "needs a JSON body"),
            (b"[1]", "JSON object"),
            (b'{"offset": 0, "byte_size": 8}', '"key"'),
            (b'{"key": "/x", "byte_size": 0}', "positive"),
            (b'{"key": "/x", "byte_size": 8, "offset": -1}', "non-negative"),
        ):
            r = c.post("/v2/systemsharedmemory/region/r/register", content=body)
            assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
    good(client)


def test_a_server_without_the_flag_refuses_with_403(tmp_path: Path) -> None:
    with serve(tmp_path, "--model", "id=identity") as s, s.client() as c:
        assert "system_shared_memory" not in c.get("/v2").json()["extensions"]
        for method, path in (
            ("GET", "/v2/systemsharedmemory/status"),
            ("POST", "/v2/systemsharedmemory/region/r/register"),
            ("POST", "/v2/systemsharedmemory/unregister"),
        ):
            r = c.request(method, path, json={"key": "/x", "byte_size": 8})
            assert r.status_code == 403 and "--allow-client-shm" in r.json()["error"]
        body = {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16},
                }
            ]
        }
        r = c.post("/v2/models/id/infer", json=body)
        assert r.status_code == 403 and "--allow-client-shm" in r.json()["error"]
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200


def test_ctl_status_lists_the_registrations(
    server: Server, client: httpclient.InferenceServerClient, regions
) -> None:
    regions("in", 64)
    client.register_system_shared_memory("in", KEY + "in", 64)
    listed = server.ctl("status")["server"]["client_shm_regions"]
    assert listed == [{"name": "in", "key": KEY + "in", "offset": 0, "byte_size": 64}]
    client.unregister_system_shared_memory()
    assert server.ctl("status")["server"]["client_shm_regions"] == []


def test_a_frozen_holder_of_the_region_table_stops_neither_the_supervisor_nor_a_frontend(
    server: Server, client: httpclient.InferenceServerClient
) -> None:
    """A process frozen while it holds the region table's lock (a frontend under a
    debugger): ctl status waited for it on the supervisor's loop, which then stopped
    ticking (no heartbeat check to end the freeze, no restarts, no watchdog). Now status
    answers without the regions, saying why, and a frontend answers 503."""
    holder = FORK.Process(
        target=freeze_holding_the_table, args=(server.ctl("status")["server"]["arena"],)
    )
    holder.start()
    try:
        wait_until(lambda: _stopped(holder.pid), 10, "the holder to freeze")
        status = server.ctl("status")["server"]
        assert "client_shm_regions" not in status
        assert "does not run" in status["client_shm_regions_unavailable"]
        r = httpx.get(f"{server.url}/v2/systemsharedmemory/status")
        assert r.status_code == 503 and "does not run" in r.json()["error"], r.text
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    assert [r["name"] for r in server.ctl("status")["server"]["client_shm_regions"]] == ["theirs"]


def test_every_frontend_lets_go_of_an_unregistered_region(
    server: Server, client: httpclient.InferenceServerClient, regions
) -> None:
    """Unregistered through one frontend, the region is unmapped by every frontend that
    used it (at its next heartbeat), so the client's memory is not held for good."""
    shm.set_shared_memory_region(regions("held", 64), [np.zeros((1, 16), np.float32)])
    client.register_system_shared_memory("held", KEY + "held", 64)
    for _ in range(10):  # fresh connections: both frontends map it
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as fresh:
            fresh.infer("id", [shm_input("INPUT0", [1, 16], "FP32", "held", 64)])
    path = f"/dev/shm{KEY}held"

    def mapping_it() -> list[int]:
        return [p for p in server.pids("frontend") if path in Path(f"/proc/{p}/maps").read_text()]

    assert mapping_it()
    client.unregister_system_shared_memory("held")
    wait_until(lambda: not mapping_it(), 15, "the frontends to unmap the region")
