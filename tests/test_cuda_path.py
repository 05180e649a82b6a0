"""The worker's CUDA path where a CPU host can check it: how device errors are told
apart when torch raises them as something else than their own type. A TorchScript
model's errors reach Python as plain RuntimeErrors carrying the message (its interpreter
rethrows every error but its own as std::runtime_error: pytorch/pytorch#148642), so
``torch.OutOfMemoryError`` and ``torch.AcceleratorError`` are only ever seen from eager
code. The messages below are torch's own, as a scripted model on a GPU raises them."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from support.profile_clock import CostModel, settings

from ringserve.gpu_worker import process, profile
from ringserve.gpu_worker.compiled import ran_out_of_room
from ringserve.gpu_worker.process import Worker
from ringserve.ipc.errors import ExitCode


def scripted(message: str) -> RuntimeError:
    """``message`` raised inside a TorchScript model, as Python receives it."""
    return RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript, serialized code (most recent call last):\n"
        '  File "code/__torch__/model.py", line 12, in forward\n'
        "    x = torch.conv2d(input, weight)\n"
        "        ~~~~~~~~~~~~ <--- HERE\n"
        f"RuntimeError: {message}\n"
    )


SCRIPTED_OOM = scripted("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total ...")
SCRIPTED_FAULT = scripted("CUDA error: an illegal memory access was encountered")


def test_a_torchscript_model_running_out_of_memory_caps_the_profile(clock) -> None:
    """Batch 4 of a scripted model runs out of device memory. The profile caught only
    ``torch.OutOfMemoryError``: the RuntimeError ended the whole profile, and the worker
    batched up to max_batch_size, the size that ran out, on every full batch."""
    per_batch = {1: 0.010, 2: 0.012}
    tried = []

    def cost(n: int, k: int) -> float:
        tried.append(n)
        if n >= 4:
            raise SCRIPTED_OOM
        return per_batch[n]

    got = profile.throughput_profile(CostModel(clock, cost), settings(16), lambda: None)
    assert got.rows_per_s == pytest.approx({1: 100.0, 2: 166.67, 4: 0.0}, rel=1e-3)
    assert got.preferred == 2 and 8 not in tried


def test_a_model_error_that_is_no_shortage_of_memory_still_ends_the_profile(clock) -> None:
    def cost(n: int, k: int) -> float:
        if n >= 2:
            raise scripted("The size of tensor a (4) must match the size of tensor b (2)")
        return 0.01

    with pytest.raises(RuntimeError, match="must match"):
        profile.throughput_profile(CostModel(clock, cost), settings(8), lambda: None)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        SCRIPTED_OOM,
        torch.AcceleratorError("CUDA error: out of memory"),  # cudaMalloc outside the cache
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
)
def test_every_form_of_running_out_of_device_memory_is_told(error: Exception) -> None:
    assert profile.out_of_memory(error)
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = error  # as dynamo wraps what the model raised while compiling
    assert ran_out_of_room(wrapped)


def test_an_error_merely_mentioning_memory_is_not_running_out() -> None:
    assert not profile.out_of_memory(RuntimeError("expected a tensor in shared memory"))
    assert not profile.out_of_memory(scripted("CUDA error: an illegal memory access"))
    assert not ran_out_of_room(ValueError("out of memory"))  # (not torch's: a model's)


class Exited(Exception):
    pass


def worker_on(device: str, device_works: bool, monkeypatch) -> tuple[Worker, list]:
    """A worker with just what ``_exit_if_device_broken`` reads; its exit raises
    ``Exited`` and the device checks it made are recorded."""
    worker = Worker.__new__(Worker)
    worker.handler = SimpleNamespace(device=torch.device(device))  # type: ignore[assignment]
    worker.model = SimpleNamespace(name="m")  # type: ignore[assignment]
    worker.control = SimpleNamespace(record_error=lambda e: None)  # type: ignore[assignment]
    worker.spec = SimpleNamespace(frontend_efds=[])  # type: ignore[assignment]
    checks: list[bool] = []

    def works(self: Worker) -> bool:
        checks.append(device_works)
        return device_works

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(Worker, "_device_works", works)
    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(process.logging, "shutdown", lambda: None)
    return worker, checks


def test_a_torchscript_model_that_broke_the_device_exits_the_worker(monkeypatch) -> None:
    """An illegal address inside a scripted model is a RuntimeError, not an
    AcceleratorError: the worker answered it as a model error and kept a broken context
    (the next batch's requests failed on it, and were the ones held when it exited)."""
    worker, checks = worker_on("cuda:0", device_works=False, monkeypatch=monkeypatch)
    with pytest.raises(Exited) as exited:
        worker._exit_if_device_broken(SCRIPTED_FAULT, [], set())
    assert exited.value.args == (ExitCode.DEVICE_FAULT,) and checks == [False]


def test_a_cuda_error_on_a_device_that_still_works_is_answered(monkeypatch) -> None:
    worker, checks = worker_on("cuda:0", device_works=True, monkeypatch=monkeypatch)
    worker._exit_if_device_broken(scripted("CUDA error: out of memory"), [], set())
    assert checks == [True]  # asked, and it works: answered like any raise


def test_a_model_error_costs_no_device_check(monkeypatch) -> None:
    worker, checks = worker_on("cuda:0", device_works=False, monkeypatch=monkeypatch)
    worker._exit_if_device_broken(scripted("shape '[2, 3]' is invalid"), [], set())
    worker._exit_if_device_broken(SCRIPTED_OOM, [], set())  # memory, not the context
    cpu, cpu_checks = worker_on("cpu", device_works=False, monkeypatch=monkeypatch)
    cpu._exit_if_device_broken(RuntimeError("CUDA error: from a model's own message"), [], set())
    assert checks == [] and cpu_checks == []


def test_trimming_a_cpu_worker_leaves_cuda_alone(monkeypatch) -> None:
    """``torch.cuda.is_available()`` initialises the CUDA driver; a CPU model's worker on
    a host with a GPU asked it at every trim (and once at start) before its device."""

    def initialise() -> bool:
        raise AssertionError("a CPU worker asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", initialise)
    worker = Worker.__new__(Worker)
    worker.model = SimpleNamespace(device="cpu")  # type: ignore[assignment]
    worker._trim()
