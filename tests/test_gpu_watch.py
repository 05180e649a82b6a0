"""NVML per-process GPU memory. The real library needs a GPU, so the only fake in this
suite stands in for the ``pynvml`` module, behind GpuWatch's one seam (its constructor)."""

from __future__ import annotations

from types import SimpleNamespace

from ringserve.supervisor.gpu import GpuWatch


class FakeNvml:
    def __init__(self, per_device: list[list[tuple[int, int | None]]]) -> None:
        self.per_device = per_device
        self.shut = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.per_device)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        if handle == 99:
            raise RuntimeError("gone")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.per_device[handle]]

    def nvmlShutdown(self) -> None:
        self.shut = True


def test_sums_per_pid_across_devices_and_skips_hidden() -> None:
    nvml = FakeNvml([[(10, 100), (11, None)], [(10, 50), (12, 7)]])
    watch = GpuWatch(nvml)  # type: ignore[arg-type]
    assert watch.enabled
    assert watch.used_by_pid() == {10: 150, 12: 7}
    watch.close()
    assert nvml.shut


def test_a_failing_device_is_logged_once_and_the_rest_still_counted(caplog) -> None:
    nvml = FakeNvml([[(10, 100)], []])
    watch = GpuWatch(nvml)  # type: ignore[arg-type]
    watch.handles[2] = 99  # a device whose query fails (fallen off the bus)
    for _ in range(3):
        assert watch.used_by_pid() == {10: 100}
        assert not watch.every_device_answered  # pids on GPU 2 cannot be told missing
    assert caplog.text.count("NVML query of GPU 2 failed: gone") == 1


def test_nvml_failing_at_start_disables_the_watch_instead_of_the_supervisor(caplog) -> None:
    class NoPermission(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise RuntimeError("Insufficient Permissions")

    nvml = NoPermission([[(10, 100)]])
    watch = GpuWatch(nvml)  # type: ignore[arg-type]  # (it raised here)
    assert not watch.enabled and watch.used_by_pid() == {} and nvml.shut
    assert "GPU memory per process unavailable: Insufficient Permissions" in caplog.text


def test_a_device_without_a_handle_at_start_leaves_the_others_watched(caplog) -> None:
    """One GPU fallen off the bus (its handle refused) turned the watch off for every
    device: no GPU memory per process anywhere on the host. The others are watched, and
    pids missing from their answers are not taken as holding nothing."""

    class OneGone(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            if i == 1:
                raise RuntimeError("GPU is lost")
            return i

    nvml = OneGone([[(10, 100)], [(11, 5)], [(12, 7)]])
    watch = GpuWatch(nvml)  # type: ignore[arg-type]
    assert watch.enabled and not nvml.shut
    assert watch.used_by_pid() == {10: 100, 12: 7}
    assert not watch.every_device_answered
    assert "NVML: GPU 1 is not watched: GPU is lost" in caplog.text

    class AllGone(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            raise RuntimeError("Insufficient Permissions")

    nvml = AllGone([[(10, 100)]])
    watch = GpuWatch(nvml)  # type: ignore[arg-type]
    assert not watch.enabled and watch.used_by_pid() == {} and nvml.shut


def test_cpu_host_is_disabled_without_error() -> None:
    watch = GpuWatch()  # no nvidia-ml-py installed here, or no driver: disabled
    if not watch.enabled:
        assert watch.used_by_pid() == {}
    watch.close()


def test_nvml_blind_to_our_pids_is_told_from_a_worker_not_on_the_gpu() -> None:
    from ringserve.supervisor.memory_policy import nvml_blind_to

    assert nvml_blind_to({5001: 10}, on_gpu=[42, 43]) == [42, 43]  # a container's pids
    assert nvml_blind_to({42: 10, 5001: 3}, on_gpu=[42]) == []  # the host's view
    assert nvml_blind_to({}, on_gpu=[42]) == []  # NVML lists nothing: nothing to say


def test_a_worker_on_a_device_that_did_not_answer_keeps_its_last_gpu_figure() -> None:
    """A pid missing from NVML's answer holds no GPU memory only if every device
    answered: while one device's query fails, its workers read 0 (the metric dropped
    to nothing for the spell); they keep their last figure instead."""
    from support.sampling import SampledPolicy, sampled_child

    nvml = FakeNvml([[(7, 1 << 20)], []])
    watch = GpuWatch(nvml)
    watch.handles = {0: 0, 1: 99}  # the second device's query fails
    arb, worker = SampledPolicy(watch, {"gpu_nvml": 5 << 20}), sampled_child()
    arb.sample_child(worker, 0.0, watch.used_by_pid())
    assert not watch.every_device_answered
    assert arb.arena.control[0]["gpu_nvml"] == 5 << 20  # kept, not 0
    watch.handles = {0: 0, 1: 1}  # both answer: not listed now means none
    arb.sample_child(worker, 1.0, watch.used_by_pid())
    assert arb.arena.control[0]["gpu_nvml"] == 0
