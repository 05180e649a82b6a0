"""Triton's model control for the models ringserve was started with, with
``server.allow_model_control`` (Triton's ``--model-control-mode=explicit``): unload
stops every worker of a model, load starts its configured workers again. There is no
repository to load other models from.

A frontend asks the supervisor over its admin socket (the commands ``ringserve ctl
unload|load`` send), then answers as Triton does, once the change is done: a load
once the model serves, an unload once no worker takes its requests (those workers
finish the batch they hold; requests still queued are answered 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ringserve.frontend.app import FrontendState
from ringserve.frontend.errors import HTTPError, bad_request, unavailable
from ringserve.ipc.layout import ModelAvailability
from ringserve.supervisor.admin_protocol import AdminError, decode_reply, encode_request

NO_MODEL_CONTROL = (
    "model control is not enabled: ringserve serves the models it was started with; "
    "start it with --allow-model-control (server.allow_model_control) to unload and load "
    "them, or change workers with `ringserve ctl scale|unload|load`"
)
ADMIN_TIMEOUT_S = 5.0
# How often a waiting load or unload looks at the arena: a frontend has no wake-up for
# a model's readiness (the supervisor publishes it in the arena), and either takes from
# a fraction of a second (unload) to a model's load time.
POLL_S = 0.05
UNLOAD_WAIT_S = 10.0


async def _admin(path: str, cmd: str, args: dict[str, Any]) -> Any:
    """One admin-socket request, framed as ``admin_protocol`` frames it (its client,
    ``AdminClient``, blocks: not on the event loop)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), ADMIN_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        raise unavailable(f"the supervisor's admin socket is not reachable: {e}") from None
    try:
        writer.write(encode_request(cmd, args))
        await writer.drain()
        return decode_reply(await asyncio.wait_for(reader.readline(), ADMIN_TIMEOUT_S))
    except (OSError, TimeoutError, AdminError) as e:
        raise unavailable(f"the supervisor did not do {cmd}: {e}") from None
    finally:
        writer.close()


# What an unload may say: tritonclient always sends it, and with no ensembles there are
# no dependents to unload with a model.
UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


def _check_parameters(parameters: Mapping[str, Any], load: bool) -> None:
    """Triton's load takes a config or files to load instead; ours loads as configured."""
    unknown = set(parameters) - (set() if load else UNLOAD_PARAMETERS)
    if unknown:
        raise bad_request(
            f"{'load' if load else 'unload'} parameters are not supported "
            f"({', '.join(sorted(unknown))}): ringserve loads a model as it was configured "
            "at start"
        )


async def change_model(
    state: FrontendState, name: str, load: bool, parameters: Mapping[str, Any]
) -> None:
    """Unload or load the model ``name`` and wait until it is done."""
    info = state.catalog.get(name)
    if info is None:
        raise HTTPError(404, f"unknown model {name!r}")
    if not state.settings.server.allow_model_control or not state.admin_socket:
        raise bad_request(NO_MODEL_CONTROL)
    _check_parameters(parameters, load)
    await _admin(state.admin_socket, "load" if load else "unload", {"model": name})
    catalog, index = state.catalog, info.index
    loop = asyncio.get_running_loop()
    limit_s = state.settings.worker.start_timeout_s if load else UNLOAD_WAIT_S
    deadline = loop.time() + limit_s
    while True:
        if load:
            info = catalog.get(name)
            assert info is not None
            if catalog.serving(info):
                return
            # (FAILING with no worker wanted is the unloaded state the supervisor's next
            # tick replaces: only workers that keep failing to start are a failed load)
            failing = catalog.availability(index) == ModelAvailability.FAILING
            if failing and catalog.workers(index) and (error := catalog.last_error(index)):
                raise HTTPError(500, f"model {name!r} failed to load: {error}")
        elif not catalog.workers(index) and not catalog.ready_workers()[index]:
            return
        if loop.time() > deadline:
            what = "serve" if load else "stop taking requests"
            raise unavailable(f"model {name!r} did not {what} within {limit_s:g} s")
        await asyncio.sleep(POLL_S)
