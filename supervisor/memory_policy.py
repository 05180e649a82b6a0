"""Sampling each child's memory (and open file descriptors) into its control record,
and acting on a worker's trend: ask it to trim, then recycle it if the growth stays. A
part of ``Arbiter``."""

from __future__ import annotations

import logging
from typing import Any

from ringserve.ipc.control import send_command
from ringserve.ipc.layout import Command
from ringserve.supervisor.children import Child, Phase
from ringserve.supervisor.fds import FdUsage, fd_usage
from ringserve.supervisor.memory import MemorySample

log = logging.getLogger("ringserve.supervisor")

# A process past this share of its descriptors is named in the log; again only once it
# has been back under the second (the alert fires at 80% held for 2 minutes).
FDS_WARN_SHARE = 0.9
FDS_CLEAR_SHARE = 0.8


def nvml_blind_to(gpu_used: dict[int, int], on_gpu: list[int]) -> list[int]:
    """Our pids holding GPU memory (by torch's count) that NVML does not list while it
    lists others: it names processes by the host's pids, so inside a container's own pid
    namespace none of ours match."""
    if not gpu_used:
        return []
    return [pid for pid in on_gpu if pid not in gpu_used]


class MemoryPolicy:
    _said_nvml_blind = False
    _nvml_blind_before: frozenset[int] = frozenset()  # the last sample's (a race, once)

    def _sample_memory(self, now: float) -> None:
        assert self.arena is not None
        gpu_used = self.gpu.used_by_pid() if self.gpu.enabled else {}
        if gpu_used and not self._said_nvml_blind and self.gpu.every_device_answered:
            self._check_nvml_sees_workers(gpu_used)
        self.oom.sample(now, [c.pid for c in self.all_children() if c.returncode is None])
        for child in self.all_children():
            self.sample_child(child, now, gpu_used)

    def sample_child(self, child: Child, now: float, gpu_used: dict[int, int] | None) -> None:
        """Sample one child into its control record, and act on a ready worker's trend.
        ``gpu_used`` (NVML's bytes by pid): None leaves the record's NVML figure as is."""
        assert self.arena is not None
        if child.returncode is not None:
            return
        sample = self.memory.sample(child.pid, now)
        if sample is None:
            return
        rec = self.arena.control[child.control_index]
        rec["rss"], rec["uss"], rec["pss"] = sample.rss, sample.uss, sample.pss
        fds = fd_usage(child.pid)
        if fds is not None:
            rec["open_fds"], rec["max_fds"] = fds
            self._check_fds(child, fds)
        # Missing from NVML's answer reads as none on the GPU only when every device
        # answered: one whose query failed may hold it (it read 0 for that spell).
        if gpu_used is not None and (child.pid in gpu_used or self.gpu.every_device_answered):
            rec["gpu_nvml"] = gpu_used.get(child.pid, 0)
        if child.role == "worker" and child.phase == Phase.READY and self.phase == "running":
            if not child.sampled_ready:
                child.sampled_ready = True
                self._check_fresh_footprint(child, sample)
            self._apply_policy(child, sample, rec, now)

    def _check_fds(self, child: Child, fds: FdUsage) -> None:
        """Say in the log when a process nears its RLIMIT_NOFILE, once until it is back
        under 80%: at the limit a frontend closes new connections with no line of its
        own (``supervisor/fds.py``), so without this the journal says nothing at all."""
        if not fds.limit:
            return
        share = fds.open / fds.limit
        if share >= FDS_WARN_SHARE and not child.fds_warned:
            child.fds_warned = True
            log.warning(
                "%s holds %d of its %d file descriptors (RLIMIT_NOFILE): at the limit %s. "
                "Raise LimitNOFILE= in the unit, or close idle clients sooner "
                "(server.keep_alive_s, server.read_timeout_s)",
                child.name,
                fds.open,
                fds.limit,
                "it closes every new connection at once, unlogged"
                if child.role == "frontend"
                else "opening a file or socket fails",
            )
        elif share < FDS_CLEAR_SHARE and child.fds_warned:
            child.fds_warned = False
            log.info(
                "%s is back under %d%% of its file descriptors (%d of %d)",
                child.name,
                FDS_CLEAR_SHARE * 100,
                fds.open,
                fds.limit,
            )

    def _check_nvml_sees_workers(self, gpu_used: dict[int, int]) -> None:
        """Say once when NVML cannot see our workers, rather than leave a metric unset."""
        assert self.arena is not None
        on_gpu = [
            c.pid
            for c in self.all_children()
            if c.returncode is None and int(self.arena.control[c.control_index]["gpu_reserved"])
        ]
        blind = nvml_blind_to(gpu_used, on_gpu)
        again = [pid for pid in blind if pid in self._nvml_blind_before]
        self._nvml_blind_before = frozenset(blind)
        if again:  # two samples in a row: not a worker that NVML has yet to list
            self._said_nvml_blind = True
            log.warning(
                "NVML lists GPU processes but not our workers (pids %s): in a container "
                "with its own pid namespace, ringserve_worker_gpu_nvml_used_bytes stays "
                "unset (run with the host's pid namespace to have it); torch's own "
                "allocated/reserved figures and the GPU memory policy still work",
                ", ".join(map(str, again)),
            )

    def _check_fresh_footprint(self, child: Child, sample: MemorySample) -> None:
        """A worker over memory.uss_limit_mb as soon as it is ready will be recycled, and
        so will each replacement, forever: say so once per worker, with the numbers."""
        limit_mb = self.settings.memory.uss_limit_mb
        if limit_mb and sample.uss > limit_mb * 2**20:
            log.error(
                "%s is over memory.uss_limit_mb (%g MiB) as soon as it is ready (uss %.1f "
                "MiB): it and every replacement will be recycled in a loop; set the limit "
                "above the model's steady footprint",
                child.name,
                limit_mb,
                sample.uss / 2**20,
            )

    def _apply_policy(self, child: Child, sample: MemorySample, rec: Any, now: float) -> None:
        assert self.arena is not None
        busy = any(r.old.model_index == child.model_index for r in self.replacements)
        action = self.memory.observe(
            child.pid,
            child.model_index,
            child.started,
            sample,
            int(rec["requests"]),
            int(rec["gpu_allocated"]),
            int(rec["gpu_reserved"]),
            now,
            busy,
        )
        if action is None:
            return
        if action.kind == "trim":
            log.info(
                "%s: memory (%s, uss %.1f MiB): asking it to trim before deciding",
                child.name,
                action.reason,
                sample.uss / 2**20,
            )
            send_command(self.arena, child.control_index, Command.TRIM)
            return
        ws = self._worker_slot(child)
        if ws is not None and ws.child is child:
            # A configured request count is routine; a memory reason is worth a look.
            limit = {
                "uss_limit": f", limit {self.settings.memory.uss_limit_mb:g} MiB",
                "gpu_limit": f", limit {self.settings.memory.gpu_allocated_limit_mb:g} MiB",
            }.get(action.reason, "")
            log.log(
                logging.INFO if action.reason == "max_requests" else logging.WARNING,
                "%s: recycling: %s (uss %.1f MiB%s)",
                child.name,
                action.reason,
                sample.uss / 2**20,
                limit,
            )
            self.replace_worker(ws, action.reason)
