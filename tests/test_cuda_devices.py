"""Why a worker finds no CUDA device, in torch's words (``gpu_worker/cuda_devices.py``):
a CPU-only torch build, a driver torch cannot use, or nothing visible."""

from __future__ import annotations

import warnings

import pytest
import torch

from ringserve.gpu_worker.cuda_devices import cuda_devices

TOO_OLD = (
    "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040). "
    "Please update your GPU driver by downloading and installing a new version"
)


def test_a_cpu_only_torch_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    count, why = cuda_devices()
    assert count == 0 and why == f"this torch build ({torch.__version__}) has no CUDA support"


def test_a_driver_torch_cannot_use_is_named_in_torchs_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unavailable() -> bool:
        warnings.warn(TOO_OLD, UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # caught inside: nothing reaches the caller
        count, why = cuda_devices()
    assert (count, why) == (0, f"torch could not initialise CUDA: {TOO_OLD}")


def test_no_reason_from_torch_says_what_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    count, why = cuda_devices()
    assert count == 0 and why.startswith("torch sees no CUDA device here")


def test_devices_torch_sees_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_devices() == (2, "")
