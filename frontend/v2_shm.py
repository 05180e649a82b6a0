"""Routes of Triton's shared-memory extensions::

    GET  /v2/systemsharedmemory[/region/{region}]/status
    POST /v2/systemsharedmemory/region/{region}/register   {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/{region}]/unregister
    GET  /v2/cudasharedmemory[/region/{region}]/status     always empty
    POST /v2/cudasharedmemory/region/{region}/register     400: not supported
    POST /v2/cudasharedmemory[/region/{region}]/unregister nothing to do

System shared memory works only with ``server.allow_client_shm`` (else 403, as every
route here says); CUDA shared memory is not offered, since a frontend never touches
the GPU. The mapping itself is ``client_shm.py``.
"""

from __future__ import annotations

from starlette.routing import Route

from ringserve.frontend.app import FrontendState, json_endpoint
from ringserve.frontend.call import Call, Reply, json_reply
from ringserve.frontend.client_shm import ClientShm
from ringserve.frontend.errors import HTTPError, bad_request
from ringserve.frontend.jsonio import parse_json
from ringserve.frontend.v2_codec import SHM_OFF

REGISTER_BODY_LIMIT = 64 * 1024
CUDA_UNSUPPORTED = (
    "CUDA shared memory is not supported: ringserve's frontends never touch the GPU; "
    "register system shared memory instead"
)


def shm_routes(state: FrontendState) -> list[Route]:
    def client_shm() -> ClientShm:
        if state.client_shm is None:
            raise HTTPError(403, SHM_OFF)
        return state.client_shm

    async def status(call: Call) -> Reply:
        return json_reply(client_shm().status(call.path_params.get("region")))

    async def register(call: Call) -> Reply:
        shm = client_shm()
        body = await call.read_body(REGISTER_BODY_LIMIT)
        if not body.strip():
            raise bad_request("register request needs a JSON body with key, offset, byte_size")
        shm.register(call.path_params["region"], parse_json(body))
        return json_reply({})

    async def unregister(call: Call) -> Reply:
        client_shm().unregister(call.path_params.get("region"))
        return json_reply({})

    async def cuda_status(call: Call) -> Reply:
        if "region" in call.path_params:  # Triton's NOT_FOUND, a 404 as for system memory
            raise HTTPError(
                404, f"CUDA shared memory region {call.path_params['region']!r} is not registered"
            )
        return json_reply([])

    async def cuda_register(call: Call) -> Reply:
        raise bad_request(CUDA_UNSUPPORTED)

    async def cuda_unregister(call: Call) -> Reply:
        return json_reply({})

    routes = []
    for kind, on_status, on_register, on_unregister in (
        ("system", status, register, unregister),
        ("cuda", cuda_status, cuda_register, cuda_unregister),
    ):
        base = f"/v2/{kind}sharedmemory"
        region = f"{base}/region/{{region}}"
        routes += [
            Route(f"{base}/status", json_endpoint(on_status), methods=["GET"]),
            Route(f"{region}/status", json_endpoint(on_status), methods=["GET"]),
            Route(f"{region}/register", json_endpoint(on_register), methods=["POST"]),
            Route(f"{base}/unregister", json_endpoint(on_unregister), methods=["POST"]),
            Route(f"{region}/unregister", json_endpoint(on_unregister), methods=["POST"]),
        ]
    return routes
