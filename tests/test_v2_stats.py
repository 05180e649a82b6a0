"""Triton's ``memory_usage`` in ``/v2/models/{name}/stats``, read from the control
records the supervisor's memory sampler writes (the e2e check is in test_v2_protocol)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from test_ipc import make_arena

from ringserve.frontend.v2_stats import memory_usage
from ringserve.ipc.config import ModelSettings, Settings
from ringserve.ipc.layout import ProcState, Role

MiB = 2**20


def test_memory_usage_sums_the_live_workers_of_the_model_on_its_device(tmp_path: Path) -> None:
    arena = make_arena(tmp_path, n_models=3)
    models = (
        ModelSettings(name="cpu", handler="identity"),
        ModelSettings(name="gpu", handler="identity", device="cuda:1"),
        ModelSettings(name="spread", handler="identity", device="cuda:0,cuda:1"),
    )
    state = SimpleNamespace(arena=arena, settings=Settings(models=models))

    def record(
        index: int, role: Role, model: int, state: ProcState, uss: int, device: int = -1, **gpu: int
    ) -> None:
        rec = arena.control[index]
        rec["role"], rec["model"], rec["pid"], rec["state"] = role, model, 100 + index, state
        rec["uss"], rec["device"] = uss * MiB, device
        for key, value in gpu.items():
            rec[key] = value * MiB

    assert memory_usage(state, "cpu") == []  # nothing sampled yet: nothing to say
    record(0, Role.WORKER, 0, ProcState.READY, 300)
    record(1, Role.WORKER, 0, ProcState.STARTING, 200)  # a replacement loading: it holds memory
    record(2, Role.WORKER, 0, ProcState.STOPPED, 999)  # gone
    record(3, Role.FRONTEND, 0, ProcState.READY, 999)  # not the model's
    record(4, Role.WORKER, 1, ProcState.READY, 400, 1, gpu_nvml=900, gpu_reserved=700)
    record(5, Role.WORKER, 1, ProcState.READY, 50, 1, gpu_reserved=600)  # NVML gave nothing
    assert memory_usage(state, "cpu") == [{"type": "CPU", "id": 0, "byte_size": 500 * MiB}]
    assert memory_usage(state, "gpu") == [
        {"type": "CPU", "id": 0, "byte_size": 450 * MiB},
        {"type": "GPU", "id": 1, "byte_size": 1500 * MiB},
    ]
    # A model whose workers take two GPUs in turn: each GPU's share, as Triton lists them.
    record(6, Role.WORKER, 2, ProcState.READY, 100, 0, gpu_nvml=800)
    record(7, Role.WORKER, 2, ProcState.READY, 100, 1, gpu_nvml=700)
    record(2, Role.WORKER, 2, ProcState.READY, 100, 0, gpu_nvml=600)  # (the gone one's)
    assert memory_usage(state, "spread") == [
        {"type": "CPU", "id": 0, "byte_size": 300 * MiB},
        {"type": "GPU", "id": 0, "byte_size": 1400 * MiB},
        {"type": "GPU", "id": 1, "byte_size": 700 * MiB},
    ]
    arena.close()
